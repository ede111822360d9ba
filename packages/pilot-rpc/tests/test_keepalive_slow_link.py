"""Keepalive on a slow link: a ping queued behind a large upload must not kill the connection.

The client's output is one FIFO buffer, so a ping queued while a large request is
still leaving can only be answered once the whole request has been sent. Writes
that keep completing show the peer is still taking bytes; a peer that stops
reading stops them, and must still be detected.

Time here is virtual: each test runs on an event loop whose clock advances only
when every task is waiting (it jumps to the next timer), so the link's rate and
the keepalive's timeouts relate exactly as written, however loaded the machine
is. The streams are in memory, so no real I/O is waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import pytest
from pilot_rpc import CallContext, ClientOptions, RetryPolicy, RpcClient, RpcServer, Unavailable
from pilot_rpc import _protocol as P
from pilot_rpc._memory import MemoryStream, memory_stream_pair
from pilot_rpc.testing import InMemoryTransport, fake_peer

# The slow link: a send buffer of _SEND_BUFFER bytes (like a socket's) drained at
# the link's rate, _PIECE bytes every _PIECE_DELAY seconds (32 KiB / 12.5 ms, about
# 2.6 MB/s). Once the buffer is full a 256 KiB driver write completes about every
# 0.1 s, well inside the ping's timeout; the whole request takes ~1.6 s, well
# beyond interval + timeout. A send buffer smaller than the driver's 256 KiB write
# chunk makes a write started outside the writer task suspend (the last test).
_PIECE = 32 * 1024
_PIECE_DELAY = 0.0125
_SEND_BUFFER = 512 * 1024
_REQUEST_SIZE = 4 * 1024 * 1024
_INTERVAL = 0.2
_TIMEOUT = 0.4


class _AutojumpSelector(selectors.BaseSelector):
    """Never sleeps: when nothing is ready, moves the virtual clock to the next timer."""

    def __init__(self) -> None:
        self._inner = selectors.DefaultSelector()
        self.now = 0.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if not ready and timeout is not None and timeout > 0:
            self.now += timeout
        elif not ready and timeout is None:
            raise RuntimeError("every task waits and no timer is set: the test would hang")
        return ready

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class _VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._autojump = _AutojumpSelector()
        super().__init__(self._autojump)

    def time(self) -> float:
        return self._autojump.now


def _run_in_virtual_time(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = _VirtualTimeLoop()
    try:
        loop.run_until_complete(test())
    finally:
        loop.close()


class ThrottledStream:
    """A client end whose bytes reach the server at the slow link's rate.

    ``write`` returns once what it handed over fits in the send buffer; a pump
    task (owned here, stopped by ``aclose``) forwards the buffer in pieces.
    """

    def __init__(self, inner: MemoryStream, send_buffer: int = _SEND_BUFFER) -> None:
        self._inner = inner
        self._send_buffer = send_buffer
        self.peer = inner.peer
        self.local = inner.local
        self.bytes_forwarded = 0
        self._buffer = bytearray()
        self._has_data = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._error: Exception | None = None
        self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    async def _run_pump(self) -> None:
        try:
            while True:
                await self._has_data.wait()
                await asyncio.sleep(_PIECE_DELAY)  # the link's rate, not a wait for a condition
                piece = bytes(self._buffer[:_PIECE])
                del self._buffer[:_PIECE]
                if not self._buffer:
                    self._has_data.clear()
                if len(self._buffer) <= self._send_buffer:
                    self._room.set()
                await self._inner.write(piece)
                self.bytes_forwarded += len(piece)
        except Exception as exc:
            self._error = exc
            self._room.set()

    async def read(self, max_bytes: int = 65536) -> bytes:
        return await self._inner.read(max_bytes)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._buffer += data
        self._has_data.set()
        while len(self._buffer) > self._send_buffer and self._error is None:
            self._room.clear()
            await self._room.wait()
        if self._error is not None:
            raise self._error

    async def write_eof(self) -> None:
        await self._inner.write_eof()

    async def aclose(self) -> None:
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        await self._inner.aclose()

    def break_connection(self) -> None:
        self._inner.break_connection()


class SlowLinkTransport(InMemoryTransport):
    """``InMemoryTransport`` whose client-to-server direction is throttled."""

    def __init__(self, server: RpcServer, send_buffer: int = _SEND_BUFFER) -> None:
        super().__init__(server, client_name="client", server_name="server")
        self.throttled: list[ThrottledStream] = []
        self._send_buffer = send_buffer

    async def connect(self, peer: str, port: int, *, timeout: float | None = None) -> Any:
        inner = await super().connect(peer, port, timeout=timeout)
        stream = ThrottledStream(inner, self._send_buffer)
        self.throttled.append(stream)
        return stream


def _size_server() -> RpcServer:
    server = RpcServer()

    @server.unary("size")
    async def size(request: bytes, ctx: CallContext) -> int:
        return len(request)

    return server


def _options() -> ClientOptions:
    return ClientOptions(
        keepalive_interval=_INTERVAL, keepalive_timeout=_TIMEOUT, retry=RetryPolicy.disabled()
    )


def test_large_request_on_slow_link_survives_keepalive() -> None:
    _run_in_virtual_time(_large_request_on_slow_link_survives_keepalive)


async def _large_request_on_slow_link_survives_keepalive() -> None:
    server = _size_server()
    transport = SlowLinkTransport(server)
    client = RpcClient(transport, options=_options())
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        result = await client.call("server", 1, "size", b"x" * _REQUEST_SIZE, timeout=60)
        elapsed = loop.time() - started
        assert result == _REQUEST_SIZE
        # The upload really outlasted a ping's interval + timeout on this link.
        assert elapsed > 2 * (_INTERVAL + _TIMEOUT)
        assert len(transport.throttled) == 1
        assert transport.throttled[0].bytes_forwarded > _REQUEST_SIZE
        # The same connection is still alive and usable: not declared dead.
        assert client.connections() == 1
        assert await client.call("server", 1, "size", b"abc", timeout=10) == 3
        assert len(transport.throttled) == 1
    finally:
        await client.aclose()
        await transport.aclose()


class _StalledPeerTransport:
    """Connects to a peer that says hello, then never reads or writes again."""

    url = "memory-rpc://"

    def __init__(self) -> None:
        self.server_ends: list[MemoryStream] = []

    async def connect(self, peer: str, port: int, *, timeout: float | None = None) -> MemoryStream:
        # The client's first 256 KiB write fits in the pipe; the next fills it and
        # never completes, as writes to a peer that stopped reading do.
        client_end, server_end = memory_stream_pair(
            fake_peer("client"), fake_peer(peer), max_buffer=_SEND_BUFFER
        )
        self.server_ends.append(server_end)
        await server_end.write(P.Connection(P.Role.SERVER).data_to_send())
        return client_end

    async def aclose(self) -> None:
        for end in self.server_ends:
            await end.aclose()


def test_peer_that_stops_reading_is_still_declared_dead() -> None:
    _run_in_virtual_time(_peer_that_stops_reading_is_still_declared_dead)


async def _peer_that_stops_reading_is_still_declared_dead() -> None:
    transport = _StalledPeerTransport()
    client = RpcClient(transport, options=_options())
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(Unavailable, match="did not answer a ping"):
            await client.call("server", 1, "size", b"x" * _REQUEST_SIZE, timeout=30)
        assert loop.time() - started < 5
    finally:
        await client.aclose()
        await transport.aclose()


def test_a_write_suspended_under_backpressure_is_finished_by_the_writer_task() -> None:
    _run_in_virtual_time(_a_write_suspended_under_backpressure_is_finished_by_the_writer_task)


async def _a_write_suspended_under_backpressure_is_finished_by_the_writer_task() -> None:
    """A lone call's write starts in the caller's task; when the stream makes it
    wait (a send buffer smaller than one driver write), the writer task must
    finish it and the connection stays healthy."""
    server = _size_server()
    transport = SlowLinkTransport(server, send_buffer=16 * 1024)
    client = RpcClient(transport, options=ClientOptions(retry=RetryPolicy.disabled()))
    big = 1024 * 1024
    try:
        assert await client.call("server", 1, "size", b"a", timeout=30) == 1
        assert await client.call("server", 1, "size", b"y" * big, timeout=60) == big
        assert await client.call("server", 1, "size", b"abc", timeout=30) == 3
        assert client.connections() == 1
        assert len(transport.throttled) == 1
    finally:
        await client.aclose()
        await transport.aclose()


def test_a_small_call_does_not_wait_behind_a_large_upload() -> None:
    _run_in_virtual_time(_a_small_call_does_not_wait_behind_a_large_upload)


async def _a_small_call_does_not_wait_behind_a_large_upload() -> None:
    """Pieces of a large request leave after control frames and small calls, so a
    call started while a 4 MiB upload crawls over the slow link is answered first."""
    server = _size_server()
    transport = SlowLinkTransport(server)
    client = RpcClient(transport, options=_options())
    try:
        assert await client.call("server", 1, "size", b"", timeout=10) == 0  # connected
        upload = asyncio.create_task(
            client.call("server", 1, "size", b"x" * _REQUEST_SIZE, timeout=60)
        )
        # Wait until the upload is really under way on the link.
        while transport.throttled[0].bytes_forwarded < _REQUEST_SIZE // 8:
            await asyncio.sleep(_PIECE_DELAY)
        assert await client.call("server", 1, "size", b"abc", timeout=60) == 3
        assert not upload.done()
        assert transport.throttled[0].bytes_forwarded < _REQUEST_SIZE // 2
        assert await upload == _REQUEST_SIZE
        assert len(transport.throttled) == 1
    finally:
        await client.aclose()
        await transport.aclose()
