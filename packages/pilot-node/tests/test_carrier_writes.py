"""The pilotnode:// carrier's synchronous write path (``write_room``/``try_write``).

Needs pilot-transport (the ``transport`` extra); skipped with only pilot-node's own
dependencies installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("pilot_transport")

from pilot_node._packet import Address, Packet
from pilot_node._streams import PilotStream, StreamConfig, StreamLayer
from pilot_node.carrier import (
    _Stream,  # pyright: ignore[reportPrivateUsage]
)

A = Address(0, 0xA)
B = Address(0, 0xB)


@pytest.fixture
async def streams() -> AsyncIterator[tuple[PilotStream, PilotStream, list[Packet]]]:
    sent: list[Packet] = []
    layers: dict[int, StreamLayer] = {}
    loop = asyncio.get_running_loop()

    def send(packet: Packet) -> None:
        sent.append(packet)
        loop.call_soon(layers[packet.dst.node].on_packet, Packet.decode(packet.encode()))

    config = StreamConfig(delayed_ack=0.001)
    a = StreamLayer(send, A, config=config, echo=False)
    b = StreamLayer(send, B, config=config, echo=False)
    layers.update({A.node: a, B.node: b})
    listener = b.listen(7)
    client = await a.connect(B, 7)
    server = await listener.accept()
    yield client, server, sent
    await a.aclose()
    await b.aclose()


async def test_try_write_sends_at_once_when_nothing_is_in_flight(
    streams: tuple[PilotStream, PilotStream, list[Packet]],
) -> None:
    client, server, sent = streams
    carrier = _Stream(client)
    assert carrier.write_room() == client.write_room() > 0
    before = len(sent)
    assert carrier.try_write(b"c" * 200)
    # The segment left before try_write returned.
    assert [len(p.payload) for p in sent[before:]] == [200]
    assert await server.readexactly(200) == b"c" * 200


async def test_with_data_in_flight_try_write_declines_and_queues_nothing(
    streams: tuple[PilotStream, PilotStream, list[Packet]],
) -> None:
    client, server, _ = streams
    carrier = _Stream(client)
    conn = client.connection
    assert carrier.try_write(b"1" * 100)
    assert conn.snd_nxt > conn.snd_una  # not acknowledged yet
    # Busy: the caller's writer gathers concurrent writes into one TLS record instead.
    assert carrier.write_room() == 0
    assert not carrier.try_write(b"2" * 100)
    assert conn.unsent == 0
    assert conn.snd_nxt == 100
    assert await server.readexactly(100) == b"1" * 100
    async with asyncio.timeout(30):  # a failure bound only
        await client.drain()  # the peer's ACK arrived
    assert carrier.write_room() > 0
    await carrier.write(b"3" * 50)
    assert await server.readexactly(50) == b"3" * 50


async def test_no_room_after_write_eof_or_close(
    streams: tuple[PilotStream, PilotStream, list[Packet]],
) -> None:
    client, server, _ = streams
    carrier = _Stream(client)
    await carrier.write_eof()
    assert carrier.write_room() == 0
    assert not carrier.try_write(b"x")
    assert await server.read() == b""
    await carrier.aclose()
    assert carrier.write_room() == 0
