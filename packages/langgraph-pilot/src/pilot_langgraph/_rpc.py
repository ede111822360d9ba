"""The boundary to pilot-rpc: one call with error translation, no policy."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from pilot_langgraph.errors import (
    _ERRORS_BY_CODE,
    PilotRemoteError,
    RemoteUnavailableError,
    RemoteUnknownError,
)

if TYPE_CHECKING:
    from pilot_rpc import RpcClient

__all__ = ["call_streaming", "call_unary", "translate_error"]


def translate_error(exc: BaseException, *, peer: str, node: str) -> PilotRemoteError:
    """Map a pilot-rpc (or transport) exception to the matching PilotRemoteError."""
    from pilot_rpc import RpcError

    if isinstance(exc, RpcError):
        cls = _ERRORS_BY_CODE.get(exc.code.name, RemoteUnknownError)
        details: Mapping[str, Any] = exc.details
        return cls(exc.message or exc.code.name, peer=peer, node=node, details=details)
    if isinstance(exc, (ConnectionError, OSError)):
        return RemoteUnavailableError(str(exc) or type(exc).__name__, peer=peer, node=node)
    return RemoteUnknownError(f"{type(exc).__name__}: {exc}", peer=peer, node=node)


_NO_RETRIES: list[Any] = []


def _no_retries() -> Any:
    """pilot-rpc's "no retries" policy (built once: it is immutable)."""
    if not _NO_RETRIES:
        from pilot_rpc import RetryPolicy

        _NO_RETRIES.append(RetryPolicy.disabled())
    return _NO_RETRIES[0]


def _is_lower_layer_error(exc: BaseException) -> bool:
    from pilot_rpc import RpcError

    if isinstance(exc, RpcError):
        return True
    try:
        from pilot_transport.errors import TransportError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, TransportError)


async def call_unary(
    client: RpcClient,
    *,
    peer: str,
    port: int,
    node: str,
    payload: Any,
    timeout: float | None,  # noqa: ASYNC109 - a deadline sent with the call, not a local wait
    metadata: Mapping[str, str],
    idempotency_key: str | None,
    traceparent: str | None,
    on_progress: Callable[[Any], Any] | None,
) -> Any:
    """One unary call; lower-layer errors come out as PilotRemoteError.

    The RPC layer does not retry here: the caller (``PilotRemoteRunnable``) fails
    over between peers itself, so retries happen in one layer.
    """
    try:
        return await client.call(
            peer,
            port,
            node,
            payload,
            timeout=timeout,
            metadata=dict(metadata),
            idempotency_key=idempotency_key,
            traceparent=traceparent,
            idempotent=idempotency_key is not None,
            on_progress=on_progress,
            retry=_no_retries(),
        )
    except Exception as exc:
        if _is_lower_layer_error(exc):
            raise translate_error(exc, peer=peer, node=node) from exc
        raise


@asynccontextmanager
async def call_streaming(
    client: RpcClient,
    *,
    peer: str,
    port: int,
    node: str,
    payload: Any,
    timeout: float | None,  # noqa: ASYNC109 - a deadline sent with the call, not a local wait
    metadata: Mapping[str, str],
    idempotency_key: str | None,
    traceparent: str | None,
) -> AsyncGenerator[AsyncIterator[Any]]:
    """One server-streaming call; lower-layer errors come out as PilotRemoteError."""
    try:
        async with client.stream(
            peer,
            port,
            node,
            payload,
            timeout=timeout,
            metadata=dict(metadata),
            idempotency_key=idempotency_key,
            traceparent=traceparent,
            retry=_no_retries(),
        ) as items:
            yield _translated(items, peer=peer, node=node)
    except Exception as exc:
        if _is_lower_layer_error(exc):
            raise translate_error(exc, peer=peer, node=node) from exc
        raise


async def _translated(items: AsyncIterator[Any], *, peer: str, node: str) -> AsyncIterator[Any]:
    try:
        async for item in items:
            yield item
    except Exception as exc:
        if _is_lower_layer_error(exc):
            raise translate_error(exc, peer=peer, node=node) from exc
        raise
