"""Property: whatever the write and read sizes, a SecureStream delivers the bytes intact."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pilot_transport import Identity, TrustedPeer, TrustStore
from pilot_transport._carriers.memory import memory_stream_pair
from pilot_transport._tls import TLSConfig, client_handshake, server_handshake

A = Identity.generate()
B = Identity.generate()
CLIENT = TLSConfig(A, TrustStore.in_memory([TrustedPeer("b", B.public_key)]))
SERVER = TLSConfig(B, TrustStore.in_memory([TrustedPeer("a", A.public_key)]))


async def _transfer(writes: list[int], read_size: int, buffer: int, half_close: bool) -> None:
    left, right = memory_stream_pair(buffer_size=buffer)
    client, server = await asyncio.gather(
        client_handshake(left, CLIENT, expected_key=B.public_key, expected_name="b", target="b"),
        server_handshake(right, SERVER),
    )
    data = bytes(i % 251 for i in range(sum(writes)))

    async def send() -> None:
        offset = 0
        for size in writes:
            await client.write(data[offset : offset + size])
            offset += size
        if half_close:
            await client.write_eof()
        else:
            await client.aclose()

    async def receive() -> bytes:
        got = bytearray()
        while chunk := await server.read(read_size):
            assert len(chunk) <= read_size
            got += chunk
        return bytes(got)

    _, received = await asyncio.gather(send(), receive())
    assert received == data
    await client.aclose()
    await server.aclose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    writes=st.lists(st.integers(0, 70_000), max_size=12),
    read_size=st.integers(1, 100_000),
    buffer=st.sampled_from([1, 100, 16_384, 256 * 1024]),
    half_close=st.booleans(),
)
def test_secure_stream_delivers_any_chunking(
    writes: list[int], read_size: int, buffer: int, half_close: bool
) -> None:
    async def bounded() -> None:
        # Each example gets its own limit, so a hang fails the example instead of
        # leaving hypothesis to shrink through more hangs.
        async with asyncio.timeout(30):
            await _transfer(writes, read_size, buffer, half_close)

    asyncio.run(bounded())
