from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pilot_rpc import CallContext, InvalidArgument, NotFound, RpcServer, ServerOptions


class Probe:
    """Facts a test's handlers record, with waits that never sleep blindly."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()
        self.produced = 0
        self.contexts: list[CallContext] = []


def build_server(probe: Probe, options: ServerOptions | None = None) -> RpcServer:
    server = RpcServer(options=options)

    @server.unary("echo")
    async def echo(request: Any, ctx: CallContext) -> Any:
        probe.contexts.append(ctx)
        return request

    @server.unary("sync_echo")
    def sync_echo(request: Any, ctx: CallContext) -> Any:
        return request

    @server.unary("fail")
    async def fail(request: Any, ctx: CallContext) -> Any:
        raise ValueError(f"bad value {request!r}")

    @server.unary("not_found")
    async def not_found(request: Any, ctx: CallContext) -> Any:
        raise NotFound("no such key", details={"key": request})

    @server.unary("hang")
    async def hang(request: Any, ctx: CallContext) -> Any:
        probe.contexts.append(ctx)
        probe.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise

    @server.unary("sleep")
    async def sleep(request: float, ctx: CallContext) -> str:
        probe.started.set()
        await asyncio.sleep(request)
        probe.finished.set()
        return "slept"

    @server.unary("progress")
    async def progress(request: int, ctx: CallContext) -> str:
        for i in range(request):
            await ctx.send_progress({"step": i})
        return "done"

    @server.unary("bad_reply")
    async def bad_reply(request: Any, ctx: CallContext) -> Any:
        return object()

    @server.server_streaming("count")
    async def count(request: int, ctx: CallContext) -> AsyncIterator[int]:
        for i in range(request):
            yield i

    @server.server_streaming("firehose")
    async def firehose(request: int, ctx: CallContext) -> AsyncIterator[str]:
        probe.started.set()
        try:
            while True:
                yield "x" * request
                probe.produced += 1
        finally:
            probe.finished.set()

    @server.server_streaming("fail_after")
    async def fail_after(request: int, ctx: CallContext) -> AsyncIterator[int]:
        for i in range(request):
            yield i
        raise InvalidArgument("ran out", details={"at": request})

    @server.client_streaming("sum")
    async def total(requests: AsyncIterator[int], ctx: CallContext) -> int:
        return sum([x async for x in requests])

    @server.bidi_streaming("double")
    async def double(requests: AsyncIterator[int], ctx: CallContext) -> AsyncIterator[int]:
        async for x in requests:
            yield 2 * x

    return server


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def server(probe: Probe) -> RpcServer:
    return build_server(probe)


@pytest.fixture
def make_server(probe: Probe) -> Callable[[ServerOptions | None], RpcServer]:
    """A factory for servers with other options, sharing the test's probe."""
    return lambda options=None: build_server(probe, options)
