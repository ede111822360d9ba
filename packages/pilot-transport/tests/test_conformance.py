"""Every carrier, and the TLS layer over every carrier, passes the stream conformance check."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pilot_transport import Transport, open_transport
from pilot_transport._carrier import DialTarget
from pilot_transport._carriers.memory import MemoryCarrier, memory_stream_pair
from pilot_transport._carriers.tcp import TcpCarrier
from pilot_transport.testing import ByteStream, TestPeers, check_stream_conformance


async def test_memory_stream_pair() -> None:
    async def make_pair() -> tuple[ByteStream, ByteStream]:
        return memory_stream_pair()

    await check_stream_conformance(make_pair)


async def test_memory_carrier() -> None:
    a = MemoryCarrier("conformance-carrier", "node-a")
    b = MemoryCarrier("conformance-carrier", "node-b")
    listener = await b.bind(1)

    async def make_pair() -> tuple[ByteStream, ByteStream]:
        ours = await a.dial(DialTarget(node_id="node-b"), 1)
        return ours, await listener.accept()

    try:
        await check_stream_conformance(make_pair)
    finally:
        await a.aclose()
        await b.aclose()


async def test_tcp_carrier() -> None:
    a = TcpCarrier()
    b = TcpCarrier()
    listener = await b.bind(1)
    target = DialTarget(endpoint=b.endpoint)

    async def make_pair() -> tuple[ByteStream, ByteStream]:
        ours = await a.dial(target, 1)
        # The acceptor learns of the stream only once the header arrives with a write.
        await ours.write(b"hello")
        theirs = await listener.accept()
        assert await theirs.read(5) == b"hello"
        return ours, theirs

    try:
        await check_stream_conformance(make_pair)
    finally:
        await a.aclose()
        await b.aclose()


@pytest.fixture(params=["memory", "tcp"])
async def transports(
    request: pytest.FixtureRequest, peers: TestPeers, hub: str
) -> AsyncIterator[tuple[Transport, Transport]]:
    url = hub if request.param == "memory" else "tcp://127.0.0.1:0"
    async with (
        open_transport(url, identity=peers["server"].identity, trust=peers["server"].trust) as s,
        open_transport(url, identity=peers["client"].identity, trust=peers["client"].trust) as c,
    ):
        yield c, s


async def test_secure_streams(transports: tuple[Transport, Transport], peers: TestPeers) -> None:
    client, server = transports
    listener = await server.listen(5000)
    info = await server.info()
    if info.carrier == "tcp":
        assert info.endpoint is not None
        peers.set_endpoint("server", info.endpoint)

    async def make_pair() -> tuple[ByteStream, ByteStream]:
        ours, theirs = await asyncio.gather(client.connect("server", 5000), listener.accept())
        assert ours.peer.name == "server"
        assert theirs.peer.name == "client"
        return ours, theirs

    await check_stream_conformance(make_pair)
