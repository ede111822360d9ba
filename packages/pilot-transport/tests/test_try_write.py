"""Synchronous writes (``try_write``): all of the bytes at once, or nothing, on every carrier."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from pilot_transport import Identity, SecureStream, TrustedPeer, TrustStore
from pilot_transport._carrier import CarrierStream, DialTarget
from pilot_transport._carriers.memory import memory_stream_pair
from pilot_transport._carriers.pilot import PilotCarrier, PilotStream
from pilot_transport._carriers.tcp import TcpCarrier
from pilot_transport._tls import TLSConfig, client_handshake, server_handshake
from pilot_transport.errors import StreamClosedError
from pilot_transport.testing._daemon_double import PilotDaemonDouble, PilotNetworkDouble

ALICE = Identity.generate()
BOB = Identity.generate()


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):  # a failure bound, not a measurement
        while not condition():
            await asyncio.sleep(0.005)


async def read_exactly(stream: CarrierStream | SecureStream, size: int) -> bytes:
    data = bytearray()
    async with asyncio.timeout(10):
        while len(data) < size:
            chunk = await stream.read(size - len(data))
            assert chunk, f"EOF after {len(data)} of {size} bytes"
            data += chunk
    return bytes(data)


async def fill_until_blocked(
    stream: CarrierStream | SecureStream,
) -> tuple[asyncio.Task[None], int]:
    """Start async writes of 64 KiB pieces until one has to wait; return it and the total."""
    total = 0
    while True:
        task = asyncio.create_task(stream.write(os.urandom(64 * 1024)))
        total += 64 * 1024
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if not task.done():
            return task, total
        await task
        assert total < 64 * 1024 * 1024, "the carrier never applied backpressure"


# -- memory:// ------------------------------------------------------------------------------


async def test_memory_try_write_takes_all_when_idle_and_nothing_beyond_the_limit() -> None:
    a, b = memory_stream_pair(buffer_size=1000)
    assert a.write_room() == 1000
    assert a.try_write(b"x" * 600)
    assert a.write_room() == 400
    assert not a.try_write(b"y" * 401)  # would go above the limit: refused whole
    assert a.try_write(b"z" * 400)
    assert not a.try_write(b"w")
    assert await read_exactly(b, 1000) == b"x" * 600 + b"z" * 400
    assert a.try_write(b"after")
    assert await read_exactly(b, 5) == b"after"
    await a.write_eof()
    assert a.write_room() == 0
    assert not a.try_write(b"late")
    assert await b.read() == b""


async def test_memory_try_write_refuses_while_a_write_waits() -> None:
    a, b = memory_stream_pair(buffer_size=1000)
    writer = asyncio.create_task(a.write(b"a" * 1500))
    await until(lambda: a._out.write_waiter is not None)
    assert not a.try_write(b"b")
    assert await read_exactly(b, 1500) == b"a" * 1500
    await writer
    assert a.try_write(b"c")
    assert await read_exactly(b, 1) == b"c"
    await a.aclose()
    assert not a.try_write(b"d")
    with pytest.raises(StreamClosedError):
        await a.write(b"d")


# -- tcp:// --------------------------------------------------------------------------------


async def test_tcp_try_write_accepts_when_idle_and_refuses_above_the_high_water_mark() -> None:
    server = TcpCarrier()
    listener = await server.bind(1)
    client = TcpCarrier()
    try:
        stream = await client.dial(DialTarget(endpoint=server.endpoint), 1)
        assert stream.try_write(b"hello")  # the virtual-port header goes with it
        accepted = await listener.accept()
        assert await read_exactly(accepted, 5) == b"hello"
        room = stream.write_room()
        assert room > 0
        assert not stream.try_write(b"x" * (room + 1))  # never beyond the high-water mark

        # Nobody reads: async writes fill the buffers until one waits for the drain.
        writer, written = await fill_until_blocked(stream)
        assert stream.write_room() == 0
        assert not stream.try_write(b"refused")
        received = await read_exactly(accepted, written)
        await writer
        # Everything the async writes sent arrived, and nothing of the refused write.
        assert len(received) == written
        assert stream.try_write(b"end")
        await stream.write_eof()
        assert await read_exactly(accepted, 3) == b"end"
        assert await accepted.read() == b""
        assert not stream.try_write(b"after eof")
    finally:
        await client.aclose()
        await server.aclose()


# -- pilot:// ------------------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ptw-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def pilot_pair(sock_dir: str) -> AsyncIterator[tuple[PilotStream, PilotStream]]:
    network = PilotNetworkDouble()
    async with (
        PilotDaemonDouble(f"{sock_dir}/a.sock", network=network, hostname="alpha") as a,
        PilotDaemonDouble(f"{sock_dir}/b.sock", network=network, hostname="beta", public=True) as b,
        PilotCarrier(a.socket_path) as ca,
        PilotCarrier(b.socket_path) as cb,
    ):
        listener = await cb.bind(5000)
        client = await ca.dial(DialTarget(name="b", address=str(b.address)), 5000)
        server = await listener.accept()
        yield client, server


async def test_pilot_try_write_accepts_when_idle(
    pilot_pair: tuple[PilotStream, PilotStream],
) -> None:
    client, server = pilot_pair
    assert client.try_write(b"ping")
    assert await read_exactly(server, 4) == b"ping"
    assert server.try_write(b"pong")
    assert await read_exactly(client, 4) == b"pong"


async def test_pilot_try_write_refuses_beyond_credit_and_while_a_write_waits(
    pilot_pair: tuple[PilotStream, PilotStream],
) -> None:
    client, server = pilot_pair
    # The reader does not read: a large write uses up the credit and waits for more.
    data = os.urandom(2 * 1024 * 1024)
    writer = asyncio.create_task(client.write(data))
    await until(lambda: client._send_credit <= 0)
    assert client.write_room() == 0
    assert not client.try_write(b"refused")  # no credit, and a write holds the lock
    assert await read_exactly(server, len(data)) == data
    await writer
    # Credit is back; a piece larger than the room is refused whole.
    room = client.write_room()
    assert room > 0
    assert not client.try_write(b"y" * (room + 1))
    assert client.try_write(b"z" * 10)
    await client.write_eof()
    assert await read_exactly(server, 10) == b"z" * 10
    assert await server.read() == b""
    assert not client.try_write(b"after eof")


async def test_pilot_secure_stream_try_write(pilot_pair: tuple[PilotStream, PilotStream]) -> None:
    client, server = await _secure(*pilot_pair)
    assert client.try_write(b"over pilot")
    assert await read_exactly(server, 10) == b"over pilot"
    assert server.try_write(b"and back")
    assert await read_exactly(client, 8) == b"and back"


# -- the TLS layer ---------------------------------------------------------------------------


def _store(name: str, identity: Identity) -> TrustStore:
    return TrustStore.in_memory([TrustedPeer(name, identity.public_key)])


async def _secure(
    a: CarrierStream, b: CarrierStream | Callable[[], Awaitable[CarrierStream]]
) -> tuple[SecureStream, SecureStream]:
    """Handshake over ``a`` (client) and ``b`` (server; or how to accept it, concurrently)."""

    async def serve() -> SecureStream:
        inbound = b if isinstance(b, CarrierStream) else await b()
        return await server_handshake(inbound, TLSConfig(BOB, _store("alice", ALICE)))

    client, server = await asyncio.gather(
        client_handshake(
            a,
            TLSConfig(ALICE, _store("bob", BOB)),
            expected_key=BOB.public_key,
            expected_name="bob",
            target="bob",
        ),
        serve(),
    )
    return client, server


async def memory_secure_pair(buffer_size: int = 256 * 1024) -> tuple[SecureStream, SecureStream]:
    return await _secure(*memory_stream_pair(buffer_size=buffer_size))


async def test_secure_try_write_sends_whole_records_when_idle() -> None:
    client, server = await memory_secure_pair()
    message = os.urandom(100_000)  # several TLS records, all in one carrier write
    assert client.try_write(message)
    assert client._outgoing.pending == 0
    assert await read_exactly(server, len(message)) == message
    assert server.try_write(b"")  # nothing to send: done
    assert server.try_write(bytearray(b"reply"))
    assert await read_exactly(client, 5) == b"reply"


async def test_secure_try_write_refuses_without_side_effects_when_the_carrier_is_full() -> None:
    client, server = await memory_secure_pair(buffer_size=4096)
    assert not client.try_write(b"x" * 5000)  # the ciphertext could not fit: nothing encrypted
    assert client._outgoing.pending == 0
    assert client.try_write(b"y" * 1000)
    # A refused write left nothing behind: the peer decrypts exactly what was accepted,
    # and the TLS record sequence is intact for what follows.
    reader = asyncio.create_task(read_exactly(server, 6000))
    await client.write(b"z" * 5000)
    assert await reader == b"y" * 1000 + b"z" * 5000
    assert not client.try_write(b"w" * (256 * 1024 + 1))  # beyond one write chunk: use write()


async def test_secure_try_write_refuses_while_an_async_write_holds_the_lock() -> None:
    client, server = await memory_secure_pair(buffer_size=64 * 1024)
    writer, written = await fill_until_blocked(client)
    assert client._write_lock.locked()
    assert not client.try_write(b"refused")
    received = await read_exactly(server, written)
    await writer
    assert len(received) == written
    assert client.try_write(b"accepted")
    assert await read_exactly(server, 8) == b"accepted"


async def test_secure_try_write_on_a_closed_or_half_closed_stream_sends_nothing() -> None:
    client, server = await memory_secure_pair()
    await client.write_eof()
    assert not client.try_write(b"late")
    assert await server.read() == b""
    await server.aclose()
    assert not server.try_write(b"closed")
    with pytest.raises(StreamClosedError):
        await server.write(b"closed")
    await client.aclose()


@pytest.mark.parametrize("carrier", ["memory", "tcp"])
async def test_secure_try_write_interleaves_with_async_writes_in_order(carrier: str) -> None:
    pair: Callable[[], Awaitable[tuple[SecureStream, SecureStream]]]
    carriers: list[TcpCarrier] = []
    if carrier == "memory":
        pair = memory_secure_pair
    else:

        async def pair() -> tuple[SecureStream, SecureStream]:
            server_carrier = TcpCarrier()
            client_carrier = TcpCarrier()
            carriers.extend((server_carrier, client_carrier))
            listener = await server_carrier.bind(1)
            dialled = await client_carrier.dial(DialTarget(endpoint=server_carrier.endpoint), 1)
            # The listener sees the connection once the dialler's first flight arrives.
            return await _secure(dialled, listener.accept)

    try:
        client, server = await pair()
        pieces = [os.urandom(1 + (i * 7919) % 40_000) for i in range(200)]
        reader = asyncio.create_task(read_exactly(server, sum(map(len, pieces))))
        expected = bytearray()
        synchronous = 0
        for i, piece in enumerate(pieces):
            if i % 3 and client.try_write(piece):
                synchronous += 1
            else:
                await client.write(piece)
            expected += piece
            await asyncio.sleep(0)  # let the reader take some
        assert synchronous > 0
        assert await reader == bytes(expected)
        await client.aclose()
        await server.aclose()
    finally:
        for c in carriers:
            await c.aclose()


async def test_secure_write_with_room_completes_without_suspending() -> None:
    # A small write the carrier can take at once is encrypted and handed over
    # synchronously (no lock, no carrier coroutine): its coroutine finishes on
    # its first step.
    client, server = await memory_secure_pair()
    step = client.write(b"no wait")
    with pytest.raises(StopIteration):
        step.send(None)
    assert await read_exactly(server, 7) == b"no wait"


async def test_secure_write_without_room_waits_and_keeps_the_order() -> None:
    client, server = await memory_secure_pair(buffer_size=4096)
    first = os.urandom(3000)
    assert client.try_write(first)
    second = os.urandom(3000)  # more than the carrier has room for: the waiting path
    writer = asyncio.create_task(client.write(second))
    await asyncio.sleep(0)
    assert not writer.done()
    third = asyncio.create_task(client.write(b"third"))
    assert await read_exactly(server, 6005) == first + second + b"third"
    await writer
    await third
