"""RpcClient: calls to peers over pooled, multiplexed connections."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from pilot_rpc._options import ClientOptions
from pilot_rpc._types import ProgressCallback, TransportLike

__all__ = ["RpcClient"]


class RpcClient:
    """Calls methods on peers reached through a transport."""

    def __init__(self, transport: TransportLike, *, options: ClientOptions | None = None) -> None:
        self.transport = transport
        self.options = options or ClientOptions()

    async def call(
        self,
        peer: str,
        port: int,
        method: str,
        request: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a deadline that travels to the server)
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        idempotent: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> Any:
        """Call a unary method and return its reply."""
        raise NotImplementedError

    @asynccontextmanager
    async def stream(
        self,
        peer: str,
        port: int,
        method: str,
        request: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a deadline that travels to the server)
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> AsyncGenerator[AsyncIterator[Any]]:
        """Call a server-streaming method; iterate the items it yields."""
        raise NotImplementedError
        yield

    async def aclose(self) -> None:
        """Close every connection; pending calls fail with Cancelled."""
        raise NotImplementedError

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
