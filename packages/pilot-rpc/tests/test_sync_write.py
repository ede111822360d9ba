"""A unary call at c=1 writes from the caller's task, synchronously, on every Python version.

The client hands a call's frames to the stream's ``try_write`` (encrypt and give
to the carrier without suspending) instead of waking its writer task, which
would cost one more event-loop iteration per call. These tests count writer
wake-ups and event-loop iterations (``select`` calls), never time.
"""

from __future__ import annotations

import asyncio
import itertools
import selectors
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pilot_rpc import ClientOptions, RpcClient, RpcServer
from pilot_rpc._driver import ClientConnection
from pilot_transport import Transport, open_transport
from pilot_transport.testing import TestPeers, create_test_peers

PORT = 5000
CALLS = 20
_hub = itertools.count()


def make_server() -> RpcServer:
    server = RpcServer()

    @server.unary("echo")
    async def echo(request: Any, ctx: Any) -> Any:
        return request

    return server


class HiddenSyncWrite:
    """A stream that forwards everything except ``try_write`` (the path without it)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.peer = stream.peer

    async def read(self, max_bytes: int = 65536, /) -> bytes:
        return await self._stream.read(max_bytes)

    async def write(self, data: bytes, /) -> None:
        await self._stream.write(data)

    async def write_eof(self) -> None:
        await self._stream.write_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class WithoutSyncWrite:
    """A transport whose streams offer no ``try_write``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    @property
    def url(self) -> str:
        return self._transport.url

    async def connect(
        self,
        peer: str,
        port: int,
        *,
        timeout: float | None = None,
    ) -> HiddenSyncWrite:
        return HiddenSyncWrite(await self._transport.connect(peer, port, timeout=timeout))


class Net:
    def __init__(self, carrier: str, peers: TestPeers) -> None:
        self.carrier = carrier
        self.peers = peers
        self.url = f"memory://sync-{next(_hub)}" if carrier == "memory" else "tcp://127.0.0.1:0"

    async def open(self, name: str) -> Transport:
        peer = self.peers[name]
        return await open_transport(self.url, identity=peer.identity, trust=peer.trust)

    async def start(self) -> tuple[Transport, Transport, Any]:
        server_transport = await self.open("server")
        client_transport = await self.open("client")
        listener = await server_transport.listen(PORT)
        if self.carrier == "tcp":
            info = await server_transport.info()
            assert info.endpoint is not None
            self.peers.set_endpoint("server", info.endpoint)
        return server_transport, client_transport, listener


@pytest.fixture(params=["memory", "tcp"])
def carrier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def peers(tmp_path: Path) -> TestPeers:
    return create_test_peers(tmp_path, ["client", "server"])


@pytest.fixture
async def net(carrier: str, peers: TestPeers) -> AsyncIterator[tuple[Transport, Transport, Any]]:
    server_transport, client_transport, listener = await Net(carrier, peers).start()
    try:
        yield server_transport, client_transport, listener
    finally:
        await client_transport.aclose()
        await server_transport.aclose()


def only_connection(client: RpcClient) -> ClientConnection:
    conns = [conn for pool in client._pools.values() for conn in pool.conns]
    assert len(conns) == 1
    return conns[0]


async def test_sequential_calls_never_wake_the_writer(
    net: tuple[Transport, Transport, Any],
) -> None:
    _, client_transport, listener = net
    async with make_server().serve_in_background(listener), RpcClient(client_transport) as client:
        assert await client.call("server", PORT, "echo", 0, timeout=10) == 0
        conn = only_connection(client)
        wakeups, sync_writes = conn.writer_wakeups, conn.sync_writes
        for i in range(CALLS):
            assert await client.call("server", PORT, "echo", i, timeout=10) == i
        # Each call's frames were taken by the stream synchronously; the writer slept.
        assert conn.sync_writes - sync_writes == CALLS
        assert conn.writer_wakeups == wakeups


async def test_without_try_write_the_writer_sends_each_call_on_older_pythons(
    net: tuple[Transport, Transport, Any],
) -> None:
    _, client_transport, listener = net
    async with (
        make_server().serve_in_background(listener),
        RpcClient(WithoutSyncWrite(client_transport)) as client,
    ):
        assert await client.call("server", PORT, "echo", 0, timeout=10) == 0
        conn = only_connection(client)
        wakeups = conn.writer_wakeups
        for i in range(CALLS):
            assert await client.call("server", PORT, "echo", i, timeout=10) == i
        assert conn.sync_writes == 0
        if sys.version_info < (3, 12):
            assert conn.writer_wakeups - wakeups == CALLS  # the cost try_write removes
        else:
            assert conn.writer_wakeups == wakeups  # the eager-task path


async def test_large_requests_still_arrive_whole_and_in_order(
    net: tuple[Transport, Transport, Any],
) -> None:
    _, client_transport, listener = net
    async with make_server().serve_in_background(listener), RpcClient(client_transport) as client:
        # Requests larger than the stream takes at once go through the writer; the
        # small ones in between go synchronously; none may overtake or split another.
        sizes = [10, 300_000, 20, 2_000_000, 30, 100_000, 40]
        requests = [bytes([i]) * size for i, size in enumerate(sizes)]
        replies = await asyncio.gather(
            *(client.call("server", PORT, "echo", r, timeout=30) for r in requests)
        )
        assert replies == requests
        for r in requests:
            assert await client.call("server", PORT, "echo", r, timeout=30) == r
        assert only_connection(client).sync_writes > 0


class CountingSelector(selectors.DefaultSelector):
    """Counts ``select`` calls: one per event-loop iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.selects = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.selects += 1
        return super().select(timeout)


def iterations_per_call(peers: TestPeers, *, sync_write: bool) -> int:
    """Event-loop iterations for CALLS sequential unary calls over memory:// (client and server)."""
    selector = CountingSelector()
    loop = asyncio.SelectorEventLoop(selector)

    async def main() -> int:
        server_transport, client_transport, listener = await Net("memory", peers).start()
        transport: Any = client_transport if sync_write else WithoutSyncWrite(client_transport)
        try:
            async with (
                make_server().serve_in_background(listener),
                RpcClient(transport, options=ClientOptions(keepalive_interval=None)) as client,
            ):
                for i in range(3):  # warm up: connect, hello, first calls
                    await client.call("server", PORT, "echo", i, timeout=10)
                before = selector.selects
                for i in range(CALLS):
                    await client.call("server", PORT, "echo", i, timeout=10)
                return selector.selects - before
        finally:
            await client_transport.aclose()
            await server_transport.aclose()

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_synchronous_write_saves_one_loop_iteration_per_call_on_older_pythons(
    peers: TestPeers,
) -> None:
    with_sync = iterations_per_call(peers, sync_write=True)
    without = iterations_per_call(peers, sync_write=False)
    if sys.version_info < (3, 12):
        assert without - with_sync == CALLS, (with_sync, without)
    else:
        assert with_sync <= without, (with_sync, without)
