"""``memory://hub``: in-process carrier for tests of upper layers.

Every transport opened on the same hub name (in one process, on one event
loop) can dial the others by node id. Each direction of a stream is a bounded
buffer: ``write`` hands its bytes over whole, then waits while the buffer is
above its limit (like a socket's ``drain``), so a cancelled write never
leaves half a TLS record behind. Closing a transport resets its streams: the
peer's pending and future reads and writes fail with ``StreamResetError``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pilot_transport._carrier import Carrier, CarrierListener, CarrierStream, DialTarget
from pilot_transport._carriers._accept import AcceptQueue
from pilot_transport.errors import (
    PeerUnreachableError,
    PortInUseError,
    PortNotListeningError,
    StreamClosedError,
    StreamResetError,
    TransportURLError,
)

__all__ = ["MemoryCarrier", "MemoryStream", "memory_stream_pair"]

DEFAULT_BUFFER_SIZE = 256 * 1024
_BACKLOG = 128

_hubs: dict[str, dict[str, MemoryCarrier]] = {}


class _Pipe:
    """One direction: bytes in flight, EOF, and who is waiting."""

    __slots__ = ("buffer", "eof", "limit", "read_waiter", "reader_gone", "reset", "write_waiter")

    def __init__(self, limit: int) -> None:
        self.buffer = bytearray()
        self.limit = limit
        self.eof = False
        self.reset = False
        self.reader_gone = False
        self.read_waiter: asyncio.Future[None] | None = None
        self.write_waiter: asyncio.Future[None] | None = None

    def wake_reader(self) -> None:
        waiter = self.read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake_writer(self) -> None:
        waiter = self.write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class MemoryStream(CarrierStream):
    """One end of an in-memory stream pair."""

    def __init__(self, inbound: _Pipe, outbound: _Pipe, remote_hint: str) -> None:
        self._in = inbound
        self._out = outbound
        self._closed = False
        self._eof_sent = False
        self._owner: MemoryCarrier | None = None
        self.remote_hint = remote_hint

    async def read(self, max_bytes: int = 65536) -> bytes:
        pipe = self._in
        while True:
            if self._closed:
                raise StreamClosedError("read on a closed stream")
            if pipe.buffer:
                view = memoryview(pipe.buffer)
                data = bytes(view[:max_bytes])
                view.release()
                del pipe.buffer[:max_bytes]
                if len(pipe.buffer) <= pipe.limit:
                    pipe.wake_writer()
                return data
            if pipe.reset:
                raise StreamResetError("the in-memory peer went away")
            if pipe.eof:
                return b""
            waiter = asyncio.get_running_loop().create_future()
            pipe.read_waiter = waiter
            try:
                await waiter
            finally:
                pipe.read_waiter = None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        pipe = self._out
        self._check_writable()
        pipe.buffer += data
        pipe.wake_reader()
        while len(pipe.buffer) > pipe.limit:
            waiter = asyncio.get_running_loop().create_future()
            pipe.write_waiter = waiter
            try:
                await waiter
            finally:
                pipe.write_waiter = None
            if self._closed:
                raise StreamClosedError("the stream was closed while writing")
            if pipe.reset or pipe.reader_gone:
                raise StreamResetError("the in-memory peer went away")

    def write_room(self) -> int:
        """Bytes :meth:`try_write` takes now: what fits below the buffer's limit."""
        pipe = self._out
        if self._closed or self._eof_sent or pipe.reset or pipe.reader_gone:
            return 0
        if pipe.write_waiter is not None:
            return 0  # a write is waiting for the reader
        return max(0, pipe.limit - len(pipe.buffer))

    def try_write(self, data: bytes) -> bool:
        """Append all of ``data`` to the buffer at once if it fits below the limit."""
        room = self.write_room()
        if not room or len(data) > room:
            return False
        if data:
            self._out.buffer += data
            self._out.wake_reader()
        return True

    def _check_writable(self) -> None:
        if self._closed:
            raise StreamClosedError("write on a closed stream")
        if self._eof_sent:
            raise StreamClosedError("write after write_eof()")
        if self._out.reset or self._out.reader_gone:
            raise StreamResetError("the in-memory peer closed or went away")

    async def write_eof(self) -> None:
        if self._closed:
            raise StreamClosedError("write_eof on a closed stream")
        self._eof_sent = True
        self._out.eof = True
        self._out.wake_reader()

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.eof = True
        self._in.reader_gone = True
        self._in.buffer.clear()
        for pipe in (self._in, self._out):
            pipe.wake_reader()
            pipe.wake_writer()
        if self._owner is not None:
            self._owner._streams.discard(self)

    def _reset(self) -> None:
        """The transport under this stream went away: both ends break."""
        for pipe in (self._in, self._out):
            pipe.reset = True
            pipe.wake_reader()
            pipe.wake_writer()
        self._close()


def memory_stream_pair(
    *, buffer_size: int = DEFAULT_BUFFER_SIZE, hint: str = "memory"
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected in-memory carrier streams (for tests of stream code)."""
    a_to_b = _Pipe(buffer_size)
    b_to_a = _Pipe(buffer_size)
    return MemoryStream(b_to_a, a_to_b, hint), MemoryStream(a_to_b, b_to_a, hint)


class _MemoryListener(CarrierListener):
    def __init__(self, carrier: MemoryCarrier, port: int) -> None:
        self.port = port
        self._carrier = carrier
        self._queue: AcceptQueue[MemoryStream] = AcceptQueue(_BACKLOG, f"listener on port {port}")

    async def accept(self) -> CarrierStream:
        return await self._queue.get()

    async def aclose(self) -> None:
        if self._carrier._listeners.get(self.port) is self:
            del self._carrier._listeners[self.port]
        for stream in self._queue.close():
            stream._reset()


class MemoryCarrier(Carrier):
    """In-process carrier registered on hub ``hub`` under ``node_id``.

    Raises:
        TransportURLError: another open transport on this hub has the same node id.
    """

    scheme = "memory"

    def __init__(self, hub: str, node_id: str, *, buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        if not hub:
            raise TransportURLError("memory:// needs a hub name, e.g. memory://tests")
        members = _hubs.setdefault(hub, {})
        if node_id in members:
            raise TransportURLError(
                f"memory hub {hub!r} already has an open transport for node {node_id}"
            )
        members[node_id] = self
        self.hub = hub
        self.node_id = node_id
        self._buffer_size = buffer_size
        self._listeners: dict[int, _MemoryListener] = {}
        self._streams: set[MemoryStream] = set()
        self._closed = False

    async def dial(self, target: DialTarget, port: int) -> CarrierStream:
        if self._closed:
            raise StreamClosedError("the transport is closed")
        if target.node_id is None:
            raise PeerUnreachableError(
                f"memory:// dials peers by node id; {target.name or target} has none"
            )
        remote = _hubs.get(self.hub, {}).get(target.node_id)
        if remote is None:
            raise PeerUnreachableError(
                f"no transport for {target.name or target.node_id} is open on memory hub "
                f"{self.hub!r}"
            )
        listener = remote._listeners.get(port)
        if listener is None:
            raise PortNotListeningError(
                f"{target.name or target.node_id} has no listener on port {port}"
            )
        ours, theirs = memory_stream_pair(buffer_size=self._buffer_size)
        ours.remote_hint = f"memory://{self.hub}/{target.node_id}:{port}"
        theirs.remote_hint = f"memory://{self.hub}/{self.node_id}"
        if not listener._queue.put_nowait(theirs):
            raise PeerUnreachableError(
                f"{target.name or target.node_id} port {port}: accept backlog is full"
            )
        ours._owner = self
        theirs._owner = remote
        self._streams.add(ours)
        remote._streams.add(theirs)
        return ours

    async def bind(self, port: int) -> CarrierListener:
        if self._closed:
            raise StreamClosedError("the transport is closed")
        if port in self._listeners:
            raise PortInUseError(f"port {port} already has a listener")
        listener = _MemoryListener(self, port)
        self._listeners[port] = listener
        return listener

    async def info(self) -> dict[str, Any]:
        return {"endpoint": f"memory://{self.hub}", "hub": self.hub}

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for listener in list(self._listeners.values()):
            await listener.aclose()
        for stream in list(self._streams):
            stream._reset()
        members = _hubs.get(self.hub)
        if members is not None and members.get(self.node_id) is self:
            del members[self.node_id]
            if not members:
                del _hubs[self.hub]
