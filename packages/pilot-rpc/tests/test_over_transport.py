"""RpcClient/RpcServer over real pilot-transport carriers: memory:// and tcp:// (loopback)."""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pilot_rpc import (
    ClientOptions,
    RetryPolicy,
    RpcClient,
    RpcServer,
    Unauthenticated,
    Unavailable,
)
from pilot_rpc import _protocol as P
from pilot_transport import Transport, open_transport
from pilot_transport.errors import PeerRevokedError, StreamResetError
from pilot_transport.testing import TestPeers, create_test_peers

PORT = 5000
_hub = itertools.count()


@pytest.fixture(params=["memory", "tcp"])
def carrier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def peers(tmp_path: Path) -> TestPeers:
    return create_test_peers(tmp_path, ["client", "server"])


class Net:
    """A server transport listening on PORT and a client transport, on one carrier."""

    def __init__(self, carrier: str, peers: TestPeers) -> None:
        self.carrier = carrier
        self.peers = peers
        self.url = f"memory://rpc-test-{next(_hub)}" if carrier == "memory" else "tcp://127.0.0.1:0"

    async def open(self, name: str) -> Transport:
        peer = self.peers[name]
        return await open_transport(self.url, identity=peer.identity, trust=peer.trust)


@pytest.fixture
async def net(carrier: str, peers: TestPeers) -> AsyncIterator[tuple[Net, Transport, Transport]]:
    net = Net(carrier, peers)
    server_transport = await net.open("server")
    client_transport = await net.open("client")
    try:
        yield net, server_transport, client_transport
    finally:
        await client_transport.aclose()
        await server_transport.aclose()


async def listen(net: Net, transport: Transport) -> Any:
    listener = await transport.listen(PORT)
    if net.carrier == "tcp":
        info = await transport.info()
        assert info.endpoint is not None
        net.peers.set_endpoint("server", info.endpoint)
    return listener


async def read_until_closed(stream: Any) -> bytes:
    """Everything the peer sent before ending the connection (EOF or reset: either ends it)."""
    received = b""
    async with asyncio.timeout(10):
        while True:
            try:
                data = await stream.read(65536)
            except StreamResetError:
                return received
            if not data:
                return received
            received += data


def make_server() -> RpcServer:
    server = RpcServer()

    @server.unary("whoami")
    async def whoami(request: Any, ctx: Any) -> Any:
        return {"name": ctx.peer.name, "node_id": ctx.peer.node_id, "echo": request}

    @server.server_streaming("count")
    async def count(request: int, ctx: Any) -> AsyncIterator[int]:
        for i in range(request):
            yield i

    return server


async def test_unary_and_streaming(net: tuple[Net, Transport, Transport]) -> None:
    n, server_transport, client_transport = net
    server = make_server()
    listener = await listen(n, server_transport)
    async with server.serve_in_background(listener), RpcClient(client_transport) as client:
        reply = await client.call("server", PORT, "whoami", b"\x00" * 300, timeout=10)
        assert reply["name"] == "client"
        assert reply["node_id"] == client_transport.identity.node_id
        assert reply["echo"] == b"\x00" * 300
        async with client.stream("server", PORT, "count", 500, timeout=10) as items:
            assert [i async for i in items] == list(range(500))
        results = await asyncio.gather(
            *(client.call("server", PORT, "whoami", i, timeout=10) for i in range(200))
        )
        assert [r["echo"] for r in results] == list(range(200))
        assert client.connections() == 1


async def test_untrusted_caller_gets_unauthenticated(
    net: tuple[Net, Transport, Transport], peers: TestPeers
) -> None:
    n, server_transport, client_transport = net
    server = make_server()
    listener = await listen(n, server_transport)
    peers["server"].trust.remove("client")
    options = ClientOptions(retry=RetryPolicy.disabled())
    async with (
        server.serve_in_background(listener),
        RpcClient(client_transport, options=options) as client,
    ):
        with pytest.raises(Unauthenticated) as info:
            await client.call("server", PORT, "whoami", 1, timeout=10)
        assert info.value.__cause__ is not None


async def test_malformed_input_ends_only_that_connection(
    net: tuple[Net, Transport, Transport],
) -> None:
    n, server_transport, client_transport = net
    server = make_server()
    listener = await listen(n, server_transport)
    async with server.serve_in_background(listener), RpcClient(client_transport) as client:
        assert (await client.call("server", PORT, "whoami", 1, timeout=10))["echo"] == 1
        rogue = await client_transport.connect("server", PORT, timeout=10)
        try:
            # A frame header announcing 4 GiB: refused from the header, GOAWAY, close.
            await rogue.write(struct.pack(">IBBI", 0xFFFFFFFF, 0x01, 0, 0))
            received = await read_until_closed(rogue)
        finally:
            await rogue.aclose()
        core = P.Connection(P.Role.CLIENT)
        events = core.receive_data(received)
        assert isinstance(events[0], P.HelloReceived)
        assert isinstance(events[-1], P.GoAwayReceived)
        assert "protocol error" in events[-1].message
        # The well-behaved client's connection is unaffected.
        assert (await client.call("server", PORT, "whoami", 2, timeout=10))["echo"] == 2
        assert client.connections() == 1


async def test_keepalive_detects_a_silent_peer(net: tuple[Net, Transport, Transport]) -> None:
    n, server_transport, client_transport = net
    listener = await listen(n, server_transport)
    accepted: list[Any] = []

    async def silent_server() -> None:
        # Says hello, then never reads or writes again: a hung host.
        stream = await listener.accept()
        accepted.append(stream)
        core = P.Connection(P.Role.SERVER)
        await stream.write(core.data_to_send())
        await asyncio.Event().wait()

    options = ClientOptions(
        keepalive_interval=0.2, keepalive_timeout=0.3, retry=RetryPolicy.disabled()
    )
    task = asyncio.create_task(silent_server())
    try:
        async with RpcClient(client_transport, options=options) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(Unavailable, match="did not answer a ping"):
                await client.call("server", PORT, "whoami", 1, timeout=30)
            assert loop.time() - started < 5
    finally:
        task.cancel()
        for stream in accepted:
            await stream.aclose()


# -- trust revocation -----------------------------------------------------------------------------


def hanging_server(started: asyncio.Event, cancelled: asyncio.Event) -> RpcServer:
    server = RpcServer()

    @server.unary("hang")
    async def hang(request: Any, ctx: Any) -> Any:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    return server


@pytest.mark.parametrize("carrier", ["tcp"])
async def test_revoking_the_server_fails_pending_calls_with_peer_revoked(
    net: tuple[Net, Transport, Transport], peers: TestPeers
) -> None:
    """The caller removes the server from its trust store while a call is in flight:
    the call fails with Unauthenticated (reason PEER_REVOKED), not a generic connection
    loss, and the server's handler is cancelled when its connection is cut."""
    n, server_transport, client_transport = net
    started, cancelled = asyncio.Event(), asyncio.Event()
    server = hanging_server(started, cancelled)
    listener = await listen(n, server_transport)
    options = ClientOptions(retry=RetryPolicy.disabled())
    async with (
        server.serve_in_background(listener),
        RpcClient(client_transport, options=options) as client,
    ):
        pending = asyncio.ensure_future(client.call("server", PORT, "hang", 1, timeout=60))
        async with asyncio.timeout(10):
            await started.wait()
        peers["client"].trust.remove("server")
        with pytest.raises(Unauthenticated) as info:
            async with asyncio.timeout(10):  # a failure bound: checked every 0.25 s
                await pending
        assert info.value.info.reason == "PEER_REVOKED"
        assert isinstance(info.value.__cause__, PeerRevokedError)
        async with asyncio.timeout(10):
            await cancelled.wait()


@pytest.mark.parametrize("carrier", ["tcp"])
async def test_revoking_a_caller_cancels_its_running_handlers(
    net: tuple[Net, Transport, Transport], peers: TestPeers
) -> None:
    """The server removes the caller from its trust store: the caller's running handler
    is cancelled, its call fails (the caller only sees its connection cut), and new
    calls are refused at the handshake."""
    n, server_transport, client_transport = net
    started, cancelled = asyncio.Event(), asyncio.Event()
    server = hanging_server(started, cancelled)
    listener = await listen(n, server_transport)
    options = ClientOptions(retry=RetryPolicy.disabled())
    async with (
        server.serve_in_background(listener),
        RpcClient(client_transport, options=options) as client,
    ):
        pending = asyncio.ensure_future(client.call("server", PORT, "hang", 1, timeout=60))
        async with asyncio.timeout(10):
            await started.wait()
        peers["server"].trust.remove("client")
        async with asyncio.timeout(10):  # a failure bound: checked every 0.25 s
            await cancelled.wait()
        with pytest.raises(Unavailable):
            async with asyncio.timeout(10):
                await pending
        with pytest.raises(Unauthenticated):
            await client.call("server", PORT, "hang", 1, timeout=10)
        assert server.inflight == 0
