"""Drive handlers in unit tests, without a network.

Calls go through the worker's real pipeline (ACL, limits, codec, validation,
idempotency, middleware, timeouts, metrics), exactly as over pilot-rpc; only
the transport is missing. Requests and results are round-tripped through
msgpack by default, so a handler returning something the wire cannot carry
fails here too. Errors are the ``pilot_rpc.RpcError`` subclasses a remote
caller would receive::

    from pilot_worker.testing import WorkerTestClient

    async def test_search():
        async with WorkerTestClient([search], caller="alice") as client:
            assert await client.call("search", {"q": "x"}) == {...}
            items = await client.stream("count", 3)          # collected list
            with pytest.raises(PermissionDenied):
                await client.call("search", {}, caller="mallory")

To call a handler function directly with a context, build one with
:func:`make_context`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from pilot_worker._codec import PayloadCodec
from pilot_worker._config import WorkerConfig
from pilot_worker._context import Context
from pilot_worker._handler import HandlerKind, HandlerSpec
from pilot_worker._server import Middleware, WorkerServer

__all__ = ["FakePeer", "OfflineCall", "WorkerTestClient", "make_context", "make_peer"]

_request_ids = itertools.count(1)


@dataclass(frozen=True, kw_only=True)
class FakePeer:
    """A stand-in for ``pilot_transport.PeerInfo`` (same attributes)."""

    node_id: str
    name: str | None = None
    address: str | None = None
    public_key: bytes = b""
    fingerprint: str = ""


def make_peer(name: str, *, address: str | None = None) -> FakePeer:
    """A peer whose node id is derived from ``name`` (stable across runs)."""
    key = hashlib.sha256(name.encode()).digest()
    return FakePeer(
        node_id=key.hex()[:32],
        name=name,
        address=address,
        public_key=key,
        fingerprint="SHA256:" + key.hex()[:16],
    )


@dataclass(kw_only=True)
class OfflineCall:
    """An incoming call without a network (satisfies ``IncomingCall``)."""

    peer: FakePeer
    request_id: str = field(default_factory=lambda: f"test-{next(_request_ids)}")
    deadline: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict[str, str])
    traceparent: str | None = None
    idempotency_key: str | None = None
    on_progress: Callable[[Any], Any] | None = None
    progress: list[Any] = field(default_factory=list[Any])
    cancelled: bool = False

    async def send_progress(self, value: Any) -> None:
        self.progress.append(value)
        if self.on_progress is not None:
            result = self.on_progress(value)
            if asyncio.iscoroutine(result):
                await result


def _roundtrip(value: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False, strict_map_key=False)


def make_context(
    handler_name: str = "handler",
    *,
    caller: str | FakePeer = "test-caller",
    metadata: Mapping[str, str] | None = None,
    timeout: float | None = None,
    idempotency_key: str | None = None,
    traceparent: str | None = None,
) -> Context:
    """A :class:`Context` for calling a handler function directly.

    Must be called inside a running event loop. Progress reports are kept in
    ``ctx._call.progress`` (prefer :class:`WorkerTestClient` to check them).
    """
    loop = asyncio.get_running_loop()
    peer = caller if isinstance(caller, FakePeer) else make_peer(caller)
    deadline = None if timeout is None else loop.time() + timeout
    call = OfflineCall(
        peer=peer,
        deadline=deadline,
        metadata=dict(metadata or {}),
        traceparent=traceparent,
        idempotency_key=idempotency_key,
    )
    return Context(call=call, handler_name=handler_name, deadline=deadline, loop=loop)


class WorkerTestClient:
    """Call a worker's handlers in-process through its full pipeline.

    Args:
        handlers: A :class:`WorkerServer` (used as is), or handlers to register
            on a fresh offline worker (decorated functions, plain functions,
            :class:`HandlerSpec` objects, or modules).
        caller: Default caller: a name (its node id is derived from it, see
            :func:`make_peer`) or a :class:`FakePeer`.
        config: Options of the fresh worker.
        codec: Payload codec of the fresh worker.
        middleware: Middleware of the fresh worker.
        wire_roundtrip: Pass requests and results through msgpack, as the
            network would.
    """

    __test__ = False

    def __init__(
        self,
        handlers: WorkerServer | Sequence[Any] | Any,
        *,
        caller: str | FakePeer = "test-caller",
        config: WorkerConfig | None = None,
        codec: PayloadCodec | None = None,
        middleware: Sequence[Middleware] = (),
        wire_roundtrip: bool = True,
    ) -> None:
        if isinstance(handlers, WorkerServer):
            self.worker = handlers
        else:
            self.worker = WorkerServer(None, config, codec=codec, middleware=middleware)
            items: Sequence[Any] = (
                handlers if isinstance(handlers, list | tuple) else [handlers]  # pyright: ignore[reportUnknownVariableType]
            )
            for item in items:
                if hasattr(item, "__file__") or isinstance(item, str):
                    self.worker.include_module(item)
                else:
                    self.worker.register(item)
        self._default_caller = caller
        self._roundtrip = wire_roundtrip
        self.last_call: OfflineCall | None = None

    @staticmethod
    def peer(caller: str | FakePeer) -> FakePeer:
        """The :class:`FakePeer` used for ``caller``."""
        return caller if isinstance(caller, FakePeer) else make_peer(caller)

    def _call(
        self,
        caller: str | FakePeer | None,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        idempotency_key: str | None,
        traceparent: str | None,
        on_progress: Callable[[Any], Any] | None,
    ) -> OfflineCall:
        loop = asyncio.get_running_loop()
        call = OfflineCall(
            peer=self.peer(caller if caller is not None else self._default_caller),
            deadline=None if timeout is None else loop.time() + timeout,
            metadata=dict(metadata or {}),
            idempotency_key=idempotency_key,
            traceparent=traceparent,
            on_progress=on_progress,
        )
        self.last_call = call
        return call

    async def call(
        self,
        name: str,
        payload: Any = None,
        *,
        caller: str | FakePeer | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the caller's deadline, as in RpcClient.call
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        on_progress: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Call a unary handler and return its (wire-shaped) result.

        ``timeout`` plays the caller's deadline. Progress values are passed to
        ``on_progress`` and kept in ``client.last_call.progress``.

        Raises:
            pilot_rpc.RpcError: The subclass a remote caller would receive.
        """
        spec = self._spec(name)
        if spec is not None and spec.kind is HandlerKind.SERVER_STREAMING:
            raise TypeError(f"{name!r} is a streaming handler: use stream()")
        call = self._call(caller, timeout, metadata, idempotency_key, traceparent, on_progress)
        request = _roundtrip(payload) if self._roundtrip else payload
        result = await self.worker.dispatch_unary(name, request, call)
        return _roundtrip(result) if self._roundtrip else result

    async def stream(
        self,
        name: str,
        payload: Any = None,
        *,
        caller: str | FakePeer | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the caller's deadline, as in RpcClient.call
        metadata: Mapping[str, str] | None = None,
        traceparent: str | None = None,
        limit: int | None = None,
    ) -> list[Any]:
        """Call a streaming handler and collect its items (at most ``limit``).

        Raises:
            pilot_rpc.RpcError: The subclass a remote caller would receive.
        """
        items: list[Any] = []
        stream = self.iter_stream(
            name,
            payload,
            caller=caller,
            timeout=timeout,
            metadata=metadata,
            traceparent=traceparent,
        )
        async with contextlib.aclosing(stream):
            async for item in stream:
                items.append(item)
                if limit is not None and len(items) >= limit:
                    break
        return items

    async def iter_stream(
        self,
        name: str,
        payload: Any = None,
        *,
        caller: str | FakePeer | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the caller's deadline, as in RpcClient.call
        metadata: Mapping[str, str] | None = None,
        traceparent: str | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Iterate a streaming handler's items as they come."""
        call = self._call(caller, timeout, metadata, None, traceparent, None)
        request = _roundtrip(payload) if self._roundtrip else payload
        agen = self.worker.dispatch_stream(name, request, call)
        try:
            async for item in agen:
                yield _roundtrip(item) if self._roundtrip else item
        finally:
            await agen.aclose()

    def _spec(self, name: str) -> HandlerSpec | None:
        return self.worker.handlers.get(name)

    async def aclose(self) -> None:
        """Close the worker (a no-op for the network parts it never started)."""
        await self.worker.aclose()

    async def __aenter__(self) -> WorkerTestClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
