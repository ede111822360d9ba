"""Two stream layers joined by an in-memory link that can drop and reorder packets."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Callable

import pytest
from pilot_node._packet import Address, Flags, Packet
from pilot_node._streams import (
    PilotStream,
    StreamClosedError,
    StreamConfig,
    StreamError,
    StreamLayer,
    StreamRefusedError,
    StreamResetError,
    StreamTruncatedError,
)

A = Address(0, 0xA)
B = Address(0, 0xB)


class Link:
    """Delivers each encoded packet to the other layer on a later loop turn."""

    def __init__(self, *, loss: float = 0.0, reorder: float = 0.0, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.reorder = reorder
        self.layers: dict[int, StreamLayer] = {}
        self.sent: list[Packet] = []
        self.drop: Callable[[Packet], bool] = lambda _p: False
        self.cut = False

    def sender(self) -> Callable[[Packet], None]:
        loop = asyncio.get_running_loop()

        def send(packet: Packet) -> None:
            self.sent.append(packet)
            if self.cut or self.drop(packet):
                return
            if packet.payload and self.rng.random() < self.loss:
                return
            wire = packet.encode()
            target = self.layers[packet.dst.node]
            delay = 0.002 if self.rng.random() < self.reorder else 0.0
            loop.call_later(delay, target.on_packet, Packet.decode(wire))

        return send


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Link, StreamLayer, StreamLayer]]:
    link = Link()
    config = StreamConfig(initial_rto=0.3, min_rto=0.05, close_linger=60.0)
    a = StreamLayer(link.sender(), A, config=config, echo=False)
    b = StreamLayer(link.sender(), B, config=config, echo=False)
    link.layers = {A.node: a, B.node: b}
    yield link, a, b
    await a.aclose()
    await b.aclose()


async def _read_all(stream: PilotStream) -> bytes:
    out = bytearray()
    while data := await stream.read():
        out += data
    return bytes(out)


async def _connected(
    a: StreamLayer, b: StreamLayer, port: int = 7
) -> tuple[PilotStream, PilotStream]:
    listener = b.listen(port)
    client = await a.connect(B, port)
    server = await listener.accept()
    return client, server


@pytest.mark.parametrize(("loss", "reorder"), [(0.0, 0.0), (0.02, 0.0), (0.01, 0.05)])
async def test_bulk_both_ways_is_byte_exact_under_loss_and_reordering(
    pair: tuple[Link, StreamLayer, StreamLayer], loss: float, reorder: float
) -> None:
    link, a, b = pair
    link.loss, link.reorder = loss, reorder
    client, server = await _connected(a, b)
    up = random.Random(1).randbytes(600_000)
    down = random.Random(2).randbytes(400_000)

    async def send(stream: PilotStream, data: bytes) -> None:
        await stream.write(data)
        await stream.write_eof()

    async with asyncio.timeout(60):
        results = await asyncio.gather(
            send(client, up), send(server, down), _read_all(server), _read_all(client)
        )
    assert hashlib.sha256(results[2]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(results[3]).digest() == hashlib.sha256(down).digest()
    if loss:
        assert client.connection.stats["retransmits"] > 0
    await client.aclose()
    await server.aclose()


async def test_half_close_then_answer(pair: tuple[Link, StreamLayer, StreamLayer]) -> None:
    _, a, b = pair
    client, server = await _connected(a, b)
    await client.write(b"request")
    await client.write_eof()
    assert await _read_all(server) == b"request"
    assert await server.read(10) == b""
    with pytest.raises(StreamClosedError):
        await client.write(b"late")
    await server.write(b"response")
    await server.write_eof()
    assert await _read_all(client) == b"response"
    await client.aclose()
    await server.aclose()


async def test_written_then_closed_arrives_whole(
    pair: tuple[Link, StreamLayer, StreamLayer],
) -> None:
    link, a, b = pair
    link.loss = 0.01
    client, server = await _connected(a, b)
    data = random.Random(3).randbytes(1_000_000)
    reader = asyncio.create_task(_read_all(server))
    await client.write(data)
    await client.aclose()  # returns once every byte was acknowledged
    assert client.connection.all_acked
    assert await reader == data
    await server.aclose()


async def test_close_wakes_a_pending_read(pair: tuple[Link, StreamLayer, StreamLayer]) -> None:
    _, a, b = pair
    client, server = await _connected(a, b)
    reader = asyncio.create_task(client.read(10))
    await asyncio.sleep(0)
    await client.aclose()
    with pytest.raises(StreamClosedError):
        await reader
    assert await server.read(10) == b""
    await server.aclose()


async def test_a_close_that_cannot_deliver_raises_truncation_and_the_peer_sees_it(
    pair: tuple[Link, StreamLayer, StreamLayer],
) -> None:
    link, a, b = pair
    a.config = StreamConfig(initial_rto=0.3, close_linger=1.0)
    client, server = await _connected(a, b)
    # From now on nothing from A reaches B except the reset.
    link.drop = lambda p: p.src == A and not p.flags & Flags.RST
    await client.write(b"lost" * 100)
    with pytest.raises(StreamTruncatedError):
        await client.aclose()
    with pytest.raises(StreamResetError):
        await server.read(10)
    await server.aclose()


async def test_dial_to_a_closed_port_is_refused(
    pair: tuple[Link, StreamLayer, StreamLayer],
) -> None:
    _, a, _ = pair
    with pytest.raises(StreamRefusedError):
        await a.connect(B, 99)


async def test_data_to_an_unknown_stream_is_reset(
    pair: tuple[Link, StreamLayer, StreamLayer],
) -> None:
    link, a, b = pair
    client, server = await _connected(a, b)
    # B forgets the stream silently (as after a crash and restart): A's next write is
    # answered with RST.
    link.cut = True
    await b.aclose()
    link.cut = False
    link.layers[B.node] = fresh = StreamLayer(link.sender(), B, echo=False)
    await client.write(b"hello?")
    with pytest.raises(StreamResetError):
        await _read_all(client)
    await server.aclose()
    await fresh.aclose()


async def test_listener_backlog_is_bounded(pair: tuple[Link, StreamLayer, StreamLayer]) -> None:
    _, a, b = pair
    b.listen(8, backlog=2)
    first = await a.connect(B, 8)
    second = await a.connect(B, 8)
    with pytest.raises(StreamRefusedError):
        await a.connect(B, 8)
    await first.aclose()
    await second.aclose()


async def test_listener_close_wakes_accept(pair: tuple[Link, StreamLayer, StreamLayer]) -> None:
    _, _, b = pair
    listener = b.listen(9)
    waiter = asyncio.create_task(listener.accept())
    await asyncio.sleep(0)
    await listener.aclose()
    with pytest.raises(StreamClosedError):
        await waiter
    again = b.listen(9)  # the port is free again
    with pytest.raises(StreamError):
        b.listen(9)
    await again.aclose()


async def test_many_concurrent_streams(pair: tuple[Link, StreamLayer, StreamLayer]) -> None:
    _, a, b = pair
    listener = b.listen(7)

    tasks: set[asyncio.Task[None]] = set()

    async def echo() -> None:
        while True:
            stream = await listener.accept()
            tasks.add(asyncio.create_task(_echo_one(stream)))

    async def _echo_one(stream: PilotStream) -> None:
        while data := await stream.read():
            await stream.write(data)
        await stream.aclose()

    server = asyncio.create_task(echo())

    async def one(i: int) -> bytes:
        stream = await a.connect(B, 7)
        payload = f"stream {i} ".encode() * 50
        await stream.write(payload)
        got = await stream.readexactly(len(payload))
        await stream.aclose()
        return got

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(one(i) for i in range(40)))
    assert results == [f"stream {i} ".encode() * 50 for i in range(40)]
    server.cancel()


async def test_try_write_is_all_or_nothing(pair: tuple[Link, StreamLayer, StreamLayer]) -> None:
    _, a, b = pair
    client, server = await _connected(a, b)
    room = client.write_room()
    assert room == a.config.send_buffer
    assert not client.try_write(b"x" * (room + 1))
    assert client.connection.unsent == 0  # nothing was queued
    assert client.try_write(b"y" * 10)
    assert await server.readexactly(10) == b"y" * 10
    await client.write_eof()
    assert client.write_room() == 0
    assert not client.try_write(b"z")
    assert await server.read() == b""


async def test_a_request_and_its_reply_are_one_packet_each_way() -> None:
    link = Link()
    # A delayed ACK far in the future: any ACK seen must have ridden on the reply.
    config = StreamConfig(delayed_ack=30.0)
    a = StreamLayer(link.sender(), A, config=config, echo=False)
    b = StreamLayer(link.sender(), B, config=config, echo=False)
    link.layers = {A.node: a, B.node: b}
    try:
        client, server = await _connected(a, b)
        for _ in range(3):
            before = len(link.sent)
            assert client.try_write(b"q" * 200)
            assert await server.readexactly(200) == b"q" * 200
            await server.write(b"r" * 200)
            assert await client.readexactly(200) == b"r" * 200
            packets = link.sent[before:]
            assert [(p.src, len(p.payload)) for p in packets] == [(A, 200), (B, 200)]
            assert packets[1].ack == (client.connection.isn + 1 + client.connection.snd_nxt) & (
                0xFFFFFFFF
            )
    finally:
        await a.aclose()
        await b.aclose()


async def test_layer_close_fails_streams_and_stops(
    pair: tuple[Link, StreamLayer, StreamLayer],
) -> None:
    _, a, b = pair
    client, _server = await _connected(a, b)
    reader = asyncio.create_task(client.read(10))
    await asyncio.sleep(0)
    await a.aclose()
    with pytest.raises(StreamError):
        await reader
    with pytest.raises(StreamClosedError):
        await a.connect(B, 7)


async def test_the_built_in_echo_answers_on_port_7() -> None:
    link = Link()
    a = StreamLayer(link.sender(), A, echo=False)
    b = StreamLayer(link.sender(), B)  # echo on by default
    link.layers = {A.node: a, B.node: b}
    try:
        stream = await a.connect(B, 7)
        payload = random.Random(9).randbytes(300_000)
        writer = asyncio.create_task(stream.write(payload))
        assert await stream.readexactly(len(payload)) == payload
        await writer
        await stream.write_eof()
        assert await stream.read() == b""  # the echo ends when we end
        await stream.aclose()
    finally:
        await a.aclose()
        await b.aclose()


async def test_dials_are_paced_per_destination_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of ``dial_burst`` SYNs, then ``dial_rate`` a second (fake clock)."""
    clock = [100.0]
    syn_times: list[tuple[int, float]] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, result: object = None) -> object:
        clock[0] += delay  # pacing waits advance the fake clock only
        return await real_sleep(0, result)

    def send(packet: Packet) -> None:
        if packet.flags == Flags.SYN:
            syn_times.append((packet.dst.node, clock[0]))

    layer = StreamLayer(
        send,
        A,
        config=StreamConfig(dial_burst=3, dial_rate=2.0, syn_retries=0, syn_rto=1000.0),
        clock=lambda: clock[0],
        echo=False,
    )
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    dials: list[asyncio.Task[PilotStream]] = []

    async def dial(node: Address) -> None:
        # One dial at a time: wait until its SYN went out before starting the next.
        sent = len(syn_times)
        dials.append(asyncio.create_task(layer.connect(node, 7)))
        while len(syn_times) == sent:
            await real_sleep(0)

    try:
        for _ in range(6):
            await dial(B)
        before = clock[0]
        await dial(Address(0, 0xC))
        to_b = [t - 100.0 for node, t in syn_times if node == B.node]
        assert to_b == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.5])
        assert clock[0] == before  # another node has a bucket of its own: no wait
        for task in dials:
            task.cancel()
        await asyncio.gather(*dials, return_exceptions=True)
    finally:
        monkeypatch.undo()
        await layer.aclose()


async def test_a_batch_of_segments_is_answered_once_at_its_end(
    pair: tuple[Link, StreamLayer, StreamLayer],
) -> None:
    link, a, b = pair
    client, server = await _connected(a, b)
    held: list[Packet] = []

    def hold(packet: Packet) -> bool:
        if packet.src == A and packet.payload:
            held.append(packet)
            return True
        return False

    link.drop = hold
    mss = a.config.mss
    payload = bytes(range(256)) * (6 * mss // 256)
    await client.write(payload)
    assert len(held) == 6
    link.drop = lambda _p: False
    sent_before = len(link.sent)

    b.begin_batch()
    for packet in held:
        b.on_packet(packet)
    assert len(link.sent) == sent_before  # nothing leaves during the batch
    b.end_batch()
    b.end_batch()  # safe to repeat
    answers = [p for p in link.sent[sent_before:] if p.src == B]
    # One ACK per two in-order segments (as without a batch), sent together at the end.
    assert len(answers) == 3
    assert all(p.flags == Flags.ACK and not p.payload for p in answers)
    assert await server.readexactly(len(payload)) == payload
    await client.drain()
    assert client.connection.all_acked


async def test_a_new_local_address_resets_old_streams_and_serves_new_ones(
    pair: tuple[Link, StreamLayer, StreamLayer],
) -> None:
    link, a, b = pair
    listener = b.listen(5000)
    client = await a.connect(B, 5000)
    server = await listener.accept()
    pending = asyncio.create_task(server.read())
    await asyncio.sleep(0)
    b2 = Address(0, 0xB2)
    link.layers[b2.node] = b
    b.set_local_address(b2)
    b.set_local_address(b2)  # the same address again changes nothing
    assert b.local_address == b2
    with pytest.raises(StreamResetError, match="address changed"):
        await asyncio.wait_for(pending, 10)
    with pytest.raises(StreamResetError, match="address changed"):
        await server.write(b"late")
    # The reset went to the peer as well.
    with pytest.raises(StreamResetError):
        await asyncio.wait_for(client.read(), 10)
    assert b.connections == []
    # The listener survived the change: a dial to the new address is served from it.
    listener_stream = asyncio.create_task(listener.accept())
    again = await a.connect(b2, 5000)
    accepted = await asyncio.wait_for(listener_stream, 10)
    assert accepted.connection.local == b2
    await again.write(b"to the new address")
    assert await accepted.readexactly(18) == b"to the new address"
    # And dials from this layer carry the new address.
    a.listen(6000)
    outbound = await b.connect(A, 6000)
    assert outbound.connection.local == b2
    for stream in (again, accepted, outbound, client, server):
        stream.abort()
