"""Translation between pilot-channels errors and pilot-rpc / pilot-transport errors."""

from __future__ import annotations

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


def to_rpc(exc: errors.ChannelError) -> rpc.RpcError:
    """The RPC error a broker handler raises for a channel error."""
    details = {"error": type(exc).__name__}
    message = str(exc)
    if isinstance(exc, errors.ChannelPermissionError):
        return rpc.PermissionDenied(message, details=details)
    if isinstance(exc, errors.SlowConsumerError | errors.SubscriptionLimitError):
        return rpc.ResourceExhausted(message, details=details)
    if isinstance(exc, errors.BrokerUnavailableError):
        return rpc.Unavailable(message, details=details)
    if isinstance(exc, errors.ChannelUsageError):
        return rpc.InvalidArgument(message, details=details)
    return rpc.Internal(message, details=details)


def from_lower(exc: BaseException, *, what: str) -> errors.ChannelError:
    """The channel error for an RPC or transport error (chain it with ``from``)."""
    if isinstance(exc, errors.ChannelError):
        return exc
    if isinstance(exc, rpc.RpcError):
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
