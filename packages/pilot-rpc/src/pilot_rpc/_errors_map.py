"""Translate lower-layer exceptions into RpcError at the boundary (chained with ``from``)."""

from __future__ import annotations

from pilot_transport import errors as transport_errors

from pilot_rpc.errors import (
    ErrorInfo,
    InvalidArgument,
    RpcError,
    Unauthenticated,
    Unavailable,
)

__all__ = ["map_transport_error"]


def map_transport_error(exc: BaseException, context: str, *, retry_safe: bool = False) -> RpcError:
    """The RpcError for ``exc`` (most specific first); ``exc`` becomes its ``__cause__``.

    ``retry_safe`` says whether the call in question is known not to have been
    sent (true when a connection could not be opened).
    """
    error: RpcError
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, transport_errors.PeerRevokedError):
        # Our trust store no longer holds the peer: not a network failure to retry.
        error = Unauthenticated(
            f"{context}: the peer was removed from the trust store: {exc}",
            info=ErrorInfo("PEER_REVOKED"),
        )
        error.__cause__ = exc
        return error
    if isinstance(
        exc,
        transport_errors.PeerNotTrustedError
        | transport_errors.RejectedByPeerError
        | transport_errors.PeerIdentityMismatchError,
    ):
        error = Unauthenticated(f"{context}: {exc}")
    elif isinstance(exc, transport_errors.TransportUsageError):
        error = InvalidArgument(f"{context}: {exc}")
    elif isinstance(exc, transport_errors.TransportError | OSError | EOFError):
        error = Unavailable(f"{context}: {exc}", retry_safe=retry_safe)
    else:
        error = Unavailable(f"{context}: {type(exc).__name__}: {exc}", retry_safe=retry_safe)
    error.__cause__ = exc
    return error
