"""Translation between pilot-channels errors and pilot-rpc / pilot-transport errors."""

from __future__ import annotations

from typing import Any

from pilot_rpc import errors as rpc
from pilot_transport import errors as transport

from . import errors

__all__ = ["from_lower", "to_rpc"]

_BY_NAME: dict[str, type[errors.ChannelError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidTopicError,
        errors.InvalidPatternError,
        errors.PayloadTooLargeError,
        errors.ChannelConfigError,
        errors.SubscriptionLimitError,
        errors.ChannelPermissionError,
        errors.SlowConsumerError,
        errors.BrokerUnavailableError,
        errors.DurableLogError,
    )
}


ERROR_DOMAIN = "pilot-channels"
"""``ErrorInfo.domain`` of the broker's errors; ``metadata["error"]`` names the class."""


def to_rpc(exc: errors.ChannelError) -> rpc.RpcError:
    """The RPC error a broker handler raises for a channel error."""
    name = type(exc).__name__
    reason = "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()
    info = rpc.ErrorInfo(reason, ERROR_DOMAIN, {"error": name})
    message = str(exc)
    if isinstance(exc, errors.ChannelPermissionError):
        return rpc.PermissionDenied(message, info=info)
    if isinstance(exc, errors.SlowConsumerError | errors.SubscriptionLimitError):
        return rpc.ResourceExhausted(message, info=info)
    if isinstance(exc, errors.BrokerUnavailableError):
        return rpc.Unavailable(message, info=info)
    if isinstance(exc, errors.ChannelUsageError):
        return rpc.InvalidArgument(message, info=info)
    return rpc.Internal(message, info=info)


def from_lower(exc: BaseException, *, what: str) -> errors.ChannelError:
    """The channel error for an RPC or transport error (chain it with ``from``)."""
    if isinstance(exc, errors.ChannelError):
        return exc
    if isinstance(exc, rpc.RpcError):
        if exc.info.domain == ERROR_DOMAIN:
            name: Any = exc.info.metadata.get("error")
        else:  # a broker of 0.1.x names the class in details["error"]
            name = exc.details.get("error") if isinstance(exc.details, dict) else None  # pyright: ignore[reportUnnecessaryIsInstance]
        cls = _BY_NAME.get(name) if isinstance(name, str) else None
        if cls is not None:
            return cls(exc.message)
        if isinstance(exc, rpc.PermissionDenied | rpc.Unauthenticated):
            return errors.ChannelPermissionError(f"{what}: {exc.message}")
        if isinstance(exc, rpc.DeadlineExceeded):
            return errors.ChannelTimeoutError(f"{what}: {exc.message}")
        if isinstance(exc, rpc.InvalidArgument | rpc.NotFound | rpc.Unimplemented):
            return errors.ChannelConfigError(
                f"{what}: {exc} (is the 'channels' plugin loaded on that worker?)"
                if isinstance(exc, rpc.NotFound | rpc.Unimplemented)
                else f"{what}: {exc.message}"
            )
        return errors.BrokerUnavailableError(f"{what}: {exc}")
    if isinstance(exc, transport.TransportUsageError):
        return errors.ChannelConfigError(f"{what}: {exc}")
    if isinstance(exc, transport.TransportError | ConnectionError | OSError):
        return errors.BrokerUnavailableError(f"{what}: {exc}")
    if isinstance(exc, TimeoutError):
        return errors.ChannelTimeoutError(f"{what}: timed out")
    return errors.BrokerProtocolError(f"{what}: {type(exc).__name__}: {exc}")


def is_retryable(exc: errors.ChannelError) -> bool:
    """Whether a subscriber should reconnect after ``exc``."""
    return isinstance(exc, errors.ChannelNetworkError | errors.ChannelTimeoutError)
