"""``tcp://host:port``: the embedded, daemon-less carrier.

Theory of operation
-------------------

A node has one TCP listener (started on its first ``bind``), and Pilot-style
virtual ports are multiplexed over it by a tiny cleartext header::

    dialer   -> acceptor   b"PLTP" + u8 version (1) + u16 port (big-endian)
    acceptor -> dialer     u8 status: 0 accepted, 1 nothing listens on that port,
                           2 the port's accept backlog is full

Neither side waits for the other: the dialer's header leaves with its first
write and the acceptor's status with its first write (or its close), so a
stream costs no round trip beyond TCP's own. The dialer's first ``read``
checks the status and raises ``PortNotListeningError`` when refused.

Before authentication
---------------------

Anyone who can reach the port can open connections, so an inbound connection
is *unauthenticated* from its accept until the transport above has finished
the TLS handshake (it calls :meth:`_TcpStream.mark_authenticated`), and
unauthenticated connections are held to limits that keep one source from
locking others out:

- ``header_timeout``: the 7-byte header must arrive this soon after the
  connection is admitted, else it is dropped;
- ``preauth_timeout``: the whole way from accept to an authenticated stream
  (waiting for admission, header, TLS handshake); ``None`` ends the
  unauthenticated phase with the header (a carrier used on its own);
- ``max_active_per_source``: connections of one source IP address that are
  admitted (reading) at once; more from the same address wait, unread, in
  arrival order, and are admitted as earlier ones authenticate or go away;
- ``max_per_source``: connections of one source address admitted or waiting;
  a new one beyond it is refused at once (reset), so one address cannot fill
  the global cap below;
- ``max_unauthenticated``: all unauthenticated connections, admitted or
  waiting. A new connection beyond it sheds the oldest connection of the
  source that holds the most, so a source with few connections (a legitimate
  client) is the last to lose one.

Acceptance itself never waits for a slow peer: each connection costs the
listener one callback, and everything after that is driven by its own bytes
and timers.

Each stream is an :class:`asyncio.Protocol` with its own buffer: reading
pauses the socket above ``_READ_HIGH`` buffered bytes, writing waits (like
``drain``) while the transport's write buffer is above its high-water mark.
``TCP_NODELAY`` is set: the TLS layer writes whole records.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections import deque
from typing import Any

from pilot_transport._carrier import Carrier, CarrierListener, CarrierStream, DialTarget
from pilot_transport._carriers._accept import AcceptQueue
from pilot_transport.errors import (
    ConnectError,
    PeerUnreachableError,
    PortInUseError,
    PortNotListeningError,
    StreamClosedError,
    StreamResetError,
    TransportError,
    TransportURLError,
    UnknownPeerError,
)

__all__ = ["TcpCarrier", "parse_endpoint"]

_MAGIC = b"PLTP"
_VERSION = 1
_HEADER = struct.Struct(">4sBH")
_STATUS_OK = 0
_STATUS_NO_LISTENER = 1
_STATUS_BUSY = 2
_READ_HIGH = 1024 * 1024
_READ_LOW = 256 * 1024
_WRITE_HIGH = 256 * 1024
_BACKLOG = 128
"""Streams waiting for ``accept`` per virtual port."""
_MAX_HELD = 64 * 1024
"""Bytes kept from a connection that is waiting for admission before it is dropped."""
_LISTEN_BACKLOG = 1024
"""The kernel's queue of completed TCP connections not yet accepted."""

DEFAULT_HEADER_TIMEOUT = 3.0
DEFAULT_PREAUTH_TIMEOUT = 5.0
DEFAULT_MAX_ACTIVE_PER_SOURCE = 8
DEFAULT_MAX_PER_SOURCE = 64
DEFAULT_MAX_UNAUTHENTICATED = 256

logger = logging.getLogger("pilot_transport.tcp")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``.

    Raises:
        TransportURLError: malformed endpoint.
    """
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise TransportURLError(f"endpoint {endpoint!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 0xFFFF:
        raise TransportURLError(f"endpoint {endpoint!r}: port out of range")
    return host, port


def _format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _TcpStream(CarrierStream, asyncio.Protocol):
    """One TCP connection: protocol callbacks on one side, the stream API on the other."""

    def __init__(self, carrier: TcpCarrier, *, inbound: bool) -> None:
        self._carrier = carrier
        self._inbound = inbound
        self._transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._lost = False
        self._error: TransportError | None = None
        self._closed = False
        self._eof_sent = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        # Inbound: collecting the header. Outbound: waiting for the status byte.
        self._handshaking = True
        self._header = bytearray()
        self._prefix = b""
        self._header_timer: asyncio.TimerHandle | None = None
        self._preauth_timer: asyncio.TimerHandle | None = None
        self._source: _Source | None = None  # set while unauthenticated
        self._admitted = False
        self._held = bytearray()  # bytes that arrived before admission
        self.source_host = ""
        self.remote_hint = ""

    # -- protocol callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=_WRITE_HIGH)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self.source_host = str(peername[0])
            self.remote_hint = _format_endpoint(self.source_host, int(peername[1]))
        self._carrier._streams.add(self)
        if self._inbound:
            self._carrier._gate.arrive(self)

    def data_received(self, data: bytes) -> None:
        if self._held or (self._source is not None and not self._admitted):
            # Not admitted yet (see _hold for why bytes arrive at all), or admitted
            # with held bytes still to replay: keep them, in order, for later.
            self._held += data
            if not self._admitted and len(self._held) > _MAX_HELD:
                self._carrier._gate.leave(self)
                self._abort_quietly()
            return
        if self._handshaking:
            data = self._receive_header(data) if self._inbound else self._receive_status(data)
            if not data:
                return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _READ_HIGH and not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        if self._handshaking and self._error is None:
            if self._inbound:
                self._abort_quietly()
                return False
            self._error = PeerUnreachableError(
                f"{self.remote_hint} closed the connection before accepting the stream"
            )
        self._wake_reader()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._inbound:
            self._end_header_phase()
            self._carrier._gate.leave(self)
        if exc is not None and self._error is None and not self._closed:
            self._error = StreamResetError(f"connection to {self.remote_hint} broke: {exc}")
        self._carrier._streams.discard(self)
        self._wake_reader()
        self._wake_writer()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    # -- the virtual-port header ----------------------------------------------------

    def _receive_header(self, data: bytes) -> bytes:
        need = _HEADER.size - len(self._header)
        self._header += data[:need]
        if len(self._header) < _HEADER.size:
            return b""
        rest = data[need:]
        self._end_header_phase()
        magic, version, port = _HEADER.unpack(self._header)
        if magic != _MAGIC or version != _VERSION:
            self._abort_quietly()
            return b""
        status = self._carrier._route(self, port)
        if status != _STATUS_OK:
            assert self._transport is not None
            self._transport.write(bytes([status]))
            self._transport.close()
            self._closed = True
            return b""
        self._prefix = bytes([_STATUS_OK])
        return rest

    def _receive_status(self, data: bytes) -> bytes:
        self._handshaking = False
        status = data[0]
        if status == _STATUS_OK:
            return data[1:]
        if status == _STATUS_NO_LISTENER:
            self._error = PortNotListeningError(
                f"{self.remote_hint} has no listener on port {self._port}"
            )
        elif status == _STATUS_BUSY:
            self._error = PeerUnreachableError(
                f"{self.remote_hint} port {self._port}: accept backlog is full"
            )
        else:
            self._error = ConnectError(f"{self.remote_hint} is not a pilot-transport listener")
        self._wake_reader()
        return b""

    def _end_header_phase(self) -> None:
        self._handshaking = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._carrier._gate.preauth_timeout is None:
            self._carrier._gate.leave(self)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._handshaking and not self._closed:
            self._carrier._gate.count("header_timeouts")
            self._end_header_phase()
            self._abort_quietly()

    def _preauth_timed_out(self) -> None:
        self._preauth_timer = None
        if self._source is not None and not self._closed:
            self._carrier._gate.count("preauth_timeouts")
            self._carrier._gate.leave(self)
            self._reset("did not authenticate in time")

    def _admit(self, header_timeout: float) -> None:
        self._admitted = True
        if self._closed or self._lost or self._transport is None:
            return
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(header_timeout, self._header_timed_out)
        if self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()
        if self._held:
            # Replayed from the loop, never from inside the gate's bookkeeping.
            loop.call_soon(self._replay_held)

    def _replay_held(self) -> None:
        held, self._held = bytes(self._held), bytearray()
        if held and not self._closed and not self._lost:
            self.data_received(held)

    def _hold(self) -> None:
        """Leave the bytes in the kernel until this connection is admitted."""
        transport = self._transport
        if transport is None or self._read_paused:
            return
        self._read_paused = True
        transport.pause_reading()
        # On some Python versions (3.11.2 among them) a pause requested inside
        # connection_made is undone when the transport then starts reading; pause
        # again once it has. Bytes that arrive in between are kept in _held.
        asyncio.get_running_loop().call_soon(self._pause_again)

    def _pause_again(self) -> None:
        transport = self._transport
        if transport is None or not self._read_paused or self._closed or self._lost:
            return
        if transport.is_closing():
            return
        transport.resume_reading()
        transport.pause_reading()

    def mark_authenticated(self) -> None:
        """The layer above authenticated the peer: lift the pre-authentication limits.

        Safe to repeat; a no-op on outbound streams.
        """
        self._carrier._gate.leave(self)

    def _abort_quietly(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    # -- the stream API ------------------------------------------------------------

    _port = 0

    async def read(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._closed:
                raise StreamClosedError("read on a closed stream")
            if self._chunks:
                return self._take(max_bytes)
            if self._error is not None:
                raise self._error
            if self._eof or self._lost:
                return b""
            waiter = asyncio.get_running_loop().create_future()
            self._read_waiter = waiter
            try:
                await waiter
            finally:
                self._read_waiter = None

    def _take(self, max_bytes: int) -> bytes:
        chunks = self._chunks
        data = chunks.popleft()
        if len(data) > max_bytes:
            chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        elif chunks and len(data) < max_bytes:
            parts = [data]
            size = len(data)
            while chunks and size < max_bytes:
                more = chunks.popleft()
                if size + len(more) > max_bytes:
                    cut = max_bytes - size
                    chunks.appendleft(more[cut:])
                    more = more[:cut]
                parts.append(more)
                size += len(more)
            data = b"".join(parts)
        self._size -= len(data)
        if self._read_paused and self._size <= _READ_LOW and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        transport = self._check_writable()
        if self._prefix:
            data = self._prefix + data
            self._prefix = b""
        elif type(data) is not bytes:
            data = bytes(data)
        transport.write(data)
        while self._write_paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None
            if self._closed:
                raise StreamClosedError("the stream was closed while writing")
            if self._lost:
                raise self._error or StreamResetError(f"connection to {self.remote_hint} closed")

    def write_room(self) -> int:
        """Bytes :meth:`try_write` takes now: up to the write buffer's high-water mark.

        None while a write waits for the buffer to drain, or once the stream
        is closed, half-closed or broken.
        """
        transport = self._transport
        if (
            transport is None
            or self._write_paused
            or self._drain_waiter is not None
            or self._closed
            or self._eof_sent
            or self._lost
            or self._error is not None
            or transport.is_closing()
        ):
            return 0
        return max(0, _WRITE_HIGH - transport.get_write_buffer_size() - len(self._prefix))

    def try_write(self, data: bytes) -> bool:
        """Queue all of ``data`` on the transport at once if it fits below the high-water mark."""
        room = self.write_room()
        if not room or len(data) > room:
            return False
        transport = self._transport
        assert transport is not None  # room > 0
        if self._prefix:
            data = self._prefix + data
            self._prefix = b""
        if data:
            transport.write(data)
        return True

    def _check_writable(self) -> asyncio.Transport:
        if self._closed:
            raise StreamClosedError("write on a closed stream")
        if self._eof_sent:
            raise StreamClosedError("write after write_eof()")
        transport = self._transport
        if self._error is not None and not isinstance(self._error, StreamResetError):
            raise self._error
        if transport is None or self._lost or transport.is_closing():
            raise self._error or StreamResetError(f"connection to {self.remote_hint} closed")
        return transport

    async def write_eof(self) -> None:
        if self._eof_sent:
            return
        transport = self._check_writable()
        self._eof_sent = True
        if self._prefix:
            transport.write(self._prefix)
            self._prefix = b""
        with contextlib.suppress(OSError, RuntimeError):
            transport.write_eof()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if self._prefix:
                transport.write(self._prefix)
                self._prefix = b""
            transport.close()
        self._carrier._streams.discard(self)
        self._wake_reader()
        self._wake_writer()

    def _reset(self, reason: str) -> None:
        if self._error is None:
            self._error = StreamResetError(reason)
        self._lost = True
        if self._transport is not None:
            self._transport.abort()
        self._wake_reader()
        self._wake_writer()

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Source:
    """The unauthenticated connections of one source address, oldest first."""

    __slots__ = ("active", "host", "streams", "waiting")

    def __init__(self, host: str) -> None:
        self.host = host
        self.streams: dict[_TcpStream, None] = {}
        self.waiting: deque[_TcpStream] = deque()
        self.active = 0


class _Gate:
    """Admission of inbound connections before they are authenticated (see module doc)."""

    def __init__(
        self,
        *,
        header_timeout: float,
        preauth_timeout: float | None,
        max_active_per_source: int,
        max_per_source: int,
        max_unauthenticated: int,
    ) -> None:
        self.header_timeout = header_timeout
        self.preauth_timeout = preauth_timeout
        self.max_active_per_source = max_active_per_source
        self.max_per_source = max_per_source
        self.max_unauthenticated = max_unauthenticated
        self.sources: dict[str, _Source] = {}
        self.total = 0
        self.counters: dict[str, int] = {
            "shed": 0,
            "source_full": 0,
            "header_timeouts": 0,
            "preauth_timeouts": 0,
        }

    def count(self, name: str) -> None:
        self.counters[name] += 1

    def arrive(self, stream: _TcpStream) -> None:
        host = stream.source_host
        source = self.sources.get(host)
        if source is not None and len(source.streams) >= self.max_per_source:
            self.count("source_full")
            stream._reset("refused: too many unauthenticated connections from its address")
            return
        if self.total >= self.max_unauthenticated:
            self._shed_one()
            source = self.sources.get(host)
        if source is None:
            source = self.sources[host] = _Source(host)
        source.streams[stream] = None
        stream._source = source
        self.total += 1
        if self.preauth_timeout is not None:
            stream._preauth_timer = asyncio.get_running_loop().call_later(
                self.preauth_timeout, stream._preauth_timed_out
            )
        if source.active < self.max_active_per_source:
            source.active += 1
            stream._admit(self.header_timeout)
        else:
            stream._hold()
            source.waiting.append(stream)

    def _shed_one(self) -> None:
        # The oldest connection of the source holding the most: whoever opens
        # many connections loses them first, a client with one keeps it.
        heaviest = max(self.sources.values(), key=lambda source: len(source.streams))
        victim = next(iter(heaviest.streams))
        self.count("shed")
        self.leave(victim)
        victim._reset("shed: too many unauthenticated connections")

    def leave(self, stream: _TcpStream) -> None:
        source = stream._source
        if source is None:
            return
        stream._source = None
        if stream._preauth_timer is not None:
            stream._preauth_timer.cancel()
            stream._preauth_timer = None
        del source.streams[stream]
        self.total -= 1
        if stream._admitted:
            source.active -= 1
            while source.waiting and source.active < self.max_active_per_source:
                following = source.waiting.popleft()
                source.active += 1
                following._admit(self.header_timeout)
        else:
            with contextlib.suppress(ValueError):
                source.waiting.remove(stream)
        if not source.streams:
            del self.sources[source.host]


class _TcpListener(CarrierListener):
    def __init__(self, carrier: TcpCarrier, port: int) -> None:
        self.port = port
        self._carrier = carrier
        self.queue: AcceptQueue[_TcpStream] = AcceptQueue(_BACKLOG, f"listener on port {port}")

    async def accept(self) -> CarrierStream:
        return await self.queue.get()

    async def aclose(self) -> None:
        if self._carrier._listeners.get(self.port) is self:
            del self._carrier._listeners[self.port]
        for stream in self.queue.close():
            await stream.aclose()


class TcpCarrier(Carrier):
    """One TCP listener on ``host:port`` (started lazily) carrying virtual ports.

    Args:
        host: address to listen on; ``127.0.0.1`` unless configured otherwise.
        port: TCP port to listen on; 0 picks a free one (see ``info()``).
        header_timeout: seconds an admitted inbound connection has to name its port.
        preauth_timeout: seconds from accept until the layer above calls
            ``mark_authenticated`` on the stream; ``None`` (a carrier used on
            its own) ends the unauthenticated phase with the header.
        max_active_per_source: unauthenticated connections of one source
            address admitted at once (more wait, unread).
        max_per_source: unauthenticated connections of one source address,
            admitted or waiting; more are refused.
        max_unauthenticated: unauthenticated connections in all; beyond it the
            oldest connection of the source holding the most is dropped.
    """

    scheme = "tcp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        preauth_timeout: float | None = None,
        max_active_per_source: int = DEFAULT_MAX_ACTIVE_PER_SOURCE,
        max_per_source: int = DEFAULT_MAX_PER_SOURCE,
        max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
    ) -> None:
        self.host = host
        self.port = port
        self.header_timeout = header_timeout
        self._gate = _Gate(
            header_timeout=header_timeout,
            preauth_timeout=preauth_timeout,
            max_active_per_source=max_active_per_source,
            max_per_source=max_per_source,
            max_unauthenticated=max_unauthenticated,
        )
        self._server: asyncio.Server | None = None
        self._server_lock = asyncio.Lock()
        self._listeners: dict[int, _TcpListener] = {}
        self._streams: set[_TcpStream] = set()
        self._closed = False

    @property
    def endpoint(self) -> str | None:
        """``host:port`` others dial, once listening."""
        if self._server is None or not self._server.sockets:
            return None
        sockname = self._server.sockets[0].getsockname()
        return _format_endpoint(self.host, int(sockname[1]))

    async def _ensure_server(self) -> None:
        async with self._server_lock:
            if self._server is not None:
                return
            loop = asyncio.get_running_loop()
            try:
                self._server = await loop.create_server(
                    lambda: _TcpStream(self, inbound=True),
                    self.host,
                    self.port,
                    backlog=_LISTEN_BACKLOG,
                    reuse_address=True,
                )
            except OSError as exc:
                where = _format_endpoint(self.host, self.port)
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(
                        f"tcp endpoint {where} is already in use by another process"
                    ) from exc
                raise TransportURLError(f"cannot listen on tcp endpoint {where}: {exc}") from exc

    def _route(self, stream: _TcpStream, port: int) -> int:
        listener = self._listeners.get(port)
        stream._port = port
        if listener is None:
            return _STATUS_NO_LISTENER
        if not listener.queue.put_nowait(stream):
            return _STATUS_BUSY
        return _STATUS_OK

    async def dial(self, target: DialTarget, port: int) -> CarrierStream:
        if self._closed:
            raise StreamClosedError("the transport is closed")
        if target.endpoint is None:
            raise UnknownPeerError(
                f"peer {target.name or target.node_id or target.address} has no tcp endpoint; "
                "record one with `pilot-transport trust add NAME KEY --endpoint HOST:PORT`"
            )
        host, tcp_port = parse_endpoint(target.endpoint)
        loop = asyncio.get_running_loop()
        stream = _TcpStream(self, inbound=False)
        stream._port = port
        try:
            await loop.create_connection(lambda: stream, host, tcp_port)
        except OSError as exc:
            raise PeerUnreachableError(
                f"cannot reach {target.name or target.endpoint} at {target.endpoint}: "
                f"{exc.strerror or exc}"
            ) from exc
        stream._prefix = _HEADER.pack(_MAGIC, _VERSION, port)
        stream.remote_hint = target.endpoint
        return stream

    async def bind(self, port: int) -> CarrierListener:
        if self._closed:
            raise StreamClosedError("the transport is closed")
        if port in self._listeners:
            raise PortInUseError(f"virtual port {port} already has a listener")
        listener = _TcpListener(self, port)
        self._listeners[port] = listener
        try:
            await self._ensure_server()
        except BaseException:
            del self._listeners[port]
            raise
        return listener

    @property
    def unauthenticated(self) -> int:
        """Inbound connections not yet authenticated (admitted or waiting)."""
        return self._gate.total

    async def info(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "listening": self._server is not None,
            "bind_host": self.host,
            "unauthenticated": self._gate.total,
            "unauthenticated_sources": len(self._gate.sources),
            "preauth": dict(self._gate.counters),
        }

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for listener in list(self._listeners.values()):
            await listener.aclose()
        if self._server is not None:
            self._server.close()
        for stream in list(self._streams):
            stream._reset("the transport was closed")
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
