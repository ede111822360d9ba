"""The asyncio driver: runs a sans-IO :class:`~pilot_rpc._protocol.Connection` over a stream.

One reader task feeds received bytes to the protocol and dispatches its
events; one writer task writes whatever the protocol queued. Frames queued in
the same event-loop iteration leave in one ``stream.write`` (the writer wakes
after the current callbacks ran), so 64 concurrent calls cost one TLS record,
not 64. Call records are plain slotted objects resolved through futures: the
client side starts no task per call; the server side runs one task per call.

When a connection carries a single call, waking the writer only adds an
event-loop iteration (an ``epoll_wait``) to the call's latency and has nothing
to coalesce, so the write may start in the current task instead, with public
asyncio only: a task this driver owns and never cancels mid-write (the
server's read loop, a server handler's task once its handler returned) awaits
the write itself (:meth:`_ConnectionBase.write_direct`); any other task (a
client's caller) writes synchronously when the stream offers ``try_write``
(``pilot_transport.SecureStream`` does: the bytes are encrypted and handed to
the carrier without suspending, all or nothing, on every Python version); a
stream without it is written from an eagerly started task on Python 3.12+,
which usually completes at once, or the writer is woken on earlier versions
(:meth:`_ConnectionBase.write_now`). Bytes a synchronous write could not place
go to the writer, which sends them before anything else; a write in flight
from another task is waited for by the writer before it writes anything else.
So frames never interleave, and a caller's cancellation never interrupts a
write half-way (a synchronous write cannot be interrupted at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from pilot_transport.aio import aclose_quietly, cancel_and_wait, wait_ended

from pilot_rpc import _protocol as P
from pilot_rpc._context import CallContext
from pilot_rpc._errors_map import map_transport_error
from pilot_rpc._types import MethodKind, ProgressCallback, StreamLike, SyncWritable
from pilot_rpc.errors import (
    Cancelled,
    DeadlineExceeded,
    ErrorInfo,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    RpcError,
    StatusCode,
    Unavailable,
    Unimplemented,
)

if TYPE_CHECKING:
    from pilot_rpc._options import ServerOptions

__all__ = ["ClientConnection", "ServerConnection"]

logger = logging.getLogger("pilot_rpc")

_WRITE_CHUNK = 256 * 1024
_READ_SIZE = 256 * 1024
_HIGH_WATER = 1024 * 1024
"""Queued output above which streaming senders wait for the writer."""
_READ_PAUSE = 4 * 1024 * 1024
"""Server: queued output above which the connection stops reading until it drains."""
_YIELD_EVERY = 64
"""A stream producer that never suspends yields to the loop after this many items."""


class _ConnectionBase:
    """What client and server connections share: reader, writer, keepalive, close."""

    def __init__(
        self,
        stream: StreamLike,
        core: P.Connection,
        *,
        keepalive_interval: float | None,
        keepalive_timeout: float,
    ) -> None:
        self.stream = stream
        self.core = core
        self.loop = asyncio.get_running_loop()
        self.peer: Any = getattr(stream, "peer", None)
        self.hello: asyncio.Future[P.HelloReceived] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.close_error: RpcError | None = None
        self.going_away = False
        self._write_waiter: asyncio.Future[None] | None = None
        # A write started outside the writer task (write_now / write_direct) and not
        # finished yet; the writer waits for it before writing anything else.
        self._inline: asyncio.Future[None] | None = None
        # The stream's synchronous write, if it has one (pilot_transport.SecureStream does).
        self._try_write: Callable[[bytes], bool] | None = (
            stream.try_write if isinstance(stream, SyncWritable) else None
        )
        # Output taken for a synchronous write the stream refused; the writer sends it first.
        self._held: bytes | None = None
        self.sync_writes = 0
        """Writes the stream took synchronously (without the writer task)."""
        self.writer_wakeups = 0
        """Times the writer task woke up to write (for tests of the per-call path)."""
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._last_recv = self.loop.time()
        self._ping_sent_at: float | None = None
        # When our last write into the stream completed. While a large message is
        # still leaving, a ping queued behind it cannot be answered yet; writes
        # that keep completing show the peer is still taking bytes (a dead peer
        # stops them once the socket buffers fill), so they extend the ping's wait.
        self._last_send = self._last_recv
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._shutdown: asyncio.Task[None] | None = None
        self._closing = False
        self._dispatch: dict[type[P.Event], Callable[[Any], None]] = {}
        self.dispatching = False
        """True while the read loop hands a batch of events out (it writes their output after)."""
        # Servers stop reading while this much output waits; clients always read (a client
        # that stopped too could deadlock with a server sending it a large reply).
        self._read_pause_above = 1 << 62
        self._reader_writes = False
        self._unfinished_timer: asyncio.TimerHandle | None = None
        # Woken after every batch read (credit may have arrived) and when the connection ends.
        self._read_waiters: list[asyncio.Future[None]] = []

    def start(self) -> None:
        self._reader = self.loop.create_task(self._read_loop())
        self._writer = self.loop.create_task(self._write_loop())
        self.kick()
        if self._keepalive_interval is not None:
            self._keepalive_handle = self.loop.call_later(
                self._keepalive_interval, self._keepalive_tick
            )

    # -- writing --------------------------------------------------------------------------------

    def kick(self) -> None:
        """Wake the writer: the protocol queued output."""
        waiter = self._write_waiter
        if waiter is not None:
            self._write_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def write_now(self) -> None:
        """Write queued output from the current task if the writer is idle; else wake it.

        A stream with a synchronous ``try_write`` (``_types.SyncWritable``) takes
        the bytes at once when it can, without an event-loop iteration and
        without suspending; when it cannot (backpressure, another write in
        progress) the bytes go to the writer task, first in its queue. A stream
        without one, on Python 3.12+, is written from an eagerly started task:
        it usually completes at once; under backpressure the task finishes it in
        the background and the writer waits for it before writing anything
        else. Otherwise the writer task is woken. The caller never awaits, so
        cancelling it cannot interrupt a write half-way.
        """
        if self._write_waiter is None or self._inline is not None:
            self.kick()
            return
        try_write = self._try_write
        if try_write is not None:
            self._write_sync(try_write)
            return
        if sys.version_info < (3, 12):
            self.kick()
            return
        data = self.core.data_to_send(_WRITE_CHUNK)
        if not data:
            return
        task = asyncio.Task(self._write_inline(data), loop=self.loop, eager_start=True)
        if not task.done():
            self._inline = task
            task.add_done_callback(self._inline_done)
        elif self.core.pending_output:
            self.kick()

    def _write_sync(self, try_write: Callable[[bytes], bool]) -> None:
        # Only while the writer idles and no other write is in flight (see write_now).
        core = self.core
        data = core.data_to_send(_WRITE_CHUNK)
        if not data:
            return
        try:
            written = try_write(data)
        except Exception as exc:
            self._lost(map_transport_error(exc, "connection lost while writing"))
            return
        if written:
            self.sync_writes += 1
            self._last_send = self.loop.time()
            if core.pending_output or self._drain_waiters:
                self.kick()
        else:
            # The stream cannot take it now: the writer sends it before anything else.
            self._held = data
            self.kick()

    async def _write_inline(self, data: bytes) -> None:
        try:
            await self.stream.write(data)
        except Exception as exc:
            self._lost(map_transport_error(exc, "connection lost while writing"))
            return
        self._last_send = self.loop.time()

    def _inline_done(self, task: asyncio.Future[None]) -> None:
        if self._inline is task:
            self._inline = None
        if task.cancelled():
            # Cancelled half-way (the loop is shutting down): the stream's framing is unknown.
            self._lost(Unavailable("connection lost: a write was cancelled"))
        elif self.core.pending_output or self._drain_waiters:
            self.kick()

    async def write_direct(self) -> None:
        """Write queued output from the current task, awaiting the write; else wake the writer.

        Only for tasks this driver owns and never cancels while they write (a
        server handler's task once its handler returned, the server's read
        loop): a cancellation that still arrives mid-write ends the connection,
        since part of a frame may have been sent.
        """
        if self._write_waiter is None or self._inline is not None:
            self.kick()
            return
        data = self.core.data_to_send(_WRITE_CHUNK)
        if not data:
            return
        done: asyncio.Future[None] = self.loop.create_future()
        self._inline = done
        try:
            await self.stream.write(data)
            self._last_send = self.loop.time()
        except asyncio.CancelledError:
            self._lost(Unavailable("connection lost: a write was cancelled"))
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our own cancellation: never swallowed
            # Otherwise the stream cancelled its own write: the connection is lost, not us.
        except Exception as exc:
            self._lost(map_transport_error(exc, "connection lost while writing"))
        finally:
            self._inline = None
            if not done.done():
                done.set_result(None)
            if self.core.pending_output or self._drain_waiters:
                self.kick()

    async def _write_loop(self) -> None:
        core = self.core
        stream = self.stream
        try:
            while True:
                inline = self._inline
                if inline is not None:
                    # A write started from another task is still going: frames must not mix.
                    await asyncio.wait((inline,))
                    continue
                held = self._held
                if held is not None:
                    # Taken from the protocol for a synchronous write the stream refused.
                    self._held = None
                    await stream.write(held)
                    self._last_send = self.loop.time()
                    continue
                if not core.pending_output:
                    if self._drain_waiters:
                        self._wake_drain_waiters()
                    if self._closing or core.closed:
                        return
                    waiter = self.loop.create_future()
                    self._write_waiter = waiter
                    await waiter
                    self.writer_wakeups += 1
                    continue
                await stream.write(core.data_to_send(_WRITE_CHUNK))
                self._last_send = self.loop.time()
                if self._drain_waiters and core.pending_output < _HIGH_WATER // 2:
                    self._wake_drain_waiters()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lost(map_transport_error(exc, "connection lost while writing"))

    def _wake_read_waiters(self) -> None:
        waiters = self._read_waiters
        self._read_waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _wake_drain_waiters(self) -> None:
        waiters = self._drain_waiters
        self._drain_waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_writable(self) -> None:
        """Wait while more than the high-water mark of output is queued."""
        while self.core.pending_output > _HIGH_WATER and not self.closed.done():
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            self.kick()
            await waiter

    # -- reading --------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        core = self.core
        stream = self.stream
        handlers = self._dispatch
        loop = self.loop
        try:
            while True:
                data = await stream.read(_READ_SIZE)
                self._last_recv = core.now = loop.time()
                self._ping_sent_at = None
                events = core.receive_data(data)
                self.dispatching = True
                try:
                    for event in events:
                        handlers[type(event)](event)
                finally:
                    self.dispatching = False
                if core.pending_output:
                    # Everything the batch produced (replies of handlers that answered at once,
                    # credits, pongs) leaves in one write, from this task when the writer idles.
                    # A server's reader awaits that write; a client's must keep reading (a
                    # client that stopped could deadlock with a server sending it a reply).
                    if self._reader_writes:
                        await self.write_direct()
                    else:
                        self.write_now()
                    if core.pending_output > self._read_pause_above:
                        # A peer that sends but does not read (refused calls, pings) must
                        # not grow our output without bound: stop reading until it drains.
                        await self.wait_writable()
                if core.unfinished_bytes and self._unfinished_timer is None:
                    self._watch_unfinished()
                if self._read_waiters:
                    self._wake_read_waiters()
                if not data or core.closed:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lost(map_transport_error(exc, "connection lost"))
            return
        if not self.closed.done():
            self._lost(self.close_error or Unavailable("connection closed by the peer"))

    def _watch_unfinished(self) -> None:
        """Servers: fail unfinished messages that got no piece within the idle deadline."""

    def dispatch(self, event: P.Event) -> None:
        """Handle one protocol event (the read loop does the same lookup inline)."""
        self._dispatch[type(event)](event)

    def on_hello(self, event: P.HelloReceived) -> None:
        if not self.hello.done():
            self.hello.set_result(event)

    def on_connection_closed(self, event: P.ConnectionClosed) -> None:
        if event.protocol_error:
            logger.warning("pilot-rpc connection with %s: %s", _peer_name(self.peer), event.message)
            self.close_error = Internal(
                event.message,
                details={"protocol_error": True},
                info=ErrorInfo("PROTOCOL_ERROR"),
            )
        elif self.close_error is None:  # keep what the peer's GOAWAY said, if anything
            self.close_error = Unavailable(event.message)

    # -- keepalive ------------------------------------------------------------------------------

    def _keepalive_tick(self) -> None:
        interval = self._keepalive_interval
        if interval is None or self.closed.done():
            return
        now = self.loop.time()
        if self._ping_sent_at is not None:
            if self._last_send > self._ping_sent_at:
                self._ping_sent_at = self._last_send
            if now - self._ping_sent_at >= self._keepalive_timeout:
                self._lost(
                    Unavailable(
                        f"peer {_peer_name(self.peer)} did not answer a ping within "
                        f"{self._keepalive_timeout:g} s"
                    )
                )
                return
            delay = self._ping_sent_at + self._keepalive_timeout - now
        elif now - self._last_recv >= interval:
            self.core.ping(os.urandom(8))
            self.kick()
            self._ping_sent_at = now
            delay = self._keepalive_timeout
        else:
            delay = self._last_recv + interval - now
        self._keepalive_handle = self.loop.call_later(max(delay, 0.01), self._keepalive_tick)

    # -- ending ---------------------------------------------------------------------------------

    def _lost(self, error: RpcError) -> None:
        """The connection is unusable: fail everything on it and close the stream."""
        if self.closed.done():
            return
        if self.close_error is None or isinstance(error, Internal):
            self.close_error = error
        self.core.close()
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        if self._unfinished_timer is not None:
            self._unfinished_timer.cancel()
            self._unfinished_timer = None
        if not self.hello.done():
            self.hello.set_exception(self.close_error)
            self.hello.exception()  # mark retrieved: the dialler may have gone
        self.closed.set_result(None)
        self.fail_all(self.close_error)
        self._wake_drain_waiters()
        self._wake_read_waiters()
        self._shutdown = self.loop.create_task(self._shutdown_stream(abort=True))

    def fail_all(self, error: RpcError) -> None:
        raise NotImplementedError

    async def _shutdown_stream(self, *, abort: bool) -> None:
        current = asyncio.current_task()
        writer = self._writer
        if writer is not None and writer is not current and not writer.done() and abort:
            # Let a queued GOAWAY (protocol error) out, briefly.
            self._closing = True
            self.kick()
            await asyncio.wait((writer,), timeout=0.5)
        # The stream first: a reader or writer blocked on it returns at once.
        reader = self._reader
        for task in (writer, reader, self._inline):
            if task is not None and task is not current:
                task.cancel()
        await aclose_quietly(self.stream.aclose())
        await cancel_and_wait(writer, reader, self._inline)

    async def aclose(self, *, flush_timeout: float = 1.0) -> None:
        """Flush queued output (bounded), then close the stream. Idempotent.

        Cancellation: the caller's cancellation is re-raised (after the
        connection's tasks ended).
        """
        if not self.closed.done():
            self._closing = True
            self.kick()
            writer = self._writer
            if writer is not None and not writer.done():
                await asyncio.wait((writer,), timeout=flush_timeout)
            self._lost(Unavailable("connection closed"))
        await self.wait_stopped()

    async def wait_stopped(self) -> None:
        """Wait until the reader, writer and closing tasks are all over."""
        await wait_ended(self._writer, self._reader, self._shutdown)


def _peer_name(peer: Any) -> str:
    if peer is None:
        return "peer"
    return str(getattr(peer, "name", None) or getattr(peer, "node_id", None) or peer)


# =================================================================================================
# Client side
# =================================================================================================


class _InboundItems:
    """What client and server call records share: received items and their reader's wake-up.

    Items are (message, flow) pairs; the reader reports ``flow`` to the protocol once it
    has taken the message, which is what lets the peer send more.
    """

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque[tuple[Any, int]] | None = None
        self.waiter: asyncio.Future[None] | None = None

    def push(self, message: Any, flow: int) -> None:
        items = self.items
        if items is None:
            items = self.items = deque()
        items.append((message, flow))
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


class ClientCall(_InboundItems):
    """One call in flight on a client connection (its items: stream items or progress)."""

    __slots__ = (
        "call_id",
        "conn",
        "done",
        "error",
        "future",
        "on_progress",
        "send_waiter",
        "sent_at",
        "timer",
        "unacked",
    )

    def __init__(self, conn: ClientConnection, call_id: int) -> None:
        super().__init__()
        self.conn = conn
        self.call_id = call_id
        self.future: asyncio.Future[Any] = conn.loop.create_future()
        self.timer: asyncio.TimerHandle | None = None
        self.on_progress: ProgressCallback | None = None
        self.send_waiter: asyncio.Future[None] | None = None
        self.done = False
        self.error: BaseException | None = None
        # Consumed item bytes not yet reported to the protocol (reported in batches).
        self.unacked = 0
        self.sent_at = 0.0


class ClientConnection(_ConnectionBase):
    """A dialled connection that starts calls."""

    def __init__(
        self,
        stream: StreamLike,
        core: P.Connection,
        *,
        keepalive_interval: float | None,
        keepalive_timeout: float,
        max_calls: int,
        on_idle: Callable[[ClientConnection], None] | None = None,
        idle_waiters: deque[asyncio.Future[None]] | None = None,
    ) -> None:
        super().__init__(
            stream, core, keepalive_interval=keepalive_interval, keepalive_timeout=keepalive_timeout
        )
        self.calls: dict[int, ClientCall] = {}
        self.max_calls = max_calls
        self.on_idle = on_idle
        # The pool's queue of callers waiting for a slot: on_idle runs only when it matters.
        self._idle_waiters: deque[asyncio.Future[None]] = (
            idle_waiters if idle_waiters is not None else deque()
        )
        self._dispatch = {
            P.ReplyReceived: self._on_reply,
            P.ErrorReceived: self._on_error,
            P.MessageReceived: self._on_item,
            P.ProgressReceived: self._on_progress,
            P.StreamEnded: self._on_end,
            P.CallRefused: self._on_refused,
            P.SendUnblocked: self._on_unblocked,
            P.GoAwayReceived: self._on_goaway,
            P.PongReceived: _ignore,
            P.HelloReceived: self._on_hello_client,
            P.ConnectionClosed: self.on_connection_closed,
        }

    @property
    def inflight(self) -> int:
        return len(self.calls)

    @property
    def usable(self) -> bool:
        return not self.going_away and not self.closed.done()

    def _on_hello_client(self, event: P.HelloReceived) -> None:
        self.max_calls = min(self.max_calls, event.max_concurrent_calls)
        self.on_hello(event)

    # -- starting calls -------------------------------------------------------------------------

    def start_call(
        self,
        method: str,
        kind: MethodKind,
        request: Any,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
    ) -> ClientCall:
        """Queue the CALL frame; raises InvalidArgument/ResourceExhausted before sending."""
        try:
            call_id = self.core.start_call(
                method, kind, request, timeout=timeout, metadata=metadata
            )
        except P.MessageEncodeError as exc:
            raise InvalidArgument(f"request of {method!r} is {exc}") from exc
        except P.MessageTooLarge as exc:
            raise ResourceExhausted(
                f"request of {method!r}: {exc}", details={"size": exc.size, "limit": exc.limit}
            ) from exc
        except P.LocalProtocolError as exc:
            raise Unavailable(str(exc), retry_safe=True) from exc
        call = ClientCall(self, call_id)
        call.sent_at = self.loop.time()
        calls = self.calls
        calls[call_id] = call
        if timeout is not None:
            call.timer = self.loop.call_later(timeout, self._expire, call, timeout)
        if len(calls) == 1:
            self.write_now()  # alone on the connection: nothing to coalesce with
        else:
            self.kick()
        return call

    def _expire(self, call: ClientCall, timeout: float) -> None:
        if call.done:
            return
        self.core.cancel_call(call.call_id)
        self.kick()
        self._retire_if_silent(call)
        self._finish(call, DeadlineExceeded(f"deadline exceeded (budget {timeout:.3g} s)"))

    def cancel(self, call: ClientCall) -> None:
        """The caller gave up: tell the server, forget the call."""
        if call.done:
            return
        self.core.cancel_call(call.call_id)
        self.kick()
        self._retire_if_silent(call)
        self._finish(call, Cancelled("call cancelled by the caller"))

    def _retire_if_silent(self, call: ClientCall) -> None:
        """A call given up with no frame received since it was sent: retire the connection.

        The remote end may have forgotten the connection without a word (its host or
        daemon restarted, a tunnel stalled): new calls go to a fresh connection, and
        this one closes once its remaining calls end (or keepalive gives up on it).
        A healthy but silent connection costs one new dial.
        """
        if not self.going_away and self._last_recv < call.sent_at:
            logger.debug(
                "retiring the connection to %s: nothing received since a call it gave up on",
                _peer_name(self.peer),
            )
            self.going_away = True

    def _finish(self, call: ClientCall, error: BaseException | None, result: Any = None) -> None:
        call.done = True
        if call.timer is not None:
            call.timer.cancel()
        self.calls.pop(call.call_id, None)
        fut = call.future
        if not fut.done():
            if error is None:
                fut.set_result(result)
            else:
                call.error = error
                fut.set_exception(error)
                fut.exception()  # streams read call.error instead; never "unretrieved"
        call.wake()
        if call.send_waiter is not None and not call.send_waiter.done():
            call.send_waiter.set_result(None)
        if self.on_idle is not None and (self._idle_waiters or self.going_away):
            self.on_idle(self)

    # -- events ---------------------------------------------------------------------------------

    def _on_reply(self, event: P.ReplyReceived) -> None:
        call = self.calls.pop(event.call_id, None)
        if call is None:
            return
        # _finish, inlined for the hot path of every unary call.
        call.done = True
        if call.timer is not None:
            call.timer.cancel()
        fut = call.future
        if not fut.done():
            fut.set_result(event.message)
        if call.waiter is not None:
            call.wake()
        if self.on_idle is not None and (self._idle_waiters or self.going_away):
            self.on_idle(self)

    def _on_error(self, event: P.ErrorReceived) -> None:
        call = self.calls.get(event.call_id)
        if call is not None:
            self._finish(
                call, RpcError.from_code(event.code, event.message, event.details, event.info)
            )

    def _on_item(self, event: P.MessageReceived) -> None:
        call = self.calls.get(event.call_id)
        if call is not None:
            call.push(event.message, event.flow)

    def _on_progress(self, event: P.ProgressReceived) -> None:
        call = self.calls.get(event.call_id)
        if call is None:
            return
        if call.on_progress is None:
            self.core.consumed(event.call_id, event.flow)
            return
        call.push(event.message, event.flow)

    def _on_end(self, event: P.StreamEnded) -> None:
        call = self.calls.get(event.call_id)
        if call is not None:
            self._finish(call, None, None)

    def _on_refused(self, event: P.CallRefused) -> None:
        call = self.calls.get(event.call_id)
        if call is not None:
            self._finish(call, Unavailable(f"call refused: {event.message}", retry_safe=True))

    def _on_unblocked(self, event: P.SendUnblocked) -> None:
        call = self.calls.get(event.call_id)
        if call is not None and call.send_waiter is not None and not call.send_waiter.done():
            call.send_waiter.set_result(None)

    def _on_goaway(self, event: P.GoAwayReceived) -> None:
        self.going_away = True
        if event.code != StatusCode.OK:
            self.close_error = RpcError.from_code(event.code, event.message)
        if self.on_idle is not None:
            self.on_idle(self)

    def fail_all(self, error: RpcError) -> None:
        for call in list(self.calls.values()):
            # One exception object per waiting caller (a shared one would pile up tracebacks).
            err = RpcError.from_code(error.code, error.message, error.details, error.info)
            err.__cause__ = error.__cause__
            self._finish(call, err)

    # -- consuming streams and progress ---------------------------------------------------------

    def credit(self, call: ClientCall) -> None:
        """Report the call's consumed bytes to the protocol (which may send CREDIT)."""
        unacked = call.unacked
        if unacked and not call.done:
            call.unacked = 0
            core = self.core
            core.consumed(call.call_id, unacked)
            if core.pending_output:
                self.kick()

    async def next_item(self, call: ClientCall) -> Any:
        """The next stream item; raises StopAsyncIteration at a clean end, RpcError on error."""
        while True:
            items = call.items
            if items:
                message, flow = items.popleft()
                call.unacked += flow
                if call.unacked >= self.core.credit_threshold:
                    self.credit(call)
                return message
            # Nothing buffered: every consumed byte must be credited before waiting, or a
            # server out of credit and a reader waiting for items would wait for each other.
            self.credit(call)
            if call.done:
                if call.error is not None:
                    raise call.error
                raise StopAsyncIteration
            waiter = self.loop.create_future()
            call.waiter = waiter
            await waiter

    async def wait_reply(self, call: ClientCall) -> Any:
        """The reply of a single-response call, running its progress callback meanwhile."""
        on_progress = call.on_progress
        while True:
            items = call.items
            while items:
                message, flow = items.popleft()
                if on_progress is not None:
                    result = on_progress(message)
                    if result is not None:
                        await result
                if not call.done:
                    self.core.consumed(call.call_id, flow)
                    if self.core.pending_output:
                        self.kick()
            if call.future.done():
                return call.future.result()
            waiter = self.loop.create_future()
            call.waiter = waiter
            await waiter

    async def send_request_item(self, call: ClientCall, value: Any) -> None:
        """Send one request stream item, waiting for credit if needed."""
        if call.done:
            raise call.error or Cancelled("the call is over")
        try:
            sent = self.core.send_item(call.call_id, value)
        except P.MessageEncodeError as exc:
            raise InvalidArgument(f"request item is {exc}") from exc
        except P.MessageTooLarge as exc:
            raise ResourceExhausted(str(exc)) from exc
        except P.LocalProtocolError as exc:
            raise call.error or FailedPrecondition(str(exc)) from exc
        self.kick()
        while not sent and not call.done and self.core.send_blocked(call.call_id):
            waiter = self.loop.create_future()
            call.send_waiter = waiter
            await waiter
        if self.core.pending_output > _HIGH_WATER:
            await self.wait_writable()

    def end_requests(self, call: ClientCall) -> None:
        if call.done:
            return
        try:
            self.core.end_requests(call.call_id)
        except P.LocalProtocolError as exc:
            raise FailedPrecondition(str(exc)) from exc
        self.kick()


def _ignore(event: P.Event) -> None:
    pass


# =================================================================================================
# Server side
# =================================================================================================

_DEADLINE = "deadline"
_PEER_CANCEL = "peer"
_DRAIN = "drain"
_LOST = "lost"
_ABORTED = "aborted"
"""The protocol core failed the call (a budget, an idle unfinished message) and told the peer."""

Authorize = Callable[[str, Any], None]
"""``authorize(method, peer)``: return to allow the call, raise an RpcError to refuse it."""


class ServerCall(_InboundItems):
    """Server-side record of one call: its task, cancel signal and inbound items.

    Its items are the request stream of a client-streaming or bidirectional call.
    """

    __slots__ = (
        "_cancel_event",
        "answered",
        "call_id",
        "cancel_reason",
        "conn",
        "deadline_error",
        "kind",
        "request_done",
        "send_waiter",
        "task",
        "timer",
    )

    def __init__(self, conn: ServerConnection, call_id: int, kind: MethodKind) -> None:
        super().__init__()
        self.conn = conn
        self.call_id = call_id
        self.kind = kind
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        # What to answer at the deadline instead of DEADLINE_EXCEEDED (shorten_deadline).
        self.deadline_error: Callable[[], RpcError] | None = None
        self.cancel_reason: str | None = None
        self._cancel_event: asyncio.Event | None = None
        self.send_waiter: asyncio.Future[None] | None = None
        self.request_done = False
        # The call's status went out before its handler ended (its deadline fired).
        self.answered = False

    # The CallContext control protocol.
    @property
    def cancel_event(self) -> asyncio.Event:
        event = self._cancel_event
        if event is None:
            event = self._cancel_event = asyncio.Event()
            if self.cancel_reason is not None:
                event.set()
        return event

    def is_cancelled(self) -> bool:
        return self.cancel_reason is not None

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        if self._cancel_event is not None:
            self._cancel_event.set()
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.wake()
        if self.send_waiter is not None and not self.send_waiter.done():
            self.send_waiter.set_result(None)

    def expire_at(self, deadline: float, error: Callable[[], RpcError] | None) -> None:
        if self.cancel_reason is not None:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.deadline_error = error
        conn = self.conn
        self.timer = conn.loop.call_at(deadline, conn.deadline_fired, self)

    async def send_progress(self, value: Any) -> None:
        if self.kind not in (MethodKind.UNARY, MethodKind.CLIENT_STREAMING):
            raise FailedPrecondition("send_progress is for unary calls; yield stream items")
        await self.conn.send_flow(self, value, progress=True)


class ServerConnection(_ConnectionBase):
    """An accepted connection that runs calls."""

    def __init__(
        self,
        stream: StreamLike,
        core: P.Connection,
        *,
        options: ServerOptions,
        methods: Mapping[str, tuple[MethodKind, Callable[..., Any]]],
        on_call_done: Callable[[], None],
        idle_waiters: list[asyncio.Future[None]] | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        super().__init__(
            stream,
            core,
            keepalive_interval=options.keepalive_interval,
            keepalive_timeout=options.keepalive_timeout,
        )
        self.options = options
        self.methods = methods
        self.calls: dict[int, ServerCall] = {}
        self._read_pause_above = _READ_PAUSE
        self._reader_writes = True
        self._on_call_done = on_call_done
        # The server's drain waiters: on_call_done runs only while someone waits.
        self._idle_waiters: list[asyncio.Future[None]] = (
            idle_waiters if idle_waiters is not None else []
        )
        self._conn_tag = os.urandom(4).hex()
        self._authorize = authorize
        core.admit = self._admit
        self._dispatch = {
            P.CallReceived: self._on_call,
            P.CallAborted: self._on_aborted,
            P.MessageReceived: self._on_item,
            P.StreamEnded: self._on_request_end,
            P.CallCancelled: self._on_cancelled,
            P.SendUnblocked: self._on_unblocked,
            P.GoAwayReceived: self._on_goaway,
            P.PongReceived: _ignore,
            P.HelloReceived: self.on_hello,
            P.ConnectionClosed: self.on_connection_closed,
        }

    def _admit(self, method: str, kind: MethodKind) -> RpcError | None:
        """The first-piece check of a CALL: the method exists, has that shape, and is allowed."""
        entry = self.methods.get(method)
        if entry is None:
            return Unimplemented(
                f"no method named {method!r}",
                info=ErrorInfo("METHOD_NOT_FOUND", metadata={"method": method}),
            )
        if entry[0] is not kind:
            return Unimplemented(
                f"method {method!r} is {entry[0].name}, called as {kind.name}",
                info=ErrorInfo("METHOD_KIND_MISMATCH", metadata={"method": method}),
            )
        authorize = self._authorize
        if authorize is not None:
            try:
                authorize(method, self.peer)
            except RpcError as refusal:
                return refusal
            except Exception:
                logger.exception("the authorize hook failed for %r; refusing the call", method)
                return Internal(
                    "the server could not authorize the call",
                    info=ErrorInfo("AUTHORIZE_FAILED", metadata={"method": method}),
                )
        return None

    def _watch_unfinished(self) -> None:
        oldest = self.core.oldest_unfinished
        if oldest is None or self.closed.done():
            return
        idle = self.options.unfinished_message_timeout
        when = max(oldest + idle, self.loop.time() + 0.01)
        self._unfinished_timer = self.loop.call_at(when, self._check_unfinished)

    def _check_unfinished(self) -> None:
        self._unfinished_timer = None
        if self.closed.done():
            return
        core = self.core
        for event in core.expire_unfinished(
            self.loop.time(), self.options.unfinished_message_timeout
        ):
            self.dispatch(event)
        if core.pending_output:
            self.kick()
        if core.unfinished_bytes:
            self._watch_unfinished()

    def _on_aborted(self, event: P.CallAborted) -> None:
        call = self.calls.get(event.call_id)
        if call is not None:
            call.cancel(_ABORTED)

    def _on_call(self, event: P.CallReceived) -> None:
        call_id = event.call_id
        entry = self.methods.get(event.method)
        if entry is None:
            self.core.send_error(
                call_id, StatusCode.UNIMPLEMENTED, f"no method named {event.method!r}"
            )
            return
        kind, handler = entry
        if kind is not event.kind:
            self.core.send_error(
                call_id,
                StatusCode.UNIMPLEMENTED,
                f"method {event.method!r} is {kind.name}, called as {event.kind.name}",
            )
            return
        call = ServerCall(self, call_id, kind)
        deadline = None
        loop = self.loop
        if event.timeout is not None:
            deadline = loop.time() + event.timeout
            call.timer = loop.call_at(deadline, self.deadline_fired, call)
        ctx = CallContext(
            peer=self.peer,
            method=event.method,
            call_id=call_id,
            deadline=deadline,
            metadata=event.metadata,
            control=call,
            loop=loop,
            connection_tag=self._conn_tag,
        )
        self.calls[call_id] = call
        if kind is MethodKind.UNARY:
            coro = self._run_unary(call, handler, event.message, ctx)
        elif kind is MethodKind.SERVER_STREAMING:
            coro = self._run_streaming(call, handler, event.message, ctx)
        elif kind is MethodKind.CLIENT_STREAMING:
            coro = self._run_unary(call, handler, self._request_stream(call), ctx)
        else:
            coro = self._run_streaming(call, handler, self._request_stream(call), ctx)
        if sys.version_info >= (3, 12):
            # The handler starts at once, in its own task (current_task() is right): a handler
            # that answers without waiting costs no extra event-loop iteration.
            call.task = asyncio.Task(coro, loop=loop, eager_start=True)
        else:
            call.task = loop.create_task(coro)

    # -- request streams ------------------------------------------------------------------------

    def _on_item(self, event: P.MessageReceived) -> None:
        call = self.calls.get(event.call_id)
        if call is not None:
            call.push(event.message, event.flow)

    def _on_request_end(self, event: P.StreamEnded) -> None:
        call = self.calls.get(event.call_id)
        if call is not None:
            call.request_done = True
            call.wake()

    async def _request_stream(self, call: ServerCall) -> AsyncIterator[Any]:
        core = self.core
        while True:
            items = call.items
            if items:
                message, flow = items.popleft()
                core.consumed(call.call_id, flow)
                if core.pending_output:
                    self.kick()
                yield message
                continue
            if call.request_done:
                return
            waiter = self.loop.create_future()
            call.waiter = waiter
            await waiter

    # -- running handlers -----------------------------------------------------------------------

    async def _run_unary(
        self, call: ServerCall, handler: Callable[..., Any], request: Any, ctx: CallContext
    ) -> None:
        core = self.core
        call_id = call.call_id
        try:
            result = handler(request, ctx)
            if hasattr(result, "__await__"):
                result = await result
        except asyncio.CancelledError:
            self._cancelled(call)
            return
        except Exception as exc:
            self._send_exception(call, exc)
            return
        finally:
            self._call_done(call)
        if call.cancel_reason is not None:
            # The handler swallowed its cancellation: the status stands (at a deadline it
            # went out when the deadline fired) and the late result is discarded.
            if call.answered:
                logger.debug(
                    "handler of %r returned after its call's deadline; result discarded",
                    ctx.method,
                )
            self._cancelled(call)
            return
        try:
            core.send_reply(call_id, result)
        except P.MessageEncodeError as exc:
            self._send_status(
                call, Internal(f"handler of {ctx.method!r} returned a value that is {exc}")
            )
        except P.MessageTooLarge as exc:
            self._send_status(call, ResourceExhausted(f"reply of {ctx.method!r}: {exc}"))
        except P.LocalProtocolError:
            return
        if self.dispatching:
            pass  # answered at once, inside the read loop's batch: it writes after the batch
        elif self.calls:
            self.kick()
        else:
            # No other call to coalesce with: write from this task (ours; the call is done,
            # so nothing cancels it now).
            await self.write_direct()

    async def _run_streaming(
        self, call: ServerCall, handler: Callable[..., Any], request: Any, ctx: CallContext
    ) -> None:
        core = self.core
        call_id = call.call_id
        items: Any = None
        try:
            items = handler(request, ctx)
            if hasattr(items, "__await__"):
                items = await items
            if hasattr(items, "__aiter__"):
                await self._pump_async(call, items)
            else:
                for n, item in enumerate(_as_iter(items)):
                    await self._send_item(call, item)
                    if n % _YIELD_EVERY == _YIELD_EVERY - 1:
                        await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._cancelled(call)
            await _aclose_quietly(items)
            return
        except _ItemRejected as rejected:
            await _aclose_quietly(items)
            self._send_status(call, rejected.error)
            return
        except P.CallNotActive:
            await _aclose_quietly(items)
            return
        except Exception as exc:
            self._send_exception(call, exc)
            return
        finally:
            self._call_done(call)
        with contextlib.suppress(P.LocalProtocolError):
            core.end_stream(call_id)
            self.kick()

    async def _pump_async(self, call: ServerCall, items: Any) -> None:
        core = self.core
        send_item = core.send_item
        call_id = call.call_id
        n = 0
        async for item in items:
            # The common case inline: credit available, output below the high-water mark.
            if call.cancel_reason is not None:
                raise Cancelled("the call is over")
            try:
                sent = send_item(call_id, item)
            except P.MessageEncodeError as exc:
                raise _ItemRejected(
                    Internal(f"handler of call {call_id} produced a stream item that is {exc}")
                ) from exc
            except P.MessageTooLarge as exc:
                raise _ItemRejected(ResourceExhausted(f"stream item: {exc}")) from exc
            if self._write_waiter is not None:
                self.kick()
            if not sent or core.pending_output > _HIGH_WATER:
                await self._wait_sendable(call, sent)
            n += 1
            if n == _YIELD_EVERY:
                n = 0
                await asyncio.sleep(0)

    async def _send_item(self, call: ServerCall, item: Any) -> None:
        await self.send_flow(call, item, progress=False)

    async def send_flow(self, call: ServerCall, value: Any, *, progress: bool) -> None:
        """Send a stream item or progress update, waiting for credit (and the writer)."""
        if call.cancel_reason is not None:
            raise Cancelled("the call is over")
        core = self.core
        try:
            if progress:
                sent = core.send_progress(call.call_id, value)
            else:
                sent = core.send_item(call.call_id, value)
        except P.MessageEncodeError as exc:
            what = "progress value" if progress else "stream item"
            error = Internal(f"handler of call {call.call_id} produced a {what} that is {exc}")
            if progress:
                raise InvalidArgument(f"progress value is {exc}") from exc
            raise _ItemRejected(error) from exc
        except P.MessageTooLarge as exc:
            if progress:
                raise ResourceExhausted(str(exc)) from exc
            raise _ItemRejected(ResourceExhausted(f"stream item: {exc}")) from exc
        self.kick()
        if not sent or core.pending_output > _HIGH_WATER:
            await self._wait_sendable(call, sent)

    async def _wait_sendable(self, call: ServerCall, sent: bool) -> None:
        """Wait for credit (if the last message was held back) and for the writer."""
        core = self.core
        while not sent and core.send_blocked(call.call_id):
            if call.cancel_reason is not None:
                raise Cancelled("the call is over")
            waiter = self.loop.create_future()
            call.send_waiter = waiter
            await waiter
        if core.pending_output > _HIGH_WATER:
            await self.wait_writable()

    def _on_unblocked(self, event: P.SendUnblocked) -> None:
        call = self.calls.get(event.call_id)
        if call is not None and call.send_waiter is not None and not call.send_waiter.done():
            call.send_waiter.set_result(None)

    def _call_done(self, call: ServerCall) -> None:
        if self.calls.pop(call.call_id, None) is not None:
            if call.timer is not None:
                call.timer.cancel()
            if self._idle_waiters:
                self._on_call_done()

    def deadline_fired(self, call: ServerCall) -> None:
        """The call's deadline: cancel its handler and answer DEADLINE_EXCEEDED at once.

        The status does not wait for the handler to end: one that catches its
        cancellation and keeps running cannot hold the caller past the deadline. Its
        late result (or error) is discarded when it ends; the call stays counted as
        in flight until then.
        """
        call.timer = None
        call.cancel(_DEADLINE)
        self._cancelled(call)

    def _cancelled(self, call: ServerCall) -> None:
        reason = call.cancel_reason
        if reason == _DEADLINE:
            if not call.answered:
                call.answered = True
                make = call.deadline_error
                self._send_status(
                    call,
                    make()
                    if make is not None
                    else DeadlineExceeded("deadline exceeded on the server"),
                )
        elif reason == _DRAIN:
            self._send_status(call, Unavailable("the server shut down before the call finished"))
        # _PEER_CANCEL: the client has forgotten the call. _LOST: nobody to tell.

    def _send_exception(self, call: ServerCall, exc: Exception) -> None:
        if call.cancel_reason is not None:
            self._cancelled(call)
            return
        if isinstance(exc, RpcError):
            self._send_status(call, exc)
            return
        logger.exception("handler of call %d from %s raised", call.call_id, _peer_name(self.peer))
        details: dict[str, Any] = {"exception_type": type(exc).__name__}
        if self.options.include_tracebacks:
            details["traceback"] = "".join(traceback.format_exception(exc))
        info = ErrorInfo("HANDLER_EXCEPTION", metadata={"exception_type": type(exc).__name__})
        self._send_status(
            call, Internal(f"{type(exc).__name__}: {exc}", details=details, info=info)
        )

    def _send_status(self, call: ServerCall, error: RpcError) -> None:
        try:
            self.core.send_error(call.call_id, error.code, error.message, error.details, error.info)
        except P.LocalProtocolError:
            return
        self.kick()

    def _on_cancelled(self, event: P.CallCancelled) -> None:
        call = self.calls.get(event.call_id)
        if call is not None:
            call.cancel(_PEER_CANCEL)

    def _on_goaway(self, event: P.GoAwayReceived) -> None:
        self.going_away = True

    def fail_all(self, error: RpcError) -> None:
        for call in list(self.calls.values()):
            call.cancel(_LOST)

    def cancel_all(self, reason: str = _DRAIN) -> int:
        calls = list(self.calls.values())
        for call in calls:
            call.cancel(reason)
        return len(calls)

    @property
    def inflight(self) -> int:
        return len(self.calls)

    async def wait_calls(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait (bounded) for the handler tasks of this connection to finish."""
        tasks = [call.task for call in self.calls.values() if call.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def flush(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait (bounded) until every reply and status queued is written into the stream.

        Replies still waiting for the peer's credit count too (they leave as the peer
        reads). Returns True when everything went out, False on timeout or when the
        connection ended first. Cancellation propagates.
        """
        core = self.core
        loop = self.loop
        try:
            async with asyncio.timeout(timeout):
                while not self.closed.done():
                    if core.pending_output or self._inline is not None or self._held is not None:
                        waiter = loop.create_future()
                        self._drain_waiters.append(waiter)
                        self.kick()
                        await waiter
                    elif core.active_calls:
                        # Parts of replies wait for the peer's credit: wait for its next frames.
                        waiter = loop.create_future()
                        self._read_waiters.append(waiter)
                        await waiter
                    else:
                        return True
        except TimeoutError:
            return False
        return False


class _ItemRejected(Exception):
    def __init__(self, error: RpcError) -> None:
        super().__init__(error.message)
        self.error = error


def _as_iter(items: Any) -> Iterator[Any]:
    if items is None:
        return iter(())
    return iter(items)


async def _aclose_quietly(items: Any) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose_quietly(aclose())


DRAIN_REASON = _DRAIN
