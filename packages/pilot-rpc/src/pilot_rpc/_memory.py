"""An in-memory byte stream pair with bounded buffers (for ``pilot_rpc.testing``)."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from pilot_transport.errors import StreamClosedError, StreamResetError

__all__ = ["MemoryStream", "memory_stream_pair"]


class _Pipe:
    """One direction: bounded, with EOF and reset."""

    def __init__(self, max_buffer: int) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.max_buffer = max_buffer
        self.eof = False
        self.reset = False
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    def _update(self) -> None:
        if self.chunks or self.eof or self.reset:
            self.readable.set()
        else:
            self.readable.clear()
        if self.size < self.max_buffer or self.reset:
            self.writable.set()
        else:
            self.writable.clear()

    async def read(self, max_bytes: int) -> bytes:
        while not self.chunks:
            if self.reset:
                raise StreamResetError("the in-memory stream was reset")
            if self.eof:
                return b""
            await self.readable.wait()
        out: list[bytes] = []
        n = 0
        while self.chunks and n < max_bytes:
            chunk = self.chunks.popleft()
            room = max_bytes - n
            if len(chunk) > room:
                self.chunks.appendleft(chunk[room:])
                chunk = chunk[:room]
            out.append(chunk)
            n += len(chunk)
        self.size -= n
        self._update()
        return b"".join(out)

    async def write(self, data: bytes) -> None:
        if self.reset:
            raise StreamResetError("the in-memory stream was reset")
        if self.eof:
            raise StreamClosedError("write after write_eof")
        if data:
            self.chunks.append(bytes(data))
            self.size += len(data)
            self._update()
        while self.size >= self.max_buffer and not self.reset:
            await self.writable.wait()
        if self.reset:
            raise StreamResetError("the in-memory stream was reset")

    def close_write(self) -> None:
        self.eof = True
        self._update()

    def break_(self) -> None:
        self.reset = True
        self._update()


class MemoryStream:
    """One end of :func:`memory_stream_pair`; the ``SecureStream`` surface without TLS."""

    def __init__(self, inbound: _Pipe, outbound: _Pipe, peer: Any, local: Any) -> None:
        self._in = inbound
        self._out = outbound
        self.peer = peer
        self.local = local
        self._closed = False

    async def read(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise StreamClosedError("read on a closed stream")
        return await self._in.read(max_bytes)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise StreamClosedError("write on a closed stream")
        await self._out.write(bytes(data))

    async def write_eof(self) -> None:
        self._out.close_write()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.close_write()
        self._in.break_()

    def break_connection(self) -> None:
        """Simulate a network failure: both ends see StreamResetError."""
        self._in.break_()
        self._out.break_()


def memory_stream_pair(
    client_peer: Any, server_peer: Any, *, max_buffer: int = 256 * 1024
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected streams: (the client's end, the server's end).

    ``client_peer`` is what the server end reports as ``peer`` (and vice versa).
    """
    c2s = _Pipe(max_buffer)
    s2c = _Pipe(max_buffer)
    client_end = MemoryStream(s2c, c2s, server_peer, client_peer)
    server_end = MemoryStream(c2s, s2c, client_peer, server_peer)
    return client_end, server_end
