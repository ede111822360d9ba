"""open_connection / start_server over two stream layers joined in memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from pilot_node._api import (
    PilotStreamReader,
    PilotStreamWriter,
    open_connection,
    serve_echo,
    start_server,
)
from pilot_node._packet import Address, Packet
from pilot_node._streams import StreamError, StreamLayer, StreamRefusedError
from pilot_node.errors import NodeClosedError


@dataclass
class FakeNode:
    """What the API needs from a Node: a stream layer, name resolution, tunnels."""

    address: Address
    stream_layer: object = None
    tunnels: list[int] = field(default_factory=lambda: [])
    names: dict[str, int] = field(default_factory=lambda: {})

    async def resolve_node(self, target: str | int | Address) -> int:
        if isinstance(target, Address):
            return target.node
        if isinstance(target, int):
            return target
        try:
            return Address.parse(target).node
        except ValueError:
            return self.names[target]

    async def connect(self, target: str | int | Address, *, timeout: float | None = None) -> None:
        self.tunnels.append(await self.resolve_node(target))


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[FakeNode, FakeNode]]:
    loop = asyncio.get_running_loop()
    layers: dict[int, StreamLayer] = {}

    def send(packet: Packet) -> None:
        wire = packet.encode()
        loop.call_soon(layers[packet.dst.node].on_packet, Packet.decode(wire))

    a = FakeNode(Address(0, 1))
    b = FakeNode(Address(0, 2), names={})
    a.names["bee"] = 2
    la = StreamLayer(send, a.address, echo=False)
    lb = StreamLayer(send, b.address, echo=False)
    layers.update({1: la, 2: lb})
    a.stream_layer, b.stream_layer = la, lb
    yield a, b
    await la.aclose()
    await lb.aclose()


async def test_open_connection_and_start_server(nodes: tuple[FakeNode, FakeNode]) -> None:
    a, b = nodes
    seen: list[object] = []

    async def upper(reader: PilotStreamReader, writer: PilotStreamWriter) -> None:
        seen.append(writer.get_extra_info("peername"))
        data = await reader.read(100)
        writer.write(data.upper())
        await writer.drain()

    server = await start_server(b, upper, 1000)
    reader, writer = await open_connection(a, "bee", 1000)
    assert a.tunnels == [2]
    writer.write(b"hello")
    await writer.drain()
    assert await reader.readexactly(5) == b"HELLO"
    assert await reader.read() == b""  # the handler returned: its writer closed
    assert reader.at_eof()
    await writer.aclose()
    assert seen == [("0:0000.0000.0001", writer.get_extra_info("sockname"))]
    await server.aclose()


async def test_echo_service(nodes: tuple[FakeNode, FakeNode]) -> None:
    a, b = nodes
    server = await serve_echo(b)
    reader, writer = await open_connection(a, Address(0, 2), 7)
    writer.write(b"x" * 100_000)
    await writer.write_eof()
    assert await reader.readexactly(100_000) == b"x" * 100_000
    assert await reader.read() == b""
    await writer.aclose()
    await server.aclose()


async def test_refused_and_closed_errors(nodes: tuple[FakeNode, FakeNode]) -> None:
    a, _ = nodes
    with pytest.raises(StreamRefusedError):
        await open_connection(a, "0:0000.0000.0002", 4242)
    with pytest.raises(NodeClosedError):
        await open_connection(FakeNode(Address(0, 9)), 2, 7)


async def test_write_without_drain_is_bounded(nodes: tuple[FakeNode, FakeNode]) -> None:
    a, b = nodes
    server = await serve_echo(b)
    _, writer = await open_connection(a, 2, 7)
    small = PilotStreamWriter(writer.stream, max_backlog=10)
    small.write(b"0123456789")
    with pytest.raises(StreamError, match="without drain"):
        small.write(b"x")
    await small.aclose()
    await server.aclose()


async def test_server_close_stops_accepting(nodes: tuple[FakeNode, FakeNode]) -> None:
    a, b = nodes
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(reader: PilotStreamReader, writer: PilotStreamWriter) -> None:
        started.set()
        await release.wait()

    server = await start_server(b, slow, 2000)
    _, writer = await open_connection(a, 2, 2000)
    await started.wait()
    await server.aclose()  # cancels the running handler
    with pytest.raises(StreamRefusedError):
        await open_connection(a, 2, 2000)
    writer.stream.abort()
