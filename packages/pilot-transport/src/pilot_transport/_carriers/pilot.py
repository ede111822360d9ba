"""The ``pilot://`` carrier: byte streams through the local Pilot daemon.

Theory of operation
-------------------

The daemon's socket protocol (PILOT-DAEMON.md, codec in :mod:`._pilot_ipc`) has no
request ids, sends ``Send``/``SendTo`` failures later as id-less ``Error``
frames, processes one IPC connection's commands strictly one after another
(a ``Dial`` to an unreachable node blocks that connection for ~30 s), and
delivers a stream's ``Recv`` frames only to the IPC connection that dialled or
accepted it. The carrier therefore gives every IPC connection one *role*, so
that the meaning of each frame follows from the connection it arrives on:

=============  =========================================================  ===================
role           commands sent                                              an ``Error`` means
=============  =========================================================  ===================
control        Info, ResolveHostname, Handshake, Set*: one at a time     the reply
               (a small pool; never Send/SendTo, so never a stray Error)
dial host      one ``Dial`` (first command), then Send/Close of that one  before DialOK: the
               stream; so a slow dial blocks nobody else                  reply; after: a failed
                                                                          Send of that stream
listener host  one ``Bind`` (first command), then Send/Close of the       before BindOK: the
               streams accepted on that port                              reply; after: a stray
                                                                          Send failure (logged)
datagrams      SendTo; receives the RecvFrom copies, filtered by port     a stray SendTo failure
=============  =========================================================  ===================

``Close`` is answered by ``CloseOK`` (never ``Error``), and ``CloseOK`` for a
stream is handled by conn id whether it is the reply, the unsolicited second
one, or the remote end; so no reply ever needs to be matched on a host
connection after its first command. On control connections requests are
serialized, which also stays correct against daemon builds that answer
concurrently. A control request that times out or is cancelled discards its
connection (a late reply would otherwise be taken for the next request's).

Each frame is written whole (header and body together) and ``Send`` data is
split below the 1 MiB frame limit. On a connection that carries several streams
(a listener's), the first frame of a pass of the event loop goes out at once
and the later frames of that pass are held and handed to the socket together
when it ends (at once from 64 KiB): the ``Send`` frames of many streams cost one
``send`` system call, and one wake-up of the daemon, instead of one each, and a
lone reply never waits. A connection with a single stream writes each frame at
once. Inbound frames are read by
an :class:`asyncio.Protocol` that never pauses: data lands in a bounded
per-stream buffer. Streams between two pilot:// carriers use the in-band
encoding of :mod:`._pilot_framing` (half-close, credit-based backpressure, and
no ``SACK`` prefix ever reaching the daemon); *raw* streams, for the daemon's
own services such as the port-1002 event stream, carry bytes unchanged and are
reset (with a clear error) if their reader falls more than
``raw_buffer_limit`` behind.

After the daemon restarts, every host connection sees EOF: its streams fail
with :class:`~pilot_transport.errors.StreamResetError`, and each open listener
reconnects with exponential backoff and binds its port again. Control and
datagram connections are reopened on demand.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

from pilot_transport._address import Address, SocketAddress
from pilot_transport._carrier import Carrier, CarrierListener, CarrierStream, DialTarget
from pilot_transport._carriers import _pilot_ipc as ipc
from pilot_transport._carriers._pilot_framing import (
    CREDIT_UNIT,
    EOF_ACK,
    EOF_MARKER,
    INITIAL_CREDIT,
    NOOP,
    FramingDecoder,
    FramingError,
    credit_controls,
    encode_data,
)
from pilot_transport.errors import (
    DaemonError,
    DaemonUnavailableError,
    ListenerClosedError,
    PeerUnreachableError,
    PortInUseError,
    PortNotListeningError,
    StreamClosedError,
    StreamResetError,
    TransportError,
    TransportUsageError,
    UnknownPeerError,
)

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "Datagram",
    "DatagramReceiver",
    "PilotCarrier",
    "PilotCarrierOptions",
    "PilotListener",
    "PilotStream",
]

_log = logging.getLogger("pilot_transport.pilot")

DEFAULT_SOCKET_PATH: Final = "/tmp/pilot.sock"  # noqa: S108  # the daemon's documented default
"""Where the Pilot daemon listens unless configured otherwise."""

_U32 = struct.Struct(">I")
_RECV_HEAD = struct.Struct(">IBI")  # length, command, conn id: a Recv frame's first 9 bytes
_RECV = int(ipc.Cmd.RECV)
_MAX_FRAMED_CHUNK = (ipc.MAX_SEND_DATA - len(NOOP)) * 3 // 4
"""Data bytes whose encoding (at most 4/3 of them, plus a no-op) fits one Send frame,
so every Send carries a whole encoded chunk and nothing can land inside an escape."""
_LOST = "the connection to the Pilot daemon was lost (daemon stopped or restarted)"
_HOLD_LIMIT = 64 * 1024
"""Held frames (see ``_IpcConnection.write``) go to the socket at once from this size,
so the socket's buffer, and its backpressure, sees them."""


@dataclass(frozen=True, kw_only=True)
class PilotCarrierOptions:
    """Tuning of :class:`PilotCarrier`; every default is safe.

    Attributes:
        stream_window: inbound buffer per pilot-to-pilot stream, in bytes (a
            multiple of 1024, at least 64 KiB). The remote writer waits once
            this much is unread: that is the backpressure.
        raw_buffer_limit: inbound buffer per raw stream. Raw streams have no
            end-to-end credit, so a reader that falls this far behind gets its
            stream reset rather than stalling the daemon.
        send_chunk: largest ``Send`` payload (at most 1,048,571 bytes).
        accept_backlog: accepted streams waiting for ``accept()`` per listener;
            beyond it new inbound streams are closed at once (and logged).
        control_connections: IPC connections for request/reply commands.
        request_timeout: seconds to wait for a control reply.
        connect_timeout: seconds to wait for the daemon's socket to accept us.
        reconnect_initial_delay / reconnect_max_delay: listener re-bind backoff.
        datagram_queue: datagrams kept per port for ``recv_datagram``; the
            oldest is dropped when full (datagrams are lossy anyway).
        close_linger: longest wait, in seconds, in ``aclose()`` of a
            pilot-to-pilot stream for the peer's own end-of-stream (or the
            daemon's report that the stream ended) before the daemon is told to
            close it. The daemon discards whatever the peer has not yet
            acknowledged when it is told to close, so closing at once can lose
            the tail of the data; ``0`` closes at once.
        dial_burst / dial_rate: pacing of new streams (dials) from this
            carrier: up to ``dial_burst`` at once, then ``dial_rate`` per
            second. The daemon admits a burst of about 64 new connections from
            one node and then about 8 a second, and silently drops the rest
            (the dialer sees ``dial timeout`` after ~17 s); the defaults stay
            inside that with room for other clients of the same daemon.
    """

    stream_window: int = 256 * 1024
    raw_buffer_limit: int = 4 * 1024 * 1024
    send_chunk: int = 256 * 1024
    accept_backlog: int = 128
    control_connections: int = 4
    request_timeout: float = 30.0
    connect_timeout: float = 5.0
    reconnect_initial_delay: float = 0.05
    reconnect_max_delay: float = 2.0
    datagram_queue: int = 1024
    close_linger: float = 10.0
    dial_burst: int = 48
    dial_rate: float = 6.0

    def __post_init__(self) -> None:
        if self.stream_window < INITIAL_CREDIT or self.stream_window % CREDIT_UNIT:
            raise TransportUsageError(
                f"stream_window must be a multiple of 1024 and >= {INITIAL_CREDIT}, "
                f"got {self.stream_window}"
            )
        if self.stream_window > 64 * 1024 * 1024:
            raise TransportUsageError("stream_window must be at most 64 MiB")
        if self.raw_buffer_limit < 4096:
            raise TransportUsageError("raw_buffer_limit must be at least 4096")
        if not 1 <= self.send_chunk <= ipc.MAX_SEND_DATA:
            raise TransportUsageError(f"send_chunk must be in 1..{ipc.MAX_SEND_DATA}")
        for name in ("accept_backlog", "control_connections", "datagram_queue", "dial_burst"):
            if getattr(self, name) < 1:
                raise TransportUsageError(f"{name} must be at least 1")
        for name in (
            "request_timeout",
            "connect_timeout",
            "reconnect_initial_delay",
            "reconnect_max_delay",
            "dial_rate",
        ):
            if not getattr(self, name) > 0:
                raise TransportUsageError(f"{name} must be positive")
        if not 0 <= self.close_linger <= 3600:
            raise TransportUsageError("close_linger must be in 0..3600 seconds")


@dataclass(frozen=True, slots=True)
class Datagram:
    """One datagram received on a port (``source`` is the sender's address and port)."""

    source: SocketAddress
    port: int
    data: bytes


# ---------------------------------------------------------------------------------------
# IPC connections


class _Signal:
    """``asyncio.Event``'s ``set``/``clear``/``wait``, bound to its loop at the first wait.

    On Python 3.11 each ``asyncio.Event.wait`` looks the running loop up again,
    and that lookup makes a ``getpid()`` system call; a stream waits once per
    read. Each waiter has its own future, so cancelling one wakes no other.
    """

    __slots__ = ("_flag", "_loop", "_waiters")

    def __init__(self) -> None:
        self._flag = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def set(self) -> None:
        """Set the flag and wake every waiter. Safe to repeat."""
        if self._flag:
            return
        self._flag = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        """Reset the flag: the next :meth:`wait` blocks until :meth:`set`."""
        self._flag = False

    async def wait(self) -> None:
        """Return once the flag is set (at once if it is). Cancellable."""
        if self._flag:
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            self._waiters.remove(waiter)


class _IpcConnection(asyncio.Protocol):
    """One Unix-socket connection to the daemon; reads forever, writes whole frames."""

    role: ClassVar[str] = "ipc"

    def __init__(self, carrier: PilotCarrier) -> None:
        self.carrier = carrier
        self._transport: asyncio.Transport | None = None
        self._decoder = ipc.FrameDecoder()
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[ipc.Message] | None = None
        self._held: list[bytes] = []  # frames written this loop pass, not yet on the socket
        self._held_size = 0
        self._pass_open = False  # a frame went out this loop pass; later ones are held
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.lost_error: BaseException | None = None
        self.on_lost: list[Callable[[_IpcConnection], None]] = []

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        try:
            self.handle_frames(self._decoder.feed(data))
        except ipc.IpcProtocolError as exc:
            _log.error(
                "pilot daemon broke the socket protocol on a %s connection: %s", self.role, exc
            )
            self.lost_error = exc
            self.abort()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._held.clear()
        self._held_size = 0
        if self.lost_error is None:
            self.lost_error = exc
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(DaemonUnavailableError(_LOST))
        self.connection_ended()
        for callback in self.on_lost:
            try:
                callback(self)
            except Exception:  # a broken callback must not stop the others
                _log.exception("error in pilot connection-lost callback")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- for subclasses ------------------------------------------------------------------
    def handle_frames(self, frames: list[ipc.Frame]) -> None:
        for frame in frames:
            self.handle(ipc.parse_message(frame))

    def handle(self, msg: ipc.Message) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def connection_ended(self) -> None:
        """Hook: the socket is gone."""

    def take_reply(self, msg: ipc.Message) -> bool:
        """Give ``msg`` to the outstanding request, if any."""
        waiter = self._waiter
        if waiter is None:
            return False
        self._waiter = None
        if not waiter.done():
            waiter.set_result(msg)
        return True

    # -- helpers -------------------------------------------------------------------------
    def write(self, frame: bytes) -> None:
        """Queue one whole frame. Raises DaemonUnavailableError if the socket is gone.

        While :meth:`coalescing`, the first frame of a pass of the event loop
        goes to the socket at once and the later ones of that pass are held and
        handed over together when it ends (or at once from :data:`_HOLD_LIMIT`
        bytes): one ``send`` for the frames of many streams instead of one
        each, so the daemon, too, is woken once, and a lone message never waits.
        """
        transport = self._transport
        if self.closed or transport is None or transport.is_closing():
            raise DaemonUnavailableError(_LOST)
        if self._held or (self._pass_open and self.coalescing()):
            self._hold(frame)  # behind the held ones: the order is kept
            return
        transport.write(frame)
        if not self._pass_open and self.coalescing():
            # Frames written before the loop runs this callback are held.
            self._pass_open = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._end_pass)

    def _hold(self, frame: bytes) -> None:
        self._held.append(frame)
        self._held_size += len(frame)
        if self._held_size >= _HOLD_LIMIT:
            self.flush()

    def _end_pass(self) -> None:
        self._pass_open = False
        self.flush()

    def coalescing(self) -> bool:
        """Whether frames written now wait for the end of the loop pass (see :meth:`write`)."""
        return False

    def flush(self) -> None:
        """Hand the held frames to the socket now, in order. Safe to repeat."""
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held.clear()
        self._held_size = 0
        transport = self._transport
        if not self.closed and transport is not None and not transport.is_closing():
            transport.write(data)

    @property
    def paused(self) -> bool:
        """Whether the socket's write buffer is above its high-water mark."""
        return self._paused

    @property
    def writable(self) -> bool:
        """Whether :meth:`write` would queue a frame now (the socket is open)."""
        transport = self._transport
        return not self.closed and transport is not None and not transport.is_closing()

    async def drain(self) -> None:
        """Wait while the socket's write buffer is above its high-water mark."""
        while self._paused and not self.closed:
            if self._drain is None or self._drain.done():
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain
        if self.closed:
            raise DaemonUnavailableError(_LOST)

    async def request(self, frame: bytes, limit: float | None) -> ipc.Message:
        """Send a request and wait for the next reply frame.

        The caller guarantees that no other request is outstanding. On timeout
        or cancellation the connection is aborted: its reply can no longer be
        matched.
        """
        if self._waiter is not None:
            raise RuntimeError("two requests outstanding on one pilot IPC connection")
        waiter: asyncio.Future[ipc.Message] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            self.write(frame)
            if limit is None:
                return await waiter
            async with asyncio.timeout(limit):
                return await waiter
        except BaseException:
            if not waiter.done() or waiter.cancelled():
                self.abort()
            raise
        finally:
            if self._waiter is waiter:
                self._waiter = None

    def close(self) -> None:
        """Flush queued frames, then close. Idempotent."""
        self.flush()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        self._held.clear()
        self._held_size = 0
        if self._transport is not None:
            self._transport.abort()


class _ControlConnection(_IpcConnection):
    role = "control"

    def handle(self, msg: ipc.Message) -> None:
        if isinstance(msg, ipc.Recv | ipc.Accept | ipc.RecvFrom | ipc.CloseOK):
            return  # pushes: RecvFrom reaches every client; the rest cannot happen here
        if not self.take_reply(msg):
            _log.warning("pilot daemon sent an unexpected frame on a control connection: %r", msg)


class _StreamHost(_IpcConnection):
    """A connection that owns streams: one dialled stream, or a listener's accepted ones."""

    role = "stream"

    def __init__(self, carrier: PilotCarrier) -> None:
        super().__init__(carrier)
        self.streams: dict[int, PilotStream] = {}
        self.dialing: tuple[SocketAddress, bool] | None = None
        self.listener: PilotListener | None = None
        self.bound_port: int | None = None
        self.stray_errors = 0

    def coalescing(self) -> bool:
        # A connection that carries several streams (a listener's): their frames
        # of one loop pass share a send. One stream gains nothing by waiting.
        return len(self.streams) > 1

    def data_received(self, data: bytes) -> None:
        # Fast path: a read that is exactly one whole Recv frame with nothing held
        # back (one ping, one reply): hand its data over without the decoder.
        if (
            len(data) > 9
            and data[4] == _RECV
            and not self._decoder.buffered
            and self.lost_error is None
        ):
            length, _, conn_id = _RECV_HEAD.unpack_from(data)
            if length == len(data) - 4 and length <= ipc.MAX_FRAME:
                stream = self.streams.get(conn_id)
                if stream is not None:
                    stream._on_segment(data[9:])
                return
        super().data_received(data)

    def handle_frames(self, frames: list[ipc.Frame]) -> None:
        # Consecutive Recv frames of one stream (one per <= 4096-byte segment)
        # are joined and handed over at once: one decode, one buffer entry.
        pending_id = -1
        pending: list[memoryview] = []
        for frame in frames:
            if frame.cmd == ipc.Cmd.RECV and len(frame.payload) >= 4:
                (conn_id,) = _U32.unpack_from(frame.payload)
                if conn_id != pending_id and pending:
                    self._deliver(pending_id, pending)
                    pending = []
                pending_id = conn_id
                pending.append(memoryview(frame.payload)[4:])
                continue
            if pending:
                self._deliver(pending_id, pending)
                pending = []
            self.handle(ipc.parse_message(frame))
        if pending:
            self._deliver(pending_id, pending)

    def _deliver(self, conn_id: int, pieces: list[memoryview]) -> None:
        stream = self.streams.get(conn_id)
        if stream is not None:
            stream._on_segment(pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces))

    def handle(self, msg: ipc.Message) -> None:
        if isinstance(msg, ipc.Recv):
            stream = self.streams.get(msg.conn_id)
            if stream is not None:
                stream._on_segment(msg.data)
            return
        if isinstance(msg, ipc.CloseOK):
            stream = self.streams.get(msg.conn_id)
            if stream is not None:
                stream._on_remote_close()
            return
        if isinstance(msg, ipc.Accept):
            self._on_accept(msg)
            return
        if isinstance(msg, ipc.RecvFrom):
            return  # every client gets a copy; the datagram connection handles them
        if isinstance(msg, ipc.DialOK) and self.dialing is not None and self._waiter is not None:
            # Register before anything else is parsed: the stream's first Recv
            # may be in the very same read.
            remote, framed = self.dialing
            self.dialing = None
            stream = PilotStream(self, msg.conn_id, 0, remote, framed=framed, owns_host=True)
            self.streams[msg.conn_id] = stream
            self.take_reply(msg)
            return
        if self.take_reply(msg):
            return
        if isinstance(msg, ipc.Error):
            self.stray_errors += 1
            self.carrier._stats["stray_errors"] += 1
            live = [s for s in self.streams.values() if s._alive]
            if self.bound_port is None and len(live) == 1:
                # A dial host carries one stream: the failed Send was its own.
                live[0]._fail(StreamResetError(f"the Pilot daemon failed a send: {msg.message}"))
            else:
                _log.warning(
                    "pilot daemon reported a send failure on port %s's connection "
                    "(no conn id to attribute it): %s",
                    self.bound_port,
                    msg.message,
                )
            return
        _log.warning("pilot daemon sent an unexpected frame on a stream connection: %r", msg)

    def _on_accept(self, msg: ipc.Accept) -> None:
        listener = self.listener
        framed = listener.framed if listener is not None else True
        stream = PilotStream(
            self, msg.conn_id, msg.local_port, msg.remote, framed=framed, owns_host=False
        )
        self.streams[msg.conn_id] = stream
        if listener is None or listener.closed or not listener._offer(stream):
            self.carrier._stats["rejected_accepts"] += 1
            _log.warning(
                "closing inbound pilot stream from %s on port %d: %s",
                msg.remote,
                msg.local_port,
                "listener closed" if listener is None or listener.closed else "accept backlog full",
            )
            stream._abort_now()

    def connection_ended(self) -> None:
        for stream in list(self.streams.values()):
            stream._fail(StreamResetError(f"{_LOST}; stream to {stream.remote} is gone"))

    def forget(self, stream: PilotStream) -> None:
        self.streams.pop(stream.conn_id, None)
        self.carrier._maybe_release_host(self)


class _DatagramConnection(_IpcConnection):
    role = "datagram"

    def handle(self, msg: ipc.Message) -> None:
        if isinstance(msg, ipc.RecvFrom):
            self.carrier._deliver_datagram(msg)
        elif self.take_reply(msg):
            pass  # the Info that proves the daemon serves this connection
        elif isinstance(msg, ipc.Error):
            self.carrier._stats["stray_errors"] += 1
            _log.warning("pilot daemon failed a datagram send: %s", msg.message)
        elif not isinstance(msg, ipc.Recv | ipc.Accept | ipc.CloseOK):
            _log.warning(
                "pilot daemon sent an unexpected frame on the datagram connection: %r", msg
            )


# ---------------------------------------------------------------------------------------
# Streams


class PilotStream(CarrierStream):
    """A stream through the daemon (see the module docstring for framed vs raw).

    Reads return buffered data first; once the stream has ended they return
    ``b""`` after a clean end, or raise :class:`StreamResetError` after a
    reset, a daemon restart or an end without the peer's end-of-data marker.
    Cancelling a ``write`` may leave part of the data sent; close the stream.
    """

    def __init__(
        self,
        host: _StreamHost,
        conn_id: int,
        local_port: int,
        remote: SocketAddress,
        *,
        framed: bool,
        owns_host: bool,
    ) -> None:
        """Internal: streams are made by :class:`PilotCarrier`."""
        opts = host.carrier.options
        self._host = host
        self.conn_id = conn_id
        self.local_port = local_port
        self.remote = remote
        self.remote_hint = str(remote)
        self.framed = framed
        self._owns_host = owns_host
        self._chunk = opts.send_chunk
        self._window = opts.stream_window if framed else opts.raw_buffer_limit
        self._rx: collections.deque[bytes] = collections.deque()
        self._rx_bytes = 0
        self._rx_eof = False
        self._error: StreamResetError | None = None
        self._remote_closed = False
        self._local_closed = False
        self._eof_sent = False
        self._lingering = False
        self._peer_got_eof = False
        self._readable = _Signal()
        self._credit_event = _Signal()
        self._write_lock = asyncio.Lock()
        self._decoder = FramingDecoder() if framed else None
        self._send_credit = INITIAL_CREDIT
        self._consumed = 0
        # Credit we grant rides on our next data write (see _owe_credit); on its
        # own it would be a separate small Send, and the daemon's Nagle holds a
        # Send that follows an unacknowledged one (a 6-40 ms stall per grant).
        self._owed = 0  # KiB granted by our reader but not yet sent
        self._peer_credit = INITIAL_CREDIT  # bytes the peer may still send, as far as we know
        self._low_water = INITIAL_CREDIT // 2  # send owed credit at once below this
        if framed and self._window > INITIAL_CREDIT:
            self._owed = (self._window - INITIAL_CREDIT) // CREDIT_UNIT

    def __repr__(self) -> str:
        state = "closed" if self._local_closed else ("reset" if self._error else "open")
        return f"<PilotStream conn={self.conn_id} remote={self.remote} {state}>"

    @property
    def _alive(self) -> bool:
        return not (self._local_closed or self._remote_closed or self._error)

    # -- events from the host (synchronous, never block the socket reader) ------------------
    def _on_segment(self, data: bytes) -> None:
        if self._error is not None or (self._local_closed and not self._lingering):
            return
        decoder = self._decoder
        if decoder is not None and (self._lingering or not decoder.feed_plain(data)):
            try:
                decoded = decoder.feed(data)
            except FramingError as exc:
                self._abort_now(StreamResetError(f"peer broke the pilot stream encoding: {exc}"))
                return
            if decoded.credit:
                self._send_credit += decoded.credit
                self._credit_event.set()
            data = decoded.data
            if decoded.eof_ack:
                self._peer_got_eof = True
                self._readable.set()
            if decoded.eof:
                self._rx_eof = True
                self._readable.set()
                # Tell the peer its data all arrived: it may now close safely.
                if not self._remote_closed and not self._host.closed:
                    with contextlib.suppress(DaemonUnavailableError):
                        self._host.write(ipc.send(self.conn_id, EOF_ACK))
            if self._lingering:
                # Closing: the data is discarded, but credited back so a peer
                # still writing can reach its own end-of-stream.
                self._consumed += len(data)
                if data and self._consumed >= max(self._window // 4, CREDIT_UNIT):
                    kib = self._consumed // CREDIT_UNIT + self._owed
                    self._consumed -= (kib - self._owed) * CREDIT_UNIT
                    self._owed = 0
                    with contextlib.suppress(DaemonUnavailableError):
                        self._host.write(ipc.send(self.conn_id, credit_controls(kib)))
                return
        if data:
            self._rx.append(data)
            self._rx_bytes += len(data)
            self._readable.set()
            if decoder is not None:
                self._peer_credit -= len(data)
                if self._owed and self._peer_credit < self._low_water:
                    self._flush_credit()
            if self._rx_bytes > self._window:
                what = (
                    "the peer sent beyond its flow-control credit"
                    if self.framed
                    else f"the reader fell more than {self._window} bytes behind"
                )
                self._abort_now(StreamResetError(f"inbound buffer limit exceeded: {what}"))

    def _on_remote_close(self) -> None:
        if self._remote_closed:
            return
        self._remote_closed = True
        if not self.framed:
            self._rx_eof = True
        elif not self._rx_eof and self._error is None and not self._local_closed:
            self._error = StreamResetError(
                f"the stream to {self.remote} ended without a clean close "
                "(peer crashed or reset it, or it timed out)"
            )
        self._readable.set()
        self._credit_event.set()

    def _fail(self, error: StreamResetError) -> None:
        if self._error is None and not self._local_closed:
            self._error = error
        self._remote_closed = True
        self._readable.set()
        self._credit_event.set()

    def _abort_now(self, error: StreamResetError | None = None) -> None:
        """Close at the daemon without the end-of-data marker: the peer sees a reset.

        Local reads and writes then fail with ``error`` (not as closed).
        """
        if self._error is None and not self._local_closed:
            self._error = error or StreamResetError(f"the stream to {self.remote} was reset")
        if not self._remote_closed:
            self._remote_closed = True
            self._send_close()
        self._release()

    def _owe_credit(self, kib: int) -> None:
        """Grant ``kib`` KiB to the peer: with our next write, or now if it runs low.

        The peer may still send ``_peer_credit`` bytes. While that stays at or
        above half the window (a quarter of the initial credit before our first
        grant) the grant waits for our next data write; below it, it goes out
        at once, so a peer that is only sending never waits on us.
        """
        self._owed += kib
        if self._peer_credit < self._low_water:
            self._flush_credit()

    def _take_owed(self) -> bytes:
        """The owed credit as controls to send with our data now (or b"")."""
        kib = self._owed
        if not kib:
            return b""
        self._owed = 0
        self._peer_credit += kib * CREDIT_UNIT
        self._low_water = self._window // 2
        return credit_controls(kib)

    def _with_owed(self, wire: bytes) -> bytes:
        """``wire`` with the owed credit in front, if both fit in one Send."""
        if self._owed:
            controls = self._take_owed()
            if len(controls) + len(wire) <= ipc.MAX_SEND_DATA:
                return controls + wire
            self._send_control(controls)
        return wire

    def _flush_credit(self) -> None:
        self._send_control(self._take_owed())

    def _send_control(self, payload: bytes) -> None:
        if payload and self._alive and not self._host.closed:
            with contextlib.suppress(DaemonUnavailableError):
                self._host.write(ipc.send(self.conn_id, payload))

    def _send_close(self) -> None:
        if not self._host.closed:
            with contextlib.suppress(DaemonUnavailableError):
                self._host.write(ipc.close(self.conn_id))

    def _release(self) -> None:
        self._readable.set()
        self._credit_event.set()
        self._host.forget(self)

    def _raise_if_broken(self) -> None:
        if self._local_closed:
            raise StreamClosedError("stream is closed")
        if self._error is not None:
            raise StreamResetError(str(self._error)) from self._error
        if self._remote_closed:
            raise StreamResetError(f"the stream to {self.remote} was closed by the remote side")

    # -- CarrierStream ------------------------------------------------------------------
    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return 1..``max_bytes`` bytes, or ``b""`` at a clean end of stream.

        Raises:
            StreamClosedError: the stream was closed locally.
            StreamResetError: the stream broke (see the class docstring).
        """
        if max_bytes < 1:
            raise TransportUsageError("max_bytes must be at least 1")
        while not self._rx:
            if self._local_closed:
                raise StreamClosedError("stream is closed")
            if self._rx_eof:
                return b""
            if self._error is not None:
                raise StreamResetError(str(self._error)) from self._error
            self._readable.clear()
            await self._readable.wait()
        if self._local_closed:
            raise StreamClosedError("stream is closed")
        first = self._rx[0]
        if len(first) <= max_bytes and len(self._rx) == 1:
            data = self._rx.popleft()
        else:
            parts: list[bytes] = []
            want = max_bytes
            while self._rx and want:
                piece = self._rx[0]
                if len(piece) <= want:
                    parts.append(self._rx.popleft())
                    want -= len(piece)
                else:
                    parts.append(piece[:want])
                    self._rx[0] = piece[want:]
                    want = 0
            data = b"".join(parts)
        self._rx_bytes -= len(data)
        if self.framed:
            self._consumed += len(data)
            if self._consumed >= max(self._window // 4, CREDIT_UNIT):
                kib = self._consumed // CREDIT_UNIT
                self._consumed -= kib * CREDIT_UNIT
                self._owe_credit(kib)
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; waits for the peer's credit and the socket's buffer.

        Raises:
            StreamClosedError: closed locally, or written after ``write_eof``.
            StreamResetError: the stream or the daemon connection broke.
        """
        view = memoryview(data).cast("B")
        if self._eof_sent and not self._local_closed:
            raise StreamClosedError("write after write_eof")
        self._raise_if_broken()
        size = len(view)
        if not size:
            return
        if (
            size <= self._chunk
            and not self._write_lock.locked()
            and (not self.framed or size <= min(self._send_credit, _MAX_FRAMED_CHUNK))
        ):
            # Fast path: one Send, queued before anything can suspend, so no
            # other writer can come between; nobody holds the lock, so no
            # earlier write is still in progress.
            plain = data if type(data) is bytes else view.tobytes()
            if self.framed:
                self._send_credit -= size
                plain = self._with_owed(encode_data(plain))
            host = self._host
            try:
                host.write(ipc.send(self.conn_id, plain))
                if host.paused:
                    await host.drain()
            except DaemonUnavailableError as exc:
                self._fail(StreamResetError(f"{_LOST}; stream to {self.remote} is gone"))
                raise StreamResetError(str(self._error or exc)) from exc
            return
        async with self._write_lock:
            pos = 0
            total = len(view)
            while pos < total:
                if self._eof_sent and not self._local_closed:
                    raise StreamClosedError("write after write_eof")
                self._raise_if_broken()
                if self.framed:
                    while self._send_credit <= 0:
                        self._credit_event.clear()
                        await self._credit_event.wait()
                        self._raise_if_broken()
                    n = min(total - pos, self._send_credit, self._chunk, _MAX_FRAMED_CHUNK)
                    self._send_credit -= n
                    wire = self._with_owed(encode_data(bytes(view[pos : pos + n])))
                else:
                    n = min(total - pos, self._chunk)
                    wire = bytes(view[pos : pos + n])
                pos += n
                try:
                    for start in range(0, len(wire), ipc.MAX_SEND_DATA):
                        self._host.write(
                            ipc.send(self.conn_id, wire[start : start + ipc.MAX_SEND_DATA])
                        )
                    await self._host.drain()
                except DaemonUnavailableError as exc:
                    self._fail(StreamResetError(f"{_LOST}; stream to {self.remote} is gone"))
                    raise StreamResetError(str(self._error or exc)) from exc

    def write_room(self) -> int:
        """Bytes :meth:`try_write` takes now: one Send within the peer's credit.

        None while another write is in progress or waits, while the daemon
        socket's buffer is above its high-water mark, or once the stream is
        closed, half-closed or broken.
        """
        host = self._host
        if (
            self._eof_sent
            or not self._alive
            or self._write_lock.locked()
            or host.paused
            or not host.writable
        ):
            return 0
        if not self.framed:
            return self._chunk
        return max(0, min(self._send_credit, self._chunk, _MAX_FRAMED_CHUNK))

    def try_write(self, data: bytes) -> bool:
        """Queue all of ``data`` as one Send now if :meth:`write_room` allows it."""
        room = self.write_room()
        if not room or len(data) > room:
            return False
        if not data:
            return True
        plain = data
        if self.framed:
            plain = self._with_owed(encode_data(plain))
        try:
            self._host.write(ipc.send(self.conn_id, plain))
        except DaemonUnavailableError:
            # Not reachable: write_room() saw the host open, and nothing ran since.
            self._fail(StreamResetError(f"{_LOST}; stream to {self.remote} is gone"))
            raise StreamResetError(str(self._error)) from None
        if self.framed:
            self._send_credit -= len(data)
        return True

    async def write_eof(self) -> None:
        """Half-close: the peer reads ``b""``; this side keeps reading.

        On a raw stream (no in-band encoding) the daemon offers no half-close:
        this ends the stream in both directions and later reads return ``b""``.
        Idempotent.

        Raises:
            StreamClosedError: the stream was closed locally.
            StreamResetError: the stream broke.
        """
        if self._eof_sent:
            return
        self._raise_if_broken()
        async with self._write_lock:
            if self._eof_sent:
                return
            self._raise_if_broken()
            self._eof_sent = True
            try:
                if self.framed:
                    self._host.write(ipc.send(self.conn_id, self._with_owed(EOF_MARKER)))
                else:
                    self._host.write(ipc.close(self.conn_id))
            except DaemonUnavailableError as exc:
                self._fail(StreamResetError(f"{_LOST}; stream to {self.remote} is gone"))
                raise StreamResetError(str(self._error or exc)) from exc

    async def aclose(self) -> None:
        """Close both directions: the peer reads ``b""`` after all our data. Idempotent.

        On a pilot-to-pilot stream this sends our end-of-stream marker, then
        waits (at most ``close_linger`` seconds) until the peer has
        acknowledged our end-of-stream (all our data arrived) or has closed,
        and only then tells the daemon to close: the daemon drops whatever the peer
        has not acknowledged when told to close, so closing at once could lose
        our last bytes. Inbound data that arrives meanwhile is discarded.

        Never raises except for cancellation; cancelling the wait closes the
        stream at once (the peer may then miss our last bytes) and re-raises.
        """
        if self._local_closed:
            return
        self._local_closed = True
        self._rx.clear()
        self._consumed += self._rx_bytes  # discarded unread: credited back while lingering
        self._rx_bytes = 0
        try:
            if self._may_linger():
                await self._linger()
        finally:
            if not self._remote_closed and self._error is None and not self._host.closed:
                with contextlib.suppress(DaemonUnavailableError):
                    if self.framed and not self._eof_sent:
                        self._host.write(ipc.send(self.conn_id, self._with_owed(EOF_MARKER)))
                    self._host.write(ipc.close(self.conn_id))
            self._eof_sent = True
            self._lingering = False
            self._rx.clear()
            self._rx_bytes = 0
            self._release()
        await asyncio.sleep(0)  # let a reader woken by the close run before we return

    def _may_linger(self) -> bool:
        return (
            self.framed
            and self._host.carrier.options.close_linger > 0
            and not self._peer_got_eof
            and not self._remote_closed
            and self._error is None
            and not self._host.closed
        )

    async def _linger(self) -> None:
        """Send our end-of-stream and wait, bounded, for the peer's acknowledgement."""
        self._lingering = True
        # Everything is credited back now, so a peer waiting for credit can
        # reach its own end-of-stream.
        kib = self._consumed // CREDIT_UNIT
        self._consumed -= kib * CREDIT_UNIT
        self._owed += kib
        try:
            if not self._eof_sent:
                self._host.write(ipc.send(self.conn_id, self._with_owed(EOF_MARKER)))
                self._eof_sent = True
            elif self._owed:
                self._host.write(ipc.send(self.conn_id, self._take_owed()))
        except DaemonUnavailableError:
            return
        try:
            async with asyncio.timeout(self._host.carrier.options.close_linger):
                while not (
                    self._peer_got_eof or self._remote_closed or self._error or self._host.closed
                ):
                    self._readable.clear()
                    await self._readable.wait()
        except TimeoutError:
            self._host.carrier._stats["close_linger_expired"] += 1
            _log.debug(
                "closing pilot stream to %s without the peer's end-of-stream after %.1f s",
                self.remote,
                self._host.carrier.options.close_linger,
            )


# ---------------------------------------------------------------------------------------
# Listeners and datagrams


class PilotListener(CarrierListener):
    """Inbound streams on one bound port; re-binds by itself after a daemon restart."""

    def __init__(self, carrier: PilotCarrier, port: int, *, framed: bool) -> None:
        self._carrier = carrier
        self.port = port
        self.framed = framed
        self.closed = False
        self._queue: collections.deque[PilotStream] = collections.deque()
        self._event = asyncio.Event()
        self._host: _StreamHost | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self.rebinds = 0
        """How many times the port was bound again after the daemon connection was lost."""

    def __repr__(self) -> str:
        return f"<PilotListener port={self.port} {'closed' if self.closed else 'open'}>"

    def _offer(self, stream: PilotStream) -> bool:
        if len(self._queue) >= self._carrier.options.accept_backlog:
            return False
        self._queue.append(stream)
        self._event.set()
        return True

    def _attach(self, host: _StreamHost) -> None:
        self._host = host
        host.listener = self
        host.on_lost.append(self._on_host_lost)

    def _on_host_lost(self, host: _IpcConnection) -> None:
        if host is not self._host:
            return
        self._host = None
        # Streams queued but not yet accepted died with the connection.
        self._queue = collections.deque(s for s in self._queue if s._host is not host)
        if not self.closed and not self._carrier.closed:
            _log.warning("pilot daemon connection of port %d lost; re-binding", self.port)
            self._reconnect = self._carrier._spawn(self._rebind_loop())

    async def _rebind_loop(self) -> None:
        delay = self._carrier.options.reconnect_initial_delay
        max_delay = self._carrier.options.reconnect_max_delay
        while not self.closed and not self._carrier.closed:
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, max_delay)
            try:
                host = await self._carrier._bind_host(self.port)
            except (DaemonUnavailableError, PortInUseError, DaemonError) as exc:
                _log.info("re-binding pilot port %d failed, retrying: %s", self.port, exc)
                continue
            if self.closed or self._carrier.closed:
                host.close()
                return
            self._attach(host)
            self.rebinds += 1
            _log.info("pilot port %d bound again after daemon reconnect", self.port)
            self._event.set()
            return

    async def accept(self) -> PilotStream:
        """Wait for the next inbound stream.

        Waits across a daemon restart (the listener binds again by itself).

        Raises:
            ListenerClosedError: the listener or its carrier was closed.
        """
        while True:
            if self.closed:
                raise ListenerClosedError(f"listener on pilot port {self.port} is closed")
            while self._queue:
                stream = self._queue.popleft()
                if not stream._local_closed:
                    return stream
            self._event.clear()
            await self._event.wait()

    def __aiter__(self) -> AsyncIterator[PilotStream]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[PilotStream]:
        while True:
            try:
                yield await self.accept()
            except ListenerClosedError:
                return

    async def aclose(self) -> None:
        """Stop accepting. Already accepted streams stay open. Idempotent.

        The daemon has no Unbind: the port is released once the streams
        accepted on it are closed too.
        """
        if self.closed:
            return
        self.closed = True
        self._event.set()
        if self._reconnect is not None:
            self._reconnect.cancel()
            try:
                await self._reconnect
            except asyncio.CancelledError:
                # Absorb the re-bind task's end, never our caller's cancellation.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        for stream in self._queue:
            stream._abort_now()
        self._queue.clear()
        self._carrier._listeners.pop(self.port, None)
        if self._host is not None:
            self._host.listener = None
            self._carrier._maybe_release_host(self._host)


class DatagramReceiver:
    """Datagrams arriving on one port (bounded queue; the oldest is dropped when full)."""

    def __init__(self, carrier: PilotCarrier, port: int, maxlen: int) -> None:
        self._carrier = carrier
        self.port = port
        self._queue: collections.deque[Datagram] = collections.deque(maxlen=maxlen)
        self._event = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def _put(self, datagram: Datagram) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(datagram)
        self._event.set()

    async def recv(self) -> Datagram:
        """Wait for the next datagram on this port.

        Raises:
            ListenerClosedError: the receiver or its carrier was closed.
        """
        while not self._queue:
            if self.closed:
                raise ListenerClosedError(f"datagram receiver on port {self.port} is closed")
            self._event.clear()
            await self._event.wait()
        return self._queue.popleft()

    def close(self) -> None:
        """Stop receiving; wakes a pending ``recv``. Idempotent."""
        if not self.closed:
            self.closed = True
            self._event.set()
            self._carrier._datagram_ports.pop(self.port, None)


# ---------------------------------------------------------------------------------------
# The carrier


_C = TypeVar("_C", bound=_IpcConnection)


@dataclass
class _ControlPool:
    slots: asyncio.Semaphore
    idle: list[_ControlConnection] = field(default_factory=lambda: [])


class _DialPacer:
    """A token bucket: ``burst`` dials at once, then ``rate`` per second (FIFO waiters)."""

    def __init__(
        self,
        burst: int,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.burst = burst
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = asyncio.Lock()
        self.waited = 0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self) -> None:
        """Wait for a dial slot. Cancellation gives up the place in line."""
        async with self._lock:
            self._refill()
            while self._tokens < 1.0:
                self.waited += 1
                await self._sleep((1.0 - self._tokens) / self.rate)
                self._refill()
            self._tokens -= 1.0


class PilotCarrier(Carrier):
    """A complete asyncio client of the local Pilot daemon's socket protocol.

    Args:
        socket_path: the daemon's Unix socket (default ``/tmp/pilot.sock``).
        options: tuning; see :class:`PilotCarrierOptions`.

    Nothing connects until the first call. ``dial``/``bind`` give streams that
    use the pilot-to-pilot encoding (half-close, backpressure, SACK-safe) and
    are meant for another ``PilotCarrier`` (the TLS layer runs over them);
    ``open_raw_stream``/``bind_raw`` give plain byte streams for the daemon's
    own services (port 7 echo, port 1002 events, ...).

    Every method raises :class:`DaemonUnavailableError` when the socket cannot
    be reached, and only :mod:`pilot_transport.errors` exceptions otherwise.
    """

    scheme = "pilot"

    def __init__(
        self, socket_path: str = DEFAULT_SOCKET_PATH, *, options: PilotCarrierOptions | None = None
    ) -> None:
        self.socket_path = socket_path
        self.options = options or PilotCarrierOptions()
        self.closed = False
        self._listeners: dict[int, PilotListener] = {}
        self._hosts: set[_StreamHost] = set()
        self._control = _ControlPool(asyncio.Semaphore(self.options.control_connections))
        self._datagram: _DatagramConnection | None = None
        self._datagram_lock = asyncio.Lock()
        self._datagram_ports: dict[int, DatagramReceiver] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stats: collections.Counter[str] = collections.Counter()
        self._pacer = _DialPacer(self.options.dial_burst, self.options.dial_rate)

    def __repr__(self) -> str:
        return f"<PilotCarrier {self.socket_path!r}{' closed' if self.closed else ''}>"

    @property
    def stats(self) -> dict[str, int]:
        """Counters: ``stray_errors``, ``rejected_accepts``, ``dropped_datagrams``,
        ``close_linger_expired`` (closes that gave up waiting for the peer)."""
        return dict(self._stats)

    async def __aenter__(self) -> PilotCarrier:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- plumbing ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise TransportUsageError("the pilot carrier is closed")

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _connect(self, factory: Callable[[], _C]) -> _C:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                _, proto = await loop.create_unix_connection(factory, self.socket_path)
        except TimeoutError as exc:
            raise DaemonUnavailableError(
                f"the Pilot daemon at {self.socket_path} did not accept a connection "
                f"within {self.options.connect_timeout} s"
            ) from exc
        except OSError as exc:
            raise DaemonUnavailableError(
                f"cannot reach the Pilot daemon at {self.socket_path}: "
                f"{exc.strerror or exc} (is the daemon running?)"
            ) from exc
        return proto

    def _new_host(self) -> _StreamHost:
        host = _StreamHost(self)
        self._hosts.add(host)
        host.on_lost.append(self._hosts.discard)
        return host

    def _maybe_release_host(self, host: _StreamHost) -> None:
        if host.listener is None and not host.streams and host.dialing is None:
            host.close()
            self._hosts.discard(host)

    @contextlib.asynccontextmanager
    async def _control_connection(self) -> AsyncGenerator[_ControlConnection]:
        """Borrow a control connection (at most ``control_connections`` at once)."""
        pool = self._control
        self._check_open()
        await pool.slots.acquire()
        try:
            self._check_open()
            conn: _ControlConnection | None = None
            while pool.idle and conn is None:
                candidate = pool.idle.pop()
                if not candidate.closed:
                    conn = candidate
            if conn is None:
                conn = await self._connect(lambda: _ControlConnection(self))
            ok = False
            try:
                yield conn
                ok = True
            finally:
                if not ok:
                    conn.abort()  # a request may be outstanding: its reply cannot be matched
                elif conn.closed or self.closed:
                    conn.close()
                else:
                    pool.idle.append(conn)
        finally:
            pool.slots.release()

    async def _request(self, frame: bytes, what: str, *, retry: bool = False) -> ipc.Message:
        for attempt in (1, 2):
            try:
                async with self._control_connection() as conn:
                    return await conn.request(frame, self.options.request_timeout)
            except TimeoutError as exc:
                raise DaemonError(
                    f"the Pilot daemon did not answer {what} within "
                    f"{self.options.request_timeout} s"
                ) from exc
            except DaemonUnavailableError:
                if not retry or attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _json(self, frame: bytes, expect: ipc.Cmd, what: str, *, retry: bool = False) -> Any:
        msg = await self._request(frame, what, retry=retry)
        if isinstance(msg, ipc.Error):
            raise DaemonError(f"the Pilot daemon refused {what}: {msg.message}")
        if not isinstance(msg, ipc.JsonReply) or msg.cmd != expect:
            raise ipc.IpcProtocolError(f"unexpected reply to {what}: {msg!r}")
        return msg.value

    # -- streams -----------------------------------------------------------------------
    async def dial(self, target: DialTarget, port: int) -> PilotStream:
        """Open a pilot-to-pilot stream to ``target`` (its ``address``, or an
        ``extra["hostname"]`` resolved through the daemon) on ``port``.

        Each dialled stream gets its own IPC connection, so a dial that takes
        ~30 s to fail never delays other streams. Cancelling the dial drops that
        connection, which makes the daemon abandon it.

        Raises:
            UnknownPeerError: the target has neither address nor hostname.
            AddressError: the address text is malformed.
            PeerUnreachableError / PortNotListeningError: the daemon's dial failed.
            DaemonUnavailableError: the daemon's socket cannot be reached.
        """
        address = await self._target_address(target)
        return await self._dial(address, port, framed=True)

    async def open_raw_stream(self, address: Address | str, port: int) -> PilotStream:
        """Open a raw stream (bytes unchanged) to a daemon service, e.g. port 1002 events.

        Raises the same errors as :meth:`dial`.
        """
        return await self._dial(Address.coerce(address), port, framed=False)

    async def _target_address(self, target: DialTarget) -> Address:
        if target.address:
            return Address.parse(target.address)
        hostname = target.extra.get("hostname") if target.extra else None
        if isinstance(hostname, str) and hostname:
            found = await self.resolve_hostname(hostname)
            return Address.parse(str(found.get("address", "")))
        raise UnknownPeerError(
            f"peer {target.name or target.node_id or '?'} has no Pilot address "
            "(add address='N:XXXX.XXXX.XXXX' to its trust entry)"
        )

    async def _dial(self, address: Address, port: int, *, framed: bool) -> PilotStream:
        self._check_open()
        _check_port(port)
        await self._pacer.acquire()
        self._check_open()
        host = await self._connect(self._new_host)
        remote = SocketAddress(address, port)
        host.dialing = (remote, framed)
        try:
            reply = await host.request(ipc.dial(address, port), None)
        except DaemonUnavailableError:
            self._hosts.discard(host)
            self._check_open()  # the carrier was closed under the dial: say so
            raise
        except BaseException:
            # Dropping the connection is how a client abandons a dial: the
            # daemon cancels it (or finishes it for nobody) and frees the stream.
            host.abort()
            self._hosts.discard(host)
            raise
        finally:
            host.dialing = None
        if isinstance(reply, ipc.DialOK):
            stream = host.streams.get(reply.conn_id)
            if stream is not None:
                if self.closed:
                    await stream.aclose()
                    self._check_open()
                return stream
        host.close()
        self._hosts.discard(host)
        if isinstance(reply, ipc.Error):
            text = reply.message
            lowered = text.lower()
            if "refused" in lowered or "not listening" in lowered or "no listener" in lowered:
                raise PortNotListeningError(f"nothing listens on {remote}: {text}")
            raise PeerUnreachableError(f"the Pilot daemon could not dial {remote}: {text}")
        raise ipc.IpcProtocolError(f"unexpected reply to Dial: {reply!r}")

    async def bind(self, port: int) -> PilotListener:
        """Accept pilot-to-pilot streams on ``port``.

        Raises:
            PortInUseError: we or another daemon client already bound ``port``.
            DaemonUnavailableError: the daemon's socket cannot be reached.
        """
        return await self._bind(port, framed=True)

    async def bind_raw(self, port: int) -> PilotListener:
        """Accept raw streams (bytes unchanged) on ``port``. Errors as :meth:`bind`."""
        return await self._bind(port, framed=False)

    async def _bind(self, port: int, *, framed: bool) -> PilotListener:
        self._check_open()
        _check_port(port)
        if port in self._listeners:
            raise PortInUseError(f"pilot port {port} already has a listener")
        listener = PilotListener(self, port, framed=framed)
        self._listeners[port] = listener
        try:
            # The daemon has no Unbind: a closed listener whose accepted streams
            # are still open keeps the port bound on its connection; reuse it.
            host = next(
                (
                    h
                    for h in self._hosts
                    if h.bound_port == port and not h.closed and h.listener is None
                ),
                None,
            )
            if host is None:
                host = await self._bind_host(port)
            listener._attach(host)
        except BaseException:
            self._listeners.pop(port, None)
            raise
        return listener

    async def _bind_host(self, port: int) -> _StreamHost:
        host = await self._connect(self._new_host)
        try:
            async with asyncio.timeout(self.options.request_timeout):
                reply = await host.request(ipc.bind(port), None)
        except TimeoutError as exc:
            raise DaemonError(f"the Pilot daemon did not answer Bind({port})") from exc
        except BaseException:
            host.abort()
            raise
        if isinstance(reply, ipc.BindOK):
            host.bound_port = port
            return host
        host.close()
        if isinstance(reply, ipc.Error):
            raise PortInUseError(f"the Pilot daemon refused to bind port {port}: {reply.message}")
        raise ipc.IpcProtocolError(f"unexpected reply to Bind: {reply!r}")

    # -- daemon features ---------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        """Carrier facts plus the daemon's Info: address, node id, listening ports, ...

        Raises:
            DaemonUnavailableError / DaemonError.
        """
        daemon = await self.daemon_info()
        return {
            "carrier": "pilot",
            "socket_path": self.socket_path,
            "address": daemon.get("address"),
            "endpoint": daemon.get("address"),
            "node_id": daemon.get("node_id"),
            "hostname": daemon.get("hostname"),
            "listening_ports": sorted(self._listeners),
            "daemon": daemon,
        }

    async def daemon_info(self) -> dict[str, Any]:
        """The daemon's Info JSON (node_id, address, hostname, public_key, peers, ...).

        Safe to repeat.
        """
        value = await self._json(ipc.info(), ipc.Cmd.INFO_OK, "Info", retry=True)
        if not isinstance(value, dict):
            raise ipc.IpcProtocolError("Info reply is not a JSON object")
        return value

    async def address(self) -> Address:
        """This daemon's Pilot address."""
        return Address.parse(str((await self.daemon_info()).get("address", "")))

    async def resolve_hostname(self, hostname: str) -> dict[str, Any]:
        """``{node_id, address, hostname, public}`` of a registered hostname. Safe to repeat.

        Raises:
            DaemonError: unknown hostname (the daemon's message says why).
        """
        value = await self._json(
            ipc.text_command(ipc.Cmd.RESOLVE_HOSTNAME, hostname),
            ipc.Cmd.RESOLVE_HOSTNAME_OK,
            f"ResolveHostname({hostname!r})",
            retry=True,
        )
        if not isinstance(value, dict):
            raise ipc.IpcProtocolError("ResolveHostname reply is not a JSON object")
        return value

    async def set_hostname(self, hostname: str) -> Any:
        """Register this node's hostname with the registry."""
        return await self._json(
            ipc.text_command(ipc.Cmd.SET_HOSTNAME, hostname), ipc.Cmd.SET_HOSTNAME_OK, "SetHostname"
        )

    async def set_visibility(self, public: bool) -> Any:
        """Make this node public (resolvable by anyone) or private."""
        return await self._json(
            ipc.flag_command(ipc.Cmd.SET_VISIBILITY, public),
            ipc.Cmd.SET_VISIBILITY_OK,
            "SetVisibility",
        )

    async def set_tags(self, tags: Iterable[str]) -> Any:
        """Set up to three registry tags."""
        tag_list = list(tags)
        if len(tag_list) > 3 or not all(isinstance(t, str) for t in tag_list):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TransportUsageError("tags must be at most 3 strings")
        return await self._json(ipc.set_tags(tag_list), ipc.Cmd.SET_TAGS_OK, "SetTags")

    async def set_webhook(self, url: str) -> Any:
        """Set (or clear, with ``""``) the daemon's event webhook URL."""
        return await self._json(
            ipc.text_command(ipc.Cmd.SET_WEBHOOK, url), ipc.Cmd.SET_WEBHOOK_OK, "SetWebhook"
        )

    async def set_task_exec(self, enabled: bool) -> Any:
        """Allow or refuse task submission (port 1003) on this node."""
        return await self._json(
            ipc.flag_command(ipc.Cmd.SET_TASK_EXEC, enabled),
            ipc.Cmd.SET_TASK_EXEC_OK,
            "SetTaskExec",
        )

    async def deregister(self) -> Any:
        """Remove this node from the registry."""
        return await self._json(
            ipc.encode_frame(ipc.Cmd.DEREGISTER), ipc.Cmd.DEREGISTER_OK, "Deregister"
        )

    async def _handshake(
        self, sub: ipc.HandshakeSub, node_id: int | None, text: str = "", *, retry: bool = False
    ) -> dict[str, Any]:
        if node_id is not None and not 0 <= node_id <= 0xFFFF_FFFF:
            raise TransportUsageError(f"node id {node_id} is out of range")
        value = await self._json(
            ipc.handshake(sub, node_id, text),
            ipc.Cmd.HANDSHAKE_OK,
            f"Handshake {sub.name.lower()}",
            retry=retry,
        )
        if not isinstance(value, dict):
            raise ipc.IpcProtocolError("Handshake reply is not a JSON object")
        return value

    async def handshake_request(self, node_id: int, justification: str = "") -> dict[str, Any]:
        """Ask node ``node_id`` to trust us (daemon-level trust; see PILOT-DAEMON.md)."""
        return await self._handshake(ipc.HandshakeSub.REQUEST, node_id, justification)

    async def handshake_approve(self, node_id: int) -> dict[str, Any]:
        """Approve a pending trust request (the daemon says approved even if none was pending)."""
        return await self._handshake(ipc.HandshakeSub.APPROVE, node_id)

    async def handshake_reject(self, node_id: int, reason: str = "") -> dict[str, Any]:
        """Reject a pending trust request."""
        return await self._handshake(ipc.HandshakeSub.REJECT, node_id, reason)

    async def handshake_pending(self) -> list[dict[str, Any]]:
        """Trust requests waiting for a decision. Safe to repeat."""
        return list(
            (await self._handshake(ipc.HandshakeSub.PENDING, None, retry=True)).get("pending") or []
        )

    async def handshake_trusted(self) -> list[dict[str, Any]]:
        """Nodes this daemon trusts. Safe to repeat."""
        return list(
            (await self._handshake(ipc.HandshakeSub.TRUSTED, None, retry=True)).get("trusted") or []
        )

    async def handshake_revoke(self, node_id: int) -> dict[str, Any]:
        """Withdraw trust from ``node_id``."""
        return await self._handshake(ipc.HandshakeSub.REVOKE, node_id)

    # -- datagrams ---------------------------------------------------------------------
    async def _datagram_connection(self) -> _DatagramConnection:
        async with self._datagram_lock:
            self._check_open()
            conn = self._datagram
            if conn is None or conn.closed:
                conn = await self._connect(lambda: _DatagramConnection(self))
                # One Info round trip before any SendTo (so its reply is unambiguous)
                # proves the daemon serves this connection: a connection left in a
                # dying daemon's backlog would otherwise look alive forever.
                try:
                    await conn.request(ipc.info(), self.options.request_timeout)
                except TimeoutError as exc:
                    raise DaemonError("the Pilot daemon did not answer Info") from exc
                conn.on_lost.append(self._on_datagram_lost)
                if conn.closed:
                    raise DaemonUnavailableError(_LOST)
                self._datagram = conn
            return conn

    def _on_datagram_lost(self, conn: _IpcConnection) -> None:
        if conn is self._datagram:
            self._datagram = None
            if self._datagram_ports and not self.closed:
                self._spawn(self._reopen_datagrams())

    async def _reopen_datagrams(self) -> None:
        delay = self.options.reconnect_initial_delay
        while self._datagram_ports and not self.closed and self._datagram is None:
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.options.reconnect_max_delay)
            with contextlib.suppress(DaemonUnavailableError, DaemonError):
                await self._datagram_connection()

    def _deliver_datagram(self, msg: ipc.RecvFrom) -> None:
        receiver = self._datagram_ports.get(msg.dst_port)
        if receiver is None:
            return
        before = receiver.dropped
        receiver._put(Datagram(msg.source, msg.dst_port, msg.data))
        self._stats["dropped_datagrams"] += receiver.dropped - before

    async def send_datagram(self, address: Address | str, port: int, data: bytes) -> None:
        """Send one datagram (at most 65,535 bytes; delivery is not guaranteed).

        A failure the daemon reports later is logged and counted in ``stats``.

        Raises:
            TransportUsageError: ``data`` is too large.
            DaemonUnavailableError: the daemon's socket cannot be reached.
        """
        target = Address.coerce(address)
        _check_port(port)
        if len(data) > ipc.MAX_DATAGRAM:
            raise TransportUsageError(
                f"datagram of {len(data)} bytes exceeds the {ipc.MAX_DATAGRAM}-byte limit"
            )
        conn = await self._datagram_connection()
        conn.write(ipc.send_to(target, port, data))
        await conn.drain()

    async def listen_datagrams(self, port: int) -> DatagramReceiver:
        """Start keeping datagrams that arrive for ``port`` (idempotent per port).

        The daemon sends every datagram to every client; this carrier keeps
        only those addressed to ports someone listens on.
        """
        _check_port(port)
        receiver = self._datagram_ports.get(port)
        if receiver is None:
            receiver = DatagramReceiver(self, port, self.options.datagram_queue)
            self._datagram_ports[port] = receiver
        try:
            await self._datagram_connection()
        except BaseException:
            receiver.close()
            raise
        return receiver

    async def recv_datagram(self, port: int) -> Datagram:
        """The next datagram for ``port`` (listening on it first if needed).

        Wrap in ``asyncio.timeout`` to bound the wait; cancelling loses nothing.
        """
        receiver = await self.listen_datagrams(port)
        return await receiver.recv()

    # -- lifetime ----------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close every stream, listener and daemon connection. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for listener in list(self._listeners.values()):
            await listener.aclose()
        for receiver in list(self._datagram_ports.values()):
            receiver.close()
        streams = [stream for host in self._hosts for stream in host.streams.values()]
        # Concurrently: each may linger (bounded) for its peer's end-of-stream.
        await asyncio.gather(*(stream.aclose() for stream in streams))
        for host in list(self._hosts):
            host.close()
        self._hosts.clear()
        for conn in self._control.idle:
            conn.close()
        self._control.idle.clear()
        if self._datagram is not None:
            self._datagram.close()
            self._datagram = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, TransportError):
                await task


def _check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TransportUsageError(f"port must be an int in 0..65535, got {port!r}")
