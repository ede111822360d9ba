"""A conformance check any connected byte-stream pair must pass.

Works for carrier streams (``CarrierStream``) and for ``SecureStream``: both
have ``read``, ``write``, ``write_eof`` and ``aclose`` with the same meaning.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

from pilot_transport.errors import StreamClosedError, StreamError

__all__ = ["ByteStream", "StreamPairFactory", "check_stream_conformance"]


class ByteStream(Protocol):
    """What the check needs from a stream."""

    async def read(self, max_bytes: int = 65536, /) -> bytes: ...

    async def write(self, data: bytes | bytearray | memoryview, /) -> None: ...

    async def write_eof(self) -> None: ...

    async def aclose(self) -> None: ...


StreamPairFactory = Callable[[], Awaitable[tuple[ByteStream, ByteStream]]]
"""Returns a fresh pair of connected streams ``(a, b)``: what ``a`` writes, ``b`` reads."""


def _pattern(size: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (so reordering or corruption is detected)."""
    return random.Random(seed).randbytes(size)


async def _read_exactly(stream: ByteStream, size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size:
        data = await stream.read(min(65536, size - got))
        assert data, f"unexpected EOF after {got} of {size} bytes"
        assert len(data) <= size - got, "read returned more than max_bytes"
        parts.append(data)
        got += len(data)
    return b"".join(parts)


async def _read_to_eof(stream: ByteStream) -> bytes:
    parts: list[bytes] = []
    while data := await stream.read(65536):
        parts.append(data)
    return b"".join(parts)


async def _write_in_pieces(stream: ByteStream, data: bytes, sizes: tuple[int, ...]) -> None:
    offset = 0
    index = 0
    while offset < len(data):
        size = sizes[index % len(sizes)]
        await stream.write(data[offset : offset + size])
        offset += size
        index += 1


async def _close_pair(a: ByteStream, b: ByteStream) -> None:
    for stream in (a, b):
        with contextlib.suppress(Exception):
            await stream.aclose()


async def _check_ordered_delivery(a: ByteStream, b: ByteStream) -> None:
    for sender, receiver, seed in ((a, b, 1), (b, a, 2)):
        data = _pattern(200_000, seed)
        writer = asyncio.create_task(_write_in_pieces(sender, data, (1, 7, 100, 4096, 65537, 3)))
        received = await _read_exactly(receiver, len(data))
        await writer
        assert received == data, "bytes arrived out of order or altered"


async def _check_read_limits(a: ByteStream, b: ByteStream) -> None:
    await a.write(b"x" * 100)
    data = await b.read(10)
    assert 1 <= len(data) <= 10, f"read(10) returned {len(data)} bytes"
    rest = await _read_exactly(b, 100 - len(data))
    assert data + rest == b"x" * 100
    await a.write(b"")  # an empty write is a no-op
    await a.write(bytearray(b"ab"))
    await a.write(memoryview(b"cd"))
    assert await _read_exactly(b, 4) == b"abcd", "bytearray/memoryview writes"


async def _check_half_close(a: ByteStream, b: ByteStream) -> None:
    await a.write(b"request")
    await a.write_eof()
    assert await _read_to_eof(b) == b"request"
    assert await b.read(10) == b"", "reads after EOF must keep returning b''"
    with contextlib.suppress(StreamClosedError):
        await a.write(b"late")
        raise AssertionError("write after write_eof() must raise StreamClosedError")
    # The other direction still works.
    await b.write(b"response")
    await b.write_eof()
    assert await _read_to_eof(a) == b"response"


async def _check_large_write(a: ByteStream, b: ByteStream, size: int) -> None:
    data = _pattern(size, 3)
    writer = asyncio.create_task(a.write(data))
    received = await _read_exactly(b, size)
    await writer
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest(), (
        f"a single {size}-byte write arrived altered"
    )


async def _check_full_duplex(a: ByteStream, b: ByteStream, size: int) -> None:
    # Both sides write a lot before reading: a stream whose writer blocks its own
    # reader (or that buffers without bound) deadlocks or blows up here.
    data_a = _pattern(size, 4)
    data_b = _pattern(size, 5)

    async def side(stream: ByteStream, out: bytes, expected: bytes) -> None:
        writer = asyncio.create_task(stream.write(out))
        received = await _read_exactly(stream, len(expected))
        await writer
        assert received == expected, "full-duplex transfer altered the bytes"

    await asyncio.gather(side(a, data_a, data_b), side(b, data_b, data_a))


async def _check_cancelled_read(a: ByteStream, b: ByteStream) -> None:
    for _ in range(3):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(b.read(100), timeout=0.02)
            raise AssertionError("read returned data nobody wrote")
    await a.write(b"after-cancel")
    assert await _read_exactly(b, 12) == b"after-cancel", "a cancelled read lost or ate data"
    # Cancel a reader while data is arriving: nothing may be lost.
    data = _pattern(100_000, 6)
    reader = asyncio.create_task(b.read(1))
    await a.write(data)
    first = await reader
    assert await _read_exactly(b, len(data) - len(first)) == data[len(first) :]


async def _check_close(a: ByteStream, b: ByteStream) -> None:
    await a.write(b"last words")
    await a.aclose()
    await a.aclose()  # idempotent
    assert await _read_to_eof(b) == b"last words", "data written before aclose() must arrive"
    assert await b.read(1) == b""
    for operation in (a.read(10), a.write(b"x")):
        with contextlib.suppress(StreamClosedError):
            await operation
            raise AssertionError("using a closed stream must raise StreamClosedError")
    # A write to a peer that closed either succeeds (buffered) or fails as a stream error.
    with contextlib.suppress(StreamError):
        await b.write(b"to nobody")
    await b.aclose()


async def _check_close_wakes_reader(a: ByteStream, b: ByteStream) -> None:
    reader = asyncio.create_task(a.read(10))
    await asyncio.sleep(0)  # let the read start waiting; no condition to wait for
    await a.aclose()
    done, _ = await asyncio.wait({reader}, timeout=5)
    assert done, "aclose() must wake a pending read on the same stream"
    error = reader.exception()
    assert isinstance(error, StreamClosedError), f"pending read got {error!r}"
    # The peer sees EOF (or a reset) promptly rather than hanging.
    with contextlib.suppress(StreamError):
        assert await _read_to_eof(b) == b""


async def check_stream_conformance(
    make_pair: StreamPairFactory,
    *,
    large_size: int = 4 * 1024 * 1024,
    timeout: float = 60.0,  # noqa: ASYNC109  # per-check limit, applied with asyncio.timeout
) -> None:
    """Check that streams from ``make_pair`` behave as pilot-transport streams must.

    Each check uses a fresh pair: ordered delivery both ways, ``read`` limits,
    half-close, one ``large_size`` write, full-duplex transfer, cancellation of
    a pending read, and close semantics (data before close arrives, reads then
    return ``b""``, use after close raises ``StreamClosedError``, ``aclose`` is
    idempotent and wakes a pending read).

    Raises:
        AssertionError: a check failed; the message names it.
    """
    checks: list[tuple[str, Callable[[ByteStream, ByteStream], Awaitable[None]]]] = [
        ("ordered delivery", _check_ordered_delivery),
        ("read limits", _check_read_limits),
        ("half-close", _check_half_close),
        ("large write", lambda a, b: _check_large_write(a, b, large_size)),
        ("full duplex", lambda a, b: _check_full_duplex(a, b, large_size)),
        ("cancelled read", _check_cancelled_read),
        ("close", _check_close),
        ("close wakes reader", _check_close_wakes_reader),
    ]
    for name, check in checks:
        a, b = await make_pair()
        try:
            async with asyncio.timeout(timeout):
                await check(a, b)
        except TimeoutError as exc:
            raise AssertionError(f"stream conformance: {name!r} hung for {timeout}s") from exc
        except AssertionError as exc:
            raise AssertionError(f"stream conformance: {name!r} failed: {exc}") from exc
        finally:
            await _close_pair(a, b)
