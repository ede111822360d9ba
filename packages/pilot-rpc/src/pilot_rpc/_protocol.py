"""The sans-IO pilot-rpc protocol: bytes in, events out; calls in, bytes out.

Theory of operation
-------------------

A :class:`Connection` is one end of one byte stream, in the role of CLIENT
(the end that dialled and starts calls) or SERVER (the end that runs them). It
performs no I/O and reads no clock: the driver feeds it what arrived with
:meth:`Connection.receive_data` and gets back a list of events; it tells it
what the application does (``start_call``, ``send_item``, ``send_reply``, ...)
and collects the bytes to write with :meth:`Connection.data_to_send`. Timers
(deadlines, keepalive) belong to the driver, which expresses their outcome as
ordinary calls (``cancel_call``, ``send_error``, ``ping``).

Both ends send HELLO first (without waiting) and accept nothing before the
peer's HELLO, whose limits then bind everything we send: frame size, message
size, per-call flow-control credit. The first header must announce a small
HELLO, so a peer that speaks something else is rejected on its first bytes.

Every call lives in ``_calls`` from its CALL frame until the server's final
frame (REPLY, END or ERROR) or the client's CANCEL. Each call has two halves,
each with its own state (IDLE, OPEN, CLOSED): the request half (client to
server) and the response half (server to client). Which frame may move a half
from which state is the whole state machine, written out in
``REQUEST_TRANSITIONS`` and ``RESPONSE_TRANSITIONS``; the same tables check
what we send (a bug in our driver: :class:`LocalProtocolError`) and what the
peer sends (a protocol violation: the connection ends). A half is "streaming"
when the call's shape gives it a stream (``MethodKind``); a streaming half
carries ITEM frames and ends with END, a single half carries one message.

A message is one msgpack value. One that does not fit the peer's frame size
goes out as a first frame with FLAG_MORE and CONTINUATION frames after it; no
other message frame of that call half may come in between. The receiver adds
up the pieces against its ``max_message_size`` as they arrive, so an oversize
message is refused before it is held in memory.

Stream items and progress updates are flow-controlled per call, in payload
bytes, HTTP/2 style: the receiver grants an initial window (its HELLO) and
CREDIT frames as the application consumes items (``consumed``); a sender out
of credit keeps the rest of that message queued here and the driver waits for
a :class:`SendUnblocked` event, so a slow reader bounds what the writer holds
to one message. Pieces of a message still being assembled are credited at
once, so a message larger than the window cannot deadlock. CALL and REPLY
carry one message each and are bounded by ``max_message_size`` and by the
server's ``max_concurrent_calls``, not by credit.

Frames for a call id that was used but is gone are ignored (they crossed our
CANCEL or final frame on the wire); frames for an id never opened are a
protocol error. Any protocol error queues a GOAWAY naming it, ends the
connection (every later input is ignored) and yields :class:`ConnectionClosed`;
it never raises into the driver's read loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import Any, Final

import msgpack

from pilot_rpc import _frames as F
from pilot_rpc._options import (
    DEFAULT_FRAME_SIZE,
    DEFAULT_MESSAGE_SIZE,
    DEFAULT_WINDOW,
    MAX_FRAME_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_WINDOW,
    MIN_FRAME_SIZE,
    MIN_MESSAGE_SIZE,
    MIN_WINDOW,
)
from pilot_rpc._types import MethodKind
from pilot_rpc.errors import ErrorInfo, RpcError, StatusCode

__all__ = [
    "CallAborted",
    "CallCancelled",
    "CallReceived",
    "CallRefused",
    "Connection",
    "ConnectionClosed",
    "ErrorReceived",
    "Event",
    "GoAwayReceived",
    "HelloReceived",
    "LocalProtocolError",
    "MessageEncodeError",
    "MessageReceived",
    "MessageTooLarge",
    "PongReceived",
    "ProgressReceived",
    "ReplyReceived",
    "Role",
    "SendUnblocked",
    "StreamEnded",
    "UnfinishedBudget",
]

_Buf = bytes | bytearray
_pack_header = F.HEADER.pack
_unpack_header = F.HEADER.unpack_from
_pack_u32 = F.U32.pack
_unpack_u32 = F.U32.unpack_from


class Role(IntEnum):
    CLIENT = 1
    SERVER = 2


class Half(IntEnum):
    IDLE = 0
    OPEN = 1
    CLOSED = 2


# Pseudo-kinds for the tables: a CALL with FLAG_END_STREAM (single request) or without.
_CALL_SINGLE: Final = 0x102
_CALL_STREAM: Final = 0x202

# (half is streaming, state, frame kind) -> next state. Absent: not allowed.
REQUEST_TRANSITIONS: Final[Mapping[tuple[bool, Half, int], Half]] = {
    (False, Half.IDLE, _CALL_SINGLE): Half.CLOSED,
    (True, Half.IDLE, _CALL_STREAM): Half.OPEN,
    (True, Half.OPEN, F.ITEM): Half.OPEN,
    (True, Half.OPEN, F.END): Half.CLOSED,
}
RESPONSE_TRANSITIONS: Final[Mapping[tuple[bool, Half, int], Half]] = {
    (False, Half.IDLE, F.PROGRESS): Half.IDLE,
    (False, Half.IDLE, F.REPLY): Half.CLOSED,
    (False, Half.IDLE, F.ERROR): Half.CLOSED,
    (True, Half.IDLE, F.ITEM): Half.OPEN,
    (True, Half.OPEN, F.ITEM): Half.OPEN,
    (True, Half.IDLE, F.END): Half.CLOSED,
    (True, Half.OPEN, F.END): Half.CLOSED,
    (True, Half.IDLE, F.ERROR): Half.CLOSED,
    (True, Half.OPEN, F.ERROR): Half.CLOSED,
}
_STREAMING_REQUEST: Final = frozenset({MethodKind.CLIENT_STREAMING, MethodKind.BIDI_STREAMING})
_STREAMING_RESPONSE: Final = frozenset({MethodKind.SERVER_STREAMING, MethodKind.BIDI_STREAMING})
_FLOW_CONTROLLED: Final = frozenset({F.ITEM, F.PROGRESS})

_KINDS: Final = {int(k): k for k in MethodKind}
_unpackb = msgpack.unpackb

NO_MESSAGE: Final[Any] = object()
"""Placeholder for "this CALL carries no message" (streaming requests)."""


class LocalProtocolError(Exception):
    """Our own side tried something the protocol forbids (a driver bug or a misuse)."""


class CallNotActive(LocalProtocolError):
    """The call is gone (finished, cancelled by the peer, or the connection ended)."""


class MessageEncodeError(ValueError):
    """A value msgpack cannot encode."""


class MessageTooLarge(ValueError):
    """An encoded message exceeds the peer's ``max_message_size``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the peer's limit of {limit} bytes")
        self.size = size
        self.limit = limit


class _RemoteProtocolError(Exception):
    """The peer broke the protocol; the connection ends."""


# -- events ---------------------------------------------------------------------------------------


class Event:
    """Base of everything :meth:`Connection.receive_data` returns."""

    __slots__ = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )


class HelloReceived(Event):
    __slots__ = (
        "agent",
        "initial_window",
        "max_concurrent_calls",
        "max_frame_size",
        "max_message_size",
        "version",
    )

    def __init__(
        self,
        version: int,
        max_frame_size: int,
        max_message_size: int,
        max_concurrent_calls: int,
        initial_window: int,
        agent: str,
    ) -> None:
        self.version = version
        self.max_frame_size = max_frame_size
        self.max_message_size = max_message_size
        self.max_concurrent_calls = max_concurrent_calls
        self.initial_window = initial_window
        self.agent = agent


class CallReceived(Event):
    """SERVER: a new call. ``message`` is the request, or NO_MESSAGE for a request stream."""

    __slots__ = ("call_id", "kind", "message", "metadata", "method", "timeout")

    def __init__(
        self,
        call_id: int,
        method: str,
        kind: MethodKind,
        timeout: float | None,
        metadata: dict[str, str],
        message: Any,
    ) -> None:
        self.call_id = call_id
        self.method = method
        self.kind = kind
        self.timeout = timeout
        self.metadata = metadata
        self.message = message


class MessageReceived(Event):
    """A stream item. Call ``consumed(call_id, flow)`` once the application has taken it."""

    __slots__ = ("call_id", "flow", "message")

    def __init__(self, call_id: int, message: Any, flow: int) -> None:
        self.call_id = call_id
        self.message = message
        self.flow = flow


class ProgressReceived(Event):
    """CLIENT: a progress update of a single-response call (flow-controlled like items)."""

    __slots__ = ("call_id", "flow", "message")

    def __init__(self, call_id: int, message: Any, flow: int) -> None:
        self.call_id = call_id
        self.message = message
        self.flow = flow


class ReplyReceived(Event):
    """CLIENT: the final reply of a single-response call (status OK). The call is over."""

    __slots__ = ("call_id", "message")

    def __init__(self, call_id: int, message: Any) -> None:
        self.call_id = call_id
        self.message = message


class StreamEnded(Event):
    """The peer's stream ended: CLIENT: responses done, status OK (call over);
    SERVER: the request stream is complete."""

    __slots__ = ("call_id",)

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id


class ErrorReceived(Event):
    """CLIENT: the server ended the call with an error status. The call is over."""

    __slots__ = ("call_id", "code", "details", "info", "message")

    def __init__(
        self,
        call_id: int,
        code: int,
        message: str,
        details: dict[str, Any],
        info: ErrorInfo | None = None,
    ) -> None:
        self.call_id = call_id
        self.code = code
        self.message = message
        self.details = details
        self.info = info


class CallCancelled(Event):
    """SERVER: the client cancelled the call. The call is over; send nothing more on it."""

    __slots__ = ("call_id",)

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id


class CallAborted(Event):
    """SERVER: this end failed a call whose handler runs (a budget or an idle deadline for an
    unfinished message); its ERROR is queued. Stop the handler; send nothing more on it."""

    __slots__ = ("call_id", "code", "message")

    def __init__(self, call_id: int, code: int, message: str) -> None:
        self.call_id = call_id
        self.code = code
        self.message = message


class CallRefused(Event):
    """CLIENT: the server's GOAWAY says this call was never processed (safe to retry)."""

    __slots__ = ("call_id", "message")

    def __init__(self, call_id: int, message: str) -> None:
        self.call_id = call_id
        self.message = message


class SendUnblocked(Event):
    """Credit arrived and every queued piece of this call's messages went out."""

    __slots__ = ("call_id",)

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id


class PongReceived(Event):
    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class GoAwayReceived(Event):
    """The peer starts no new calls (SERVER sent it: it accepts none with id > last_call_id)."""

    __slots__ = ("code", "last_call_id", "message")

    def __init__(self, last_call_id: int, code: int, message: str) -> None:
        self.last_call_id = last_call_id
        self.code = code
        self.message = message


class ConnectionClosed(Event):
    """The connection is over: EOF from the peer, or a protocol error (then ``code`` is INTERNAL
    and ``protocol_error`` is true; a GOAWAY naming it is queued for the peer)."""

    __slots__ = ("code", "message", "protocol_error")

    def __init__(self, code: int, message: str, protocol_error: bool) -> None:
        self.code = code
        self.message = message
        self.protocol_error = protocol_error


# -- per-call state -------------------------------------------------------------------------------


class _Call:
    __slots__ = (
        "asm_buf",
        "asm_flow",
        "asm_kind",
        "asm_touched",
        "asm_uncredited",
        "deferred",
        "held",
        "kind",
        "recv_credit",
        "recv_unacked",
        "request",
        "response",
        "send_credit",
        "stream_request",
        "stream_response",
    )

    def __init__(self, kind: MethodKind, send_credit: int, recv_credit: int) -> None:
        self.kind = kind
        self.stream_request = kind in _STREAMING_REQUEST
        self.stream_response = kind in _STREAMING_RESPONSE
        self.request = Half.IDLE
        self.response = Half.IDLE
        self.send_credit = send_credit
        self.recv_credit = recv_credit
        self.recv_unacked = 0
        # Inbound message under assembly (FLAG_MORE seen): its kind and the bytes so far.
        self.asm_kind = 0
        self.asm_buf: bytearray | None = None
        self.asm_flow = False
        # When the last piece of it arrived (the driver's clock, see Connection.now).
        self.asm_touched = 0.0
        # Flow-controlled bytes of it not credited back yet (see _piece_credit).
        self.asm_uncredited = 0
        # Bytes of delivered messages the application has not consumed yet.
        self.held = 0
        # Outbound pieces waiting for credit: [kind, flags, remaining view, first?].
        self.deferred: deque[list[Any]] | None = None


class UnfinishedBudget:
    """Bytes of unfinished (partly received) messages several connections may hold together.

    Pure bookkeeping, shared by the connections of one server; no I/O, no clock.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes; False (nothing reserved) if that would exceed the limit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


Admit = Callable[[str, MethodKind], RpcError | None]
"""SERVER: decides on a CALL's first piece whether it may proceed (None) or is refused."""


def _decode(data: bytes | bytearray | memoryview) -> Any:
    return _unpackb(data, raw=False, strict_map_key=False)


class Connection:
    """One end of a pilot-rpc connection, without I/O. See the module docstring.

    Args:
        role: CLIENT (dialled; starts calls) or SERVER (accepted; runs them).
        max_frame_size: Largest frame payload we accept.
        max_message_size: Largest message we accept.
        max_concurrent_calls: SERVER: calls we run at once (more are refused
            with RESOURCE_EXHAUSTED). CLIENT: announced as 0.
        initial_window: Credit per call we grant the peer for stream items.
        agent: Free text naming the implementation, for logs.
        admit: SERVER: called with the method and kind on the first piece of
            every CALL, before anything of it is buffered; an ``RpcError`` it
            returns is sent as the call's ERROR and the call's further frames
            are dropped unread.
        max_unfinished_bytes: SERVER: bytes of partly received messages this
            connection may hold at once (``None``: only ``max_message_size``
            per message); the call whose piece would exceed it fails with
            RESOURCE_EXHAUSTED and its pieces are freed.
        shared_budget: SERVER: the same, shared with other connections.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_FRAME_SIZE,
        max_message_size: int = DEFAULT_MESSAGE_SIZE,
        max_concurrent_calls: int = 1024,
        initial_window: int = DEFAULT_WINDOW,
        agent: str = "pilot-rpc-python",
        admit: Admit | None = None,
        max_unfinished_bytes: int | None = None,
        shared_budget: UnfinishedBudget | None = None,
    ) -> None:
        self.role = role
        self.admit = admit
        """SERVER: the first-piece check of every CALL (settable after construction)."""
        self.max_unfinished_bytes = max_unfinished_bytes if max_unfinished_bytes else 1 << 62
        self._shared_budget = shared_budget
        self.unfinished_bytes = 0
        """Bytes of partly received messages held right now."""
        # Calls with a message under assembly, oldest first.
        self._assembling: dict[int, _Call] = {}
        self.now = 0.0
        """The driver's clock, set before receive_data; stamps unfinished messages."""
        self.max_frame_size = max_frame_size
        self.max_message_size = max_message_size
        self.max_concurrent_calls = max_concurrent_calls if role is Role.SERVER else 0
        self.initial_window = initial_window
        self.credit_threshold = max(1, initial_window // 4)
        """Consumed bytes worth a CREDIT frame (callers may batch ``consumed`` up to this)."""
        # The peer's limits; known once its HELLO is in.
        self.peer_hello: HelloReceived | None = None
        self.peer_max_frame_size = MIN_FRAME_SIZE
        self.peer_max_message_size = MIN_MESSAGE_SIZE
        self.peer_initial_window = MIN_WINDOW
        self.peer_max_concurrent_calls = 0

        self._calls: dict[int, _Call] = {}
        # SERVER: calls whose request message is still arriving in pieces.
        self._pending_calls: dict[int, CallReceived] = {}
        self._highest_call_id = 0
        self._out: list[bytes | bytearray | memoryview] = []
        # CONTINUATION pieces of large CALL/REPLY messages, per call, in order. They leave
        # after everything in _out and round-robin between calls, so control frames and
        # small calls never wait behind a large message (see data_to_send).
        self._bulk: dict[int, deque[tuple[bytes, memoryview]]] = {}
        self.pending_output = 0
        """Bytes queued for :meth:`data_to_send` (a plain attribute: read on every call)."""
        self._inbuf = bytearray()
        self._packer = msgpack.Packer(use_bin_type=True, datetime=False)
        self.closed = False
        self.goaway_sent = False
        self.goaway_received = False
        self._goaway_last_call_id = F.MAX_CALL_ID
        self._handlers: dict[int, Callable[[int, int, _Buf, list[Event]], None]] = {
            F.CALL: self._on_call,
            F.REPLY: self._on_reply,
            F.ITEM: self._on_item,
            F.PROGRESS: self._on_progress,
            F.CONTINUATION: self._on_continuation,
            F.END: self._on_end,
            F.ERROR: self._on_error,
            F.CANCEL: self._on_cancel,
            F.CREDIT: self._on_credit,
            F.PING: self._on_ping,
            F.PONG: self._on_pong,
            F.GOAWAY: self._on_goaway,
            F.HELLO: self._on_late_hello,
        }
        self._emit(
            F.HELLO,
            0,
            0,
            self._packer.pack(
                {
                    "proto": F.PROTOCOL_NAME,
                    "versions": list(F.SUPPORTED_VERSIONS),
                    "max_frame_size": max_frame_size,
                    "max_message_size": max_message_size,
                    "max_concurrent_calls": self.max_concurrent_calls,
                    "initial_window": initial_window,
                    "agent": agent,
                }
            ),
        )

    # -- queries ----------------------------------------------------------------------------------

    @property
    def active_calls(self) -> int:
        """Calls currently open on this connection."""
        return len(self._calls)

    @property
    def ready(self) -> bool:
        """True once the peer's HELLO arrived and the connection is usable."""
        return self.peer_hello is not None and not self.closed

    def is_active(self, call_id: int) -> bool:
        return call_id in self._calls

    def send_blocked(self, call_id: int) -> bool:
        """True while part of a message on this call waits for credit."""
        call = self._calls.get(call_id)
        return call is not None and bool(call.deferred)

    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """Take the queued output (at least one frame's worth, about ``max_bytes`` at most).

        Frames leave in the order they were queued, except the CONTINUATION pieces
        of large CALL and REPLY messages: those follow everything else queued and
        alternate between calls, one piece each. So a PING, PONG, CREDIT, a small
        call or reply queued while a large message leaves waits for at most one
        ``max_bytes`` write, not for the whole message.
        """
        if self._bulk:
            return self._data_with_bulk(max_bytes)
        out = self._out
        if not out:
            return b""
        if max_bytes is None or self.pending_output <= max_bytes:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.pending_output = 0
            return bytes(data)
        taken = 0
        n = 0
        for chunk in out:
            taken += len(chunk)
            n += 1
            if taken >= max_bytes:
                break
        data = b"".join(out[:n])
        del out[:n]
        self.pending_output -= taken
        return data

    def _data_with_bulk(self, max_bytes: int | None) -> bytes:
        out = self._out
        taken = 0
        n = 0
        for chunk in out:
            taken += len(chunk)
            n += 1
            if max_bytes is not None and taken >= max_bytes:
                break
        parts: list[bytes | bytearray | memoryview] = out[:n]
        del out[:n]
        bulk = self._bulk
        while bulk and (max_bytes is None or taken < max_bytes):
            for call_id in list(bulk):
                queue = bulk[call_id]
                header, piece = queue.popleft()
                parts.append(header)
                parts.append(piece)
                taken += len(header) + len(piece)
                if not queue:
                    del bulk[call_id]
                if max_bytes is not None and taken >= max_bytes:
                    break
        self.pending_output -= taken
        return b"".join(parts)

    def _emit_piece(self, call_id: int, flags: int, piece: memoryview) -> None:
        """Queue a CONTINUATION piece of a large CALL/REPLY (see data_to_send)."""
        queue = self._bulk.get(call_id)
        if queue is None:
            queue = self._bulk[call_id] = deque()
        n = len(piece)
        queue.append((_pack_header(n, F.CONTINUATION, flags, call_id), piece))
        self.pending_output += n + F.HEADER_SIZE

    def _drop_pieces(self, call_id: int) -> None:
        """Forget the queued pieces of a call that is over (they would be ignored)."""
        queue = self._bulk.pop(call_id, None)
        if queue:
            self.pending_output -= sum(len(h) + len(p) for h, p in queue)

    # -- encoding ---------------------------------------------------------------------------------

    def encode(self, value: Any) -> bytes:
        """Encode one message value. Raises MessageEncodeError, MessageTooLarge."""
        try:
            data = self._packer.pack(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise MessageEncodeError(f"not msgpack-encodable: {exc}") from exc
        if len(data) > self.peer_max_message_size:
            raise MessageTooLarge(len(data), self.peer_max_message_size)
        return data

    # -- output helpers ---------------------------------------------------------------------------

    def _emit(self, kind: int, flags: int, call_id: int, payload: bytes | memoryview) -> None:
        n = len(payload)
        if n <= 4096:
            self._out.append(_pack_header(n, kind, flags, call_id) + payload)
        else:
            self._out.append(_pack_header(n, kind, flags, call_id))
            self._out.append(payload)
        self.pending_output += n + F.HEADER_SIZE

    def _emit_message(self, kind: int, flags: int, call_id: int, data: bytes) -> None:
        """Emit a whole message, split into CONTINUATION pieces if it exceeds the frame size."""
        limit = self.peer_max_frame_size
        if len(data) <= limit:
            self._emit(kind, flags, call_id, data)
            return
        view = memoryview(data)
        self._emit(kind, flags | F.FLAG_MORE, call_id, view[:limit])
        pos = limit
        end = len(data)
        while pos < end:
            nxt = min(pos + limit, end)
            self._emit_piece(call_id, F.FLAG_MORE if nxt < end else 0, view[pos:nxt])
            pos = nxt

    def _send_flow(self, call_id: int, call: _Call, kind: int, data: bytes) -> bool:
        """Send a flow-controlled message (ITEM/PROGRESS); True if it all went out."""
        n = len(data)
        if not call.deferred and n <= call.send_credit and n <= self.peer_max_frame_size:
            call.send_credit -= n
            self._emit(kind, 0, call_id, data)
            return True
        if call.deferred is None:
            call.deferred = deque()
        call.deferred.append([kind, 0, memoryview(data), True])
        self._flush_deferred(call_id, call)
        return not call.deferred

    def _queue_after_deferred(
        self, call_id: int, call: _Call, kind: int, flags: int, data: bytes
    ) -> bool:
        """Queue an unmetered frame/message behind deferred pieces, or send it now."""
        if call.deferred:
            call.deferred.append([kind, flags, memoryview(data), True])
            return False
        self._emit_message(kind, flags, call_id, data)
        return True

    def _flush_deferred(self, call_id: int, call: _Call) -> None:
        deferred = call.deferred
        assert deferred is not None
        max_frame = self.peer_max_frame_size
        while deferred:
            entry = deferred[0]
            kind, flags, view, first = entry
            if kind not in _FLOW_CONTROLLED:
                deferred.popleft()
                if first:
                    self._emit_message(kind, flags, call_id, bytes(view))
                continue
            remaining = len(view)
            credit = call.send_credit
            piece = min(credit, max_frame, remaining)
            # Avoid silly-window pieces: wait for a useful amount of credit.
            if piece < min(remaining, 1024):
                return
            more = piece < remaining
            frame_kind = kind if first else F.CONTINUATION
            frame_flags = flags | F.FLAG_MORE if more else flags
            call.send_credit = credit - piece
            self._emit(frame_kind, frame_flags, call_id, view[:piece])
            if more:
                entry[2] = view[piece:]
                entry[3] = False
            else:
                deferred.popleft()

    # -- CLIENT operations ------------------------------------------------------------------------

    def start_call(
        self,
        method: str,
        kind: MethodKind,
        request: Any = NO_MESSAGE,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> int:
        """CLIENT: start a call; returns its id. Single-request shapes need ``request``.

        Raises MessageEncodeError / MessageTooLarge (nothing is sent then),
        LocalProtocolError if the connection cannot take new calls.
        """
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the client starts calls")
        if self.closed or self.goaway_sent or self.goaway_received:
            raise LocalProtocolError("the connection takes no new calls")
        if self.peer_hello is None:
            raise LocalProtocolError("wait for the peer's HELLO before starting calls")
        streaming_request = kind in _STREAMING_REQUEST
        if streaming_request != (request is NO_MESSAGE):
            raise LocalProtocolError(
                f"{kind.name} calls {'take no' if streaming_request else 'need a'} request message"
            )
        if self._highest_call_id >= F.MAX_CALL_ID:
            raise LocalProtocolError("call ids exhausted on this connection")
        if request is NO_MESSAGE:
            body = b""
        else:
            try:
                body = self._packer.pack(request)
            except (TypeError, ValueError, OverflowError) as exc:
                raise MessageEncodeError(f"not msgpack-encodable: {exc}") from exc
            if len(body) > self.peer_max_message_size:
                raise MessageTooLarge(len(body), self.peer_max_message_size)
        timeout_us = None if timeout is None else max(0, int(timeout * 1_000_000))
        header = self._packer.pack([method, int(kind), timeout_us, metadata or None])
        header_limit = min(0xFFFF, self.peer_max_frame_size // 2)
        if len(header) > header_limit:
            raise MessageTooLarge(len(header), header_limit)
        call_id = self._highest_call_id + 1
        self._highest_call_id = call_id
        call = _Call(kind, self.peer_initial_window, self.initial_window)
        call.request = Half.OPEN if streaming_request else Half.CLOSED
        self._calls[call_id] = call
        flags = 0 if streaming_request else F.FLAG_END_STREAM
        prefix = F.CALL_HEADER_LEN.pack(len(header)) + header
        size = len(prefix) + len(body)
        if size <= 4096:
            self._out.append(_pack_header(size, F.CALL, flags, call_id) + prefix + body)
            self.pending_output += size + 10
        elif size <= self.peer_max_frame_size:
            self._emit(F.CALL, flags, call_id, prefix + body)
        else:
            # The header frame carries as much of the body as fits; pieces follow.
            room = self.peer_max_frame_size - len(prefix)
            view = memoryview(body)
            self._emit(F.CALL, flags | F.FLAG_MORE, call_id, prefix + bytes(view[:room]))
            pos = room
            end = len(body)
            limit = self.peer_max_frame_size
            while pos < end:
                nxt = min(pos + limit, end)
                self._emit_piece(call_id, F.FLAG_MORE if nxt < end else 0, view[pos:nxt])
                pos = nxt
        return call_id

    def end_requests(self, call_id: int) -> None:
        """CLIENT: the request stream of a streaming-request call is complete."""
        call = self._require(call_id, Role.CLIENT)
        self._transition_request(call, F.END)
        self._queue_after_deferred(call_id, call, F.END, 0, b"")

    def cancel_call(self, call_id: int) -> None:
        """CLIENT: give up on a call. The server stops it; the call is forgotten here.
        A no-op for a call that is already over."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the client cancels calls")
        if self._drop(call_id) is not None and not self.closed:
            self._drop_pieces(call_id)
            self._emit(F.CANCEL, 0, call_id, b"")

    # -- SERVER operations ------------------------------------------------------------------------

    def send_reply(self, call_id: int, value: Any) -> None:
        """SERVER: the final reply of a single-response call (status OK); the call ends."""
        call = self._require(call_id, Role.SERVER)
        data = self.encode(value)
        if call.response is Half.IDLE and not call.stream_response and not call.deferred:
            # IDLE --REPLY--> CLOSED on a single response with nothing queued: the hot path.
            call.response = Half.CLOSED
            n = len(data)
            if n <= 4096:
                self._out.append(_pack_header(n, F.REPLY, 0, call_id) + data)
                self.pending_output += n + 10
            else:
                self._emit_message(F.REPLY, 0, call_id, data)
            self._drop(call_id)
            return
        self._transition_response(call, F.REPLY)
        self._queue_after_deferred(call_id, call, F.REPLY, 0, data)
        self._finish_server_call(call_id, call)

    def send_progress(self, call_id: int, value: Any) -> bool:
        """SERVER: a progress update of a single-response call. False: wait for SendUnblocked."""
        call = self._require(call_id, Role.SERVER)
        data = self.encode(value)
        self._transition_response(call, F.PROGRESS)
        return self._send_flow(call_id, call, F.PROGRESS, data)

    def end_stream(self, call_id: int) -> None:
        """SERVER: the response stream is complete (status OK); the call ends."""
        call = self._require(call_id, Role.SERVER)
        self._transition_response(call, F.END)
        self._queue_after_deferred(call_id, call, F.END, 0, b"")
        self._finish_server_call(call_id, call)

    def send_error(
        self,
        call_id: int,
        code: int,
        message: str,
        details: Mapping[str, Any] | None = None,
        info: ErrorInfo | None = None,
    ) -> None:
        """SERVER: end the call with an error status. Overrides queued pieces of the call.

        Details that msgpack cannot encode are replaced by their ``repr``.
        """
        call = self._require(call_id, Role.SERVER)
        if code == StatusCode.OK:
            raise LocalProtocolError("an ERROR frame needs a non-OK code")
        self._transition_response(call, F.ERROR)
        call.deferred = None
        self._drop_pieces(call_id)
        self._emit_error(call_id, code, message, details, info)
        self._finish_server_call(call_id, call)

    def _emit_error(
        self,
        call_id: int,
        code: int,
        message: str,
        details: Mapping[str, Any] | None,
        info: ErrorInfo | None,
    ) -> None:
        wire_info = info.to_wire() if info is not None else None
        body: list[Any] = [int(code), message, dict(details or {})]
        if wire_info is not None:
            body.append(wire_info)
        try:
            payload = self._packer.pack(body)
        except (TypeError, ValueError, OverflowError):
            body[2] = {"details_repr": repr(dict(details or {}))[:4096]}
            payload = self._packer.pack(body)
        if len(payload) > self.peer_max_frame_size:
            body = [int(code), message[:4096], {"truncated": True}]
            if wire_info is not None:
                body.append([wire_info[0], wire_info[1], {}])
            payload = self._packer.pack(body)
        self._emit(F.ERROR, 0, call_id, payload)

    def _finish_server_call(self, call_id: int, call: _Call) -> None:
        # The call record stays while pieces still wait for credit (they must go out in order);
        # it is dropped once they did (see _on_credit).
        if not call.deferred:
            self._drop(call_id)

    # -- both roles -------------------------------------------------------------------------------

    def send_item(self, call_id: int, value: Any) -> bool:
        """Send one stream item (SERVER: response item; CLIENT: request item).

        Returns False when part of it waits for credit: the caller should wait
        for :class:`SendUnblocked` before sending more on this call.
        """
        call = self._calls.get(call_id)
        if call is None or self.closed:
            raise CallNotActive(f"call {call_id} is not active")
        try:
            data = self._packer.pack(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise MessageEncodeError(f"not msgpack-encodable: {exc}") from exc
        if len(data) > self.peer_max_message_size:
            raise MessageTooLarge(len(data), self.peer_max_message_size)
        if self.role is Role.SERVER:
            # OPEN --ITEM--> OPEN is the hot path of every stream: skip the table lookup.
            if call.response is not Half.OPEN or not call.stream_response:
                self._transition_response(call, F.ITEM)
        else:
            self._transition_request(call, F.ITEM)
        n = len(data)
        if not call.deferred and n <= call.send_credit and n <= self.peer_max_frame_size:
            call.send_credit -= n
            if n <= 4096:
                self._out.append(_pack_header(n, F.ITEM, 0, call_id) + data)
                self.pending_output += n + 10
            else:
                self._emit(F.ITEM, 0, call_id, data)
            return True
        return self._send_flow(call_id, call, F.ITEM, data)

    def consumed(self, call_id: int, flow: int) -> None:
        """The application took a received item/progress of ``flow`` bytes: credit the peer."""
        call = self._calls.get(call_id)
        if call is None or self.closed or flow <= 0:
            return
        held = call.held - flow
        call.held = held if held > 0 else 0
        if held <= 0 and call.asm_uncredited:
            # Everything before the message under assembly is consumed: its pieces are owed.
            flow += call.asm_uncredited
            call.asm_uncredited = 0
        unacked = call.recv_unacked + flow
        if unacked >= self.credit_threshold:
            call.recv_unacked = 0
            call.recv_credit += unacked
            self._emit(F.CREDIT, 0, call_id, _pack_u32(unacked))
        else:
            call.recv_unacked = unacked

    def ping(self, payload: bytes = b"\0" * 8) -> None:
        """Send a PING (8 bytes); the peer answers with a PONG carrying the same bytes."""
        if len(payload) != F.PING_PAYLOAD_SIZE:
            raise LocalProtocolError("a ping carries exactly 8 bytes")
        if not self.closed:
            self._emit(F.PING, 0, 0, payload)

    def goaway(self, code: int = StatusCode.OK, message: str = "") -> None:
        """Announce that this end starts/accepts no new calls.

        SERVER: calls with ids above the highest seen are ignored from now on
        (the client learns from our GOAWAY that they were not processed).
        """
        if self.closed or self.goaway_sent:
            return
        self.goaway_sent = True
        last = self._highest_call_id
        if self.role is Role.SERVER:
            self._goaway_last_call_id = last
        self._emit(F.GOAWAY, 0, 0, self._packer.pack([last, int(code), message[:1024]]))

    def close(self) -> None:
        """Mark the connection over locally (no more input is processed)."""
        self.closed = True
        self._release_all()
        self._calls.clear()

    # -- receiving --------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes (``b""`` for EOF); returns the events they complete."""
        events: list[Event] = []
        if self.closed:
            return events
        if not data:
            self.closed = True
            self._release_all()
            self._calls.clear()
            message = "peer closed the connection"
            if self._inbuf:
                message += f" in the middle of a frame ({len(self._inbuf)} bytes pending)"
            self._inbuf = bytearray()
            events.append(ConnectionClosed(StatusCode.UNAVAILABLE, message, False))
            return events
        inbuf = self._inbuf
        if inbuf:
            inbuf += data
            buf: bytes | bytearray = inbuf
        else:
            buf = data
        size = len(buf)
        pos = 0
        max_frame = self.max_frame_size
        handlers = self._handlers
        try:
            if self.peer_hello is None:
                pos = self._receive_hello(buf, events)
                if self.peer_hello is None:
                    if buf is not inbuf:
                        self._inbuf = bytearray(buf)
                    return events
            while size - pos >= 10:
                length, kind, flags, call_id = _unpack_header(buf, pos)
                if length > max_frame:
                    raise _RemoteProtocolError(
                        f"frame of {length} bytes exceeds max_frame_size {max_frame}"
                    )
                end = pos + 10 + length
                if end > size:
                    break
                payload = buf[pos + 10 : end]
                pos = end
                handler = handlers.get(kind)
                if handler is not None:
                    handler(flags, call_id, payload, events)
                # Unknown frame kinds are ignored (room for extensions).
        except _RemoteProtocolError as exc:
            events.append(self._fail(str(exc)))
            return events
        if pos == size:
            if inbuf:
                inbuf.clear()
        elif buf is inbuf:
            del inbuf[:pos]
        else:
            self._inbuf = bytearray(buf[pos:])
        return events

    def _receive_hello(self, buf: bytes | bytearray, events: list[Event]) -> int:
        if len(buf) < 10:
            if len(buf) >= 5 and buf[4] != F.HELLO:
                raise _RemoteProtocolError("the first frame must be HELLO")
            return 0
        length, kind, _flags, call_id = _unpack_header(buf, 0)
        if kind != F.HELLO or call_id != 0 or length > F.HELLO_MAX_SIZE:
            raise _RemoteProtocolError("the first frame must be a HELLO of at most 4096 bytes")
        if len(buf) < 10 + length:
            return 0
        try:
            hello = _decode(buf[10 : 10 + length])
        except Exception as exc:
            raise _RemoteProtocolError(f"malformed HELLO: {exc}") from None
        if not isinstance(hello, dict) or hello.get("proto") != F.PROTOCOL_NAME:
            raise _RemoteProtocolError("HELLO does not name the pilot-rpc protocol")
        versions: Any = hello.get("versions")
        if not isinstance(versions, list):
            raise _RemoteProtocolError("HELLO has no version list")
        common = set(F.SUPPORTED_VERSIONS).intersection(
            v for v in versions if isinstance(v, int) and not isinstance(v, bool)
        )
        if not common:
            raise _RemoteProtocolError(f"no common protocol version (peer offers {versions!r})")

        def limit(name: str, low: int, high: int, default: int) -> int:
            value = hello.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise _RemoteProtocolError(f"HELLO {name}={value!r} outside [{low}, {high}]")
            return value

        agent = hello.get("agent", "")
        event = HelloReceived(
            version=max(common),
            max_frame_size=limit("max_frame_size", MIN_FRAME_SIZE, MAX_FRAME_SIZE, MIN_FRAME_SIZE),
            max_message_size=limit(
                "max_message_size", MIN_MESSAGE_SIZE, MAX_MESSAGE_SIZE, MIN_MESSAGE_SIZE
            ),
            max_concurrent_calls=limit("max_concurrent_calls", 0, 2**31 - 1, 0),
            initial_window=limit("initial_window", MIN_WINDOW, MAX_WINDOW, MIN_WINDOW),
            agent=agent[:256] if isinstance(agent, str) else "",
        )
        if self.role is Role.CLIENT and event.max_concurrent_calls < 1:
            raise _RemoteProtocolError("the server announced max_concurrent_calls < 1")
        self.peer_hello = event
        self.peer_max_frame_size = event.max_frame_size
        self.peer_max_message_size = event.max_message_size
        self.peer_initial_window = event.initial_window
        self.peer_max_concurrent_calls = event.max_concurrent_calls
        events.append(event)
        return 10 + length

    def _fail(self, message: str) -> ConnectionClosed:
        """A protocol violation by the peer: queue GOAWAY, end the connection."""
        self._emit(
            F.GOAWAY,
            0,
            0,
            self._packer.pack(
                [self._highest_call_id, int(StatusCode.INTERNAL), f"protocol error: {message}"]
            ),
        )
        self.goaway_sent = True
        self.closed = True
        for call_id in list(self._bulk):
            self._drop_pieces(call_id)  # the GOAWAY leaves alone
        self._release_all()
        self._calls.clear()
        self._inbuf = bytearray()
        return ConnectionClosed(StatusCode.INTERNAL, f"protocol error: {message}", True)

    # -- per-kind handlers (flags, call_id, payload, events) --------------------------------------

    def _lookup(self, call_id: int, kind: int) -> _Call | None:
        """The call a frame belongs to; None for a finished call (ignore the frame)."""
        call = self._calls.get(call_id)
        if call is None and (call_id == 0 or call_id > self._highest_call_id):
            raise _RemoteProtocolError(f"{F.KIND_NAMES[kind]} frame for unknown call {call_id}")
        return call

    def _on_call(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        if self.role is not Role.SERVER:
            raise _RemoteProtocolError("CALL frame sent to a client")
        if call_id <= self._highest_call_id:
            raise _RemoteProtocolError(f"CALL id {call_id} is not above {self._highest_call_id}")
        self._highest_call_id = call_id
        if len(payload) < 2:
            raise _RemoteProtocolError("CALL frame too short")
        header_len = (payload[0] << 8) | payload[1]
        if 2 + header_len > len(payload):
            raise _RemoteProtocolError("CALL header length exceeds the frame")
        try:
            header = _decode(payload[2 : 2 + header_len])
        except Exception as exc:
            raise _RemoteProtocolError(f"malformed CALL header: {exc}") from None
        method, kind, timeout, metadata = self._check_call_header(header)
        streaming_request = kind in _STREAMING_REQUEST
        end_stream = bool(flags & F.FLAG_END_STREAM)
        body = payload[2 + header_len :]
        if streaming_request == end_stream or streaming_request == bool(body):
            raise _RemoteProtocolError(
                f"CALL of a {kind.name} method with "
                f"{'END_STREAM' if end_stream else 'no END_STREAM'}, "
                f"{'a' if body else 'no'} message"
            )
        if self.goaway_sent and call_id > self._goaway_last_call_id:
            return  # refused by our GOAWAY; the client knows from last_call_id
        if len(self._calls) >= self.max_concurrent_calls:
            # Refused, never processed: the client may retry it elsewhere or later.
            self._emit(
                F.ERROR,
                0,
                call_id,
                self._packer.pack(
                    [
                        int(StatusCode.RESOURCE_EXHAUSTED),
                        f"too many concurrent calls on this connection "
                        f"(limit {self.max_concurrent_calls})",
                        {"limit": self.max_concurrent_calls, "retry_safe": True},
                        [
                            "CONCURRENCY_LIMIT",
                            "pilot-rpc",
                            {"limit": str(self.max_concurrent_calls)},
                        ],
                    ]
                ),
            )
            return
        if len(body) > self.max_message_size:
            raise _RemoteProtocolError("request message exceeds max_message_size")
        admit = self.admit
        if admit is not None:
            refusal = admit(method, kind)
            if refusal is not None:
                # Decided on the first piece: nothing of the call is kept, and its further
                # frames name a call that is over, so they are dropped unread.
                self._emit_error(
                    call_id, refusal.code, refusal.message, refusal.details, refusal.info
                )
                return
        call = _Call(kind, self.peer_initial_window, self.initial_window)
        call.request = Half.OPEN if streaming_request else Half.CLOSED
        self._calls[call_id] = call
        event = CallReceived(call_id, method, kind, timeout, metadata, NO_MESSAGE)
        if not body:
            events.append(event)
            return
        if flags & F.FLAG_MORE:
            call.asm_kind = F.CALL
            call.asm_flow = False
            self._pending_calls[call_id] = event
            self._start_assembly(call_id, call, body, events)
            return
        event.message = self._decode_message(body)
        events.append(event)

    @staticmethod
    def _check_call_header(header: Any) -> tuple[str, MethodKind, float | None, dict[str, str]]:
        if not isinstance(header, list) or len(header) < 4:
            raise _RemoteProtocolError("CALL header is not [method, kind, timeout, metadata]")
        method, kind, timeout, metadata = header[0], header[1], header[2], header[3]
        if not isinstance(method, str) or not 0 < len(method) <= F.MAX_METHOD_LEN:
            raise _RemoteProtocolError("CALL method must be a non-empty string")
        kind_value = _KINDS.get(kind) if type(kind) is int else None
        if kind_value is None:
            raise _RemoteProtocolError(f"CALL has an unknown method kind {kind!r}")
        kind = kind_value
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
                raise _RemoteProtocolError("CALL timeout must be microseconds >= 0 or nil")
            timeout = timeout / 1_000_000
        if metadata is None:
            metadata = {}
        elif not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise _RemoteProtocolError("CALL metadata must map strings to strings")
        return method, kind, timeout, metadata

    def _decode_message(self, data: bytes | bytearray) -> Any:
        try:
            return _unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:
            raise _RemoteProtocolError(f"malformed message: {type(exc).__name__}: {exc}") from None

    def _check_transition(self, call: _Call, kind: int, *, receiving: bool) -> None:
        """Apply the table for a message/END/ERROR frame travelling in its direction."""
        if (self.role is Role.SERVER) == receiving:  # the frame travels towards the server
            nxt = REQUEST_TRANSITIONS.get((call.stream_request, call.request, kind))
            if nxt is None:
                self._bad_transition(call, kind, "request", receiving)
            call.request = nxt  # type: ignore[assignment]  # pyright: ignore[reportAttributeAccessIssue]
        else:
            nxt = RESPONSE_TRANSITIONS.get((call.stream_response, call.response, kind))
            if nxt is None:
                self._bad_transition(call, kind, "response", receiving)
            call.response = nxt  # type: ignore[assignment]  # pyright: ignore[reportAttributeAccessIssue]

    @staticmethod
    def _bad_transition(call: _Call, kind: int, half: str, receiving: bool) -> None:
        state = call.request if half == "request" else call.response
        message = (
            f"{F.KIND_NAMES.get(kind, hex(kind))} not allowed on the {half} half of a "
            f"{call.kind.name} call in state {state.name}"
        )
        if receiving:
            raise _RemoteProtocolError(message)
        raise LocalProtocolError(message)

    def _transition_request(self, call: _Call, kind: int) -> None:
        self._check_transition(call, kind, receiving=False)

    def _transition_response(self, call: _Call, kind: int) -> None:
        self._check_transition(call, kind, receiving=False)

    def _require(self, call_id: int, role: Role) -> _Call:
        if self.role is not role:
            raise LocalProtocolError(f"only the {role.name.lower()} may do that")
        call = self._calls.get(call_id)
        if call is None or self.closed:
            raise CallNotActive(f"call {call_id} is not active")
        return call

    def _on_reply(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        if self.role is not Role.CLIENT:
            raise _RemoteProtocolError("REPLY frame sent to a server")
        call = self._calls.get(call_id)
        if (
            call is not None
            and not flags & F.FLAG_MORE
            and call.asm_buf is None
            and call.response is Half.IDLE
            and not call.stream_response
            and 0 < len(payload) <= self.max_message_size
        ):
            # IDLE --REPLY--> CLOSED, a whole message: the hot path of every unary call.
            del self._calls[call_id]
            try:
                message = _unpackb(payload, raw=False, strict_map_key=False)
            except Exception as exc:
                raise _RemoteProtocolError(
                    f"malformed message: {type(exc).__name__}: {exc}"
                ) from None
            events.append(ReplyReceived(call_id, message))
            return
        self._on_message(F.REPLY, flags, call_id, payload, events)

    def _on_item(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        # The hot path of every stream, inlined: a whole item on an open streaming half.
        call = self._calls.get(call_id)
        n = len(payload)
        if (
            call is not None
            and not flags & F.FLAG_MORE
            and call.asm_buf is None
            and 0 < n <= call.recv_credit
            and n <= self.max_message_size
        ):
            if self.role is Role.CLIENT:
                if call.response is Half.OPEN and call.stream_response:
                    call.recv_credit -= n
                    call.held += n
                    events.append(MessageReceived(call_id, self._decode_message(payload), n))
                    return
            elif call.request is Half.OPEN and call.stream_request:
                call.recv_credit -= n
                call.held += n
                events.append(MessageReceived(call_id, self._decode_message(payload), n))
                return
        self._on_message(F.ITEM, flags, call_id, payload, events)

    def _on_progress(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        if self.role is not Role.CLIENT:
            raise _RemoteProtocolError("PROGRESS frame sent to a server")
        self._on_message(F.PROGRESS, flags, call_id, payload, events)

    def _on_message(
        self, kind: int, flags: int, call_id: int, payload: _Buf, events: list[Event]
    ) -> None:
        call = self._lookup(call_id, kind)
        if call is None:
            return
        if call.asm_buf is not None:
            raise _RemoteProtocolError(f"new message on call {call_id} before its CONTINUATION")
        self._check_transition(call, kind, receiving=True)
        n = len(payload)
        if n == 0:
            raise _RemoteProtocolError(f"empty {F.KIND_NAMES[kind]} frame on call {call_id}")
        if n > self.max_message_size:
            raise _RemoteProtocolError(
                f"message on call {call_id} exceeds max_message_size {self.max_message_size}"
            )
        flow = kind != F.REPLY
        if flow:
            self._charge(call_id, call, n)
        if flags & F.FLAG_MORE:
            call.asm_kind = kind
            call.asm_flow = flow
            if self._start_assembly(call_id, call, payload, events) and flow:
                self._piece_credit(call_id, call, n)
            return
        self._deliver(call_id, call, kind, self._decode_message(payload), n, events)

    def _on_continuation(
        self, flags: int, call_id: int, payload: _Buf, events: list[Event]
    ) -> None:
        call = self._lookup(call_id, F.CONTINUATION)
        if call is None:
            return
        buf = call.asm_buf
        if buf is None:
            raise _RemoteProtocolError(f"CONTINUATION on call {call_id} without a message")
        n = len(payload)
        if len(buf) + n > self.max_message_size:
            raise _RemoteProtocolError(
                f"message on call {call_id} exceeds max_message_size {self.max_message_size}"
            )
        if call.asm_flow:
            self._charge(call_id, call, n)
        if flags & F.FLAG_MORE:
            if not self._reserve(call_id, call, n, events):
                return
            buf += payload
            call.asm_touched = self.now
            if call.asm_flow:
                self._piece_credit(call_id, call, n)
            return
        kind = call.asm_kind
        self._end_assembly(call_id, call)  # releases the reserved pieces (not this last one)
        buf += payload
        message = self._decode_message(buf)
        if kind == F.CALL:
            event = self._pending_calls.pop(call_id)
            event.message = message
            events.append(event)
        else:
            # Pieces credited while they arrived are not owed again; the rest (with the last
            # piece) is returned when the application consumes the message.
            flow = call.asm_uncredited + n
            call.asm_uncredited = 0
            self._deliver(call_id, call, kind, message, flow, events)

    # -- unfinished messages: budgets, idle deadline, credit of their pieces ---------------------

    def _start_assembly(self, call_id: int, call: _Call, piece: _Buf, events: list[Event]) -> bool:
        """Keep the first piece of a message; False if the call failed over a budget."""
        n = len(piece)
        call.asm_buf = bytearray()
        self._assembling[call_id] = call
        if not self._reserve(call_id, call, n, events):
            return False
        call.asm_buf += piece
        call.asm_touched = self.now
        return True

    def _reserve(self, call_id: int, call: _Call, n: int, events: list[Event]) -> bool:
        """Count ``n`` more unfinished bytes against the budgets, or fail the call."""
        if self.role is Role.SERVER:
            shared = self._shared_budget
            if self.unfinished_bytes + n > self.max_unfinished_bytes:
                self._abort_assembly(
                    call_id,
                    call,
                    "UNFINISHED_BYTES_PER_CONNECTION",
                    f"partly received messages on this connection would exceed "
                    f"{self.max_unfinished_bytes} bytes",
                    self.max_unfinished_bytes,
                    events,
                )
                return False
            if shared is not None and not shared.take(n):
                self._abort_assembly(
                    call_id,
                    call,
                    "UNFINISHED_BYTES_PER_SERVER",
                    f"partly received messages on this server would exceed {shared.limit} bytes",
                    shared.limit,
                    events,
                )
                return False
        self.unfinished_bytes += n
        return True

    def _end_assembly(self, call_id: int, call: _Call) -> None:
        """The message is complete (or dropped): release what its pieces held."""
        buf = call.asm_buf
        if buf is None:
            return
        call.asm_buf = None
        self._assembling.pop(call_id, None)
        n = len(buf)
        self.unfinished_bytes -= n
        if self._shared_budget is not None and self.role is Role.SERVER:
            self._shared_budget.release(n)

    def _drop(self, call_id: int) -> _Call | None:
        """Forget a call, freeing its unfinished message if it had one."""
        call = self._calls.pop(call_id, None)
        if call is not None and call.asm_buf is not None:
            self._end_assembly(call_id, call)
        return call

    def _release_all(self) -> None:
        """The connection is over: every unfinished message is freed."""
        for call_id, call in list(self._assembling.items()):
            self._end_assembly(call_id, call)
        self._assembling.clear()
        self._pending_calls.clear()

    def _abort_assembly(
        self,
        call_id: int,
        call: _Call,
        reason: str,
        message: str,
        limit: float,
        events: list[Event],
        code: int = StatusCode.RESOURCE_EXHAUSTED,
    ) -> None:
        """SERVER: fail a call whose request message cannot be finished; free its pieces."""
        started = call_id not in self._pending_calls
        self._end_assembly(call_id, call)
        self._pending_calls.pop(call_id, None)
        self._calls.pop(call_id, None)
        self._emit_error(
            call_id,
            code,
            message,
            {"limit": limit},
            ErrorInfo(reason, "pilot-rpc", {"limit": f"{limit:g}"}),
        )
        if started:  # its handler runs (a request stream item was arriving): stop it
            events.append(CallAborted(call_id, int(code), message))

    @property
    def oldest_unfinished(self) -> float | None:
        """When the least recently extended unfinished message last got a piece, if any."""
        if not self._assembling:
            return None
        return min(call.asm_touched for call in self._assembling.values())

    def expire_unfinished(self, now: float, idle: float) -> list[Event]:
        """SERVER: fail calls whose unfinished message got no piece for ``idle`` seconds.

        Each such call is answered DEADLINE_EXCEEDED and its pieces are freed.
        ``now`` is the driver's clock (the one it stores in :attr:`now`).
        """
        events: list[Event] = []
        if self.role is not Role.SERVER or self.closed:
            return events
        for call_id, call in list(self._assembling.items()):
            if now - call.asm_touched >= idle:
                self._abort_assembly(
                    call_id,
                    call,
                    "UNFINISHED_MESSAGE_IDLE",
                    f"no piece of the unfinished message arrived for {idle:g} s",
                    idle,
                    events,
                    code=StatusCode.DEADLINE_EXCEEDED,
                )
        return events

    def _piece_credit(self, call_id: int, call: _Call, n: int) -> None:
        """Credit for a piece of an unfinished flow-controlled message.

        Returned at once only while every earlier message of the call has been
        consumed (the application waits for this one, and a message larger than
        the window must not deadlock); otherwise owed until those are consumed.
        So what a call holds stays within one window plus one message.
        """
        if call.held:
            call.asm_uncredited += n
        else:
            self._grant(call_id, call, n)

    def _grant(self, call_id: int, call: _Call, n: int) -> None:
        unacked = call.recv_unacked + n
        if unacked >= self.credit_threshold:
            call.recv_unacked = 0
            call.recv_credit += unacked
            self._emit(F.CREDIT, 0, call_id, _pack_u32(unacked))
        else:
            call.recv_unacked = unacked

    def _charge(self, call_id: int, call: _Call, n: int) -> None:
        if n > call.recv_credit:
            raise _RemoteProtocolError(
                f"call {call_id} sent {n} bytes with {call.recv_credit} bytes of credit"
            )
        call.recv_credit -= n

    def _deliver(
        self, call_id: int, call: _Call, kind: int, message: Any, flow: int, events: list[Event]
    ) -> None:
        if kind == F.ITEM:
            call.held += flow
            events.append(MessageReceived(call_id, message, flow))
        elif kind == F.PROGRESS:
            call.held += flow
            events.append(ProgressReceived(call_id, message, flow))
        else:  # REPLY
            del self._calls[call_id]
            events.append(ReplyReceived(call_id, message))

    def _on_end(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        call = self._lookup(call_id, F.END)
        if call is None:
            return
        if call.asm_buf is not None:
            raise _RemoteProtocolError(f"END on call {call_id} in the middle of a message")
        self._check_transition(call, F.END, receiving=True)
        if self.role is Role.CLIENT:
            del self._calls[call_id]
        events.append(StreamEnded(call_id))

    def _on_error(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        if self.role is not Role.CLIENT:
            raise _RemoteProtocolError("ERROR frame sent to a server")
        call = self._lookup(call_id, F.ERROR)
        if call is None:
            return
        try:
            body = _decode(payload)
        except Exception as exc:
            raise _RemoteProtocolError(f"malformed ERROR: {exc}") from None
        if (
            not isinstance(body, list)
            or len(body) < 3
            or isinstance(body[0], bool)
            or not isinstance(body[0], int)
            or body[0] == 0
            or not isinstance(body[1], str)
            or not isinstance(body[2], dict)
        ):
            raise _RemoteProtocolError("ERROR is not [code != 0, message, details]")
        code, message, details = body[0], body[1], body[2]
        info = None
        if len(body) > 3 and body[3] is not None:
            try:
                info = ErrorInfo.from_wire(body[3])
            except ValueError as exc:
                raise _RemoteProtocolError(f"malformed ERROR info: {exc}") from None
        self._check_transition(call, F.ERROR, receiving=True)
        self._drop(call_id)
        self._drop_pieces(call_id)  # the rest of our request would be ignored
        events.append(ErrorReceived(call_id, code, message, details, info))

    def _on_cancel(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        if self.role is not Role.SERVER:
            raise _RemoteProtocolError("CANCEL frame sent to a client")
        call = self._lookup(call_id, F.CANCEL)
        if call is None:
            return
        del self._calls[call_id]
        unstarted = call_id in self._pending_calls
        self._end_assembly(call_id, call)
        if unstarted:
            del self._pending_calls[call_id]
            return  # the request never completed: no handler was started
        events.append(CallCancelled(call_id))

    def _on_credit(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        if len(payload) != 4:
            raise _RemoteProtocolError("CREDIT payload must be 4 bytes")
        call = self._lookup(call_id, F.CREDIT)
        if call is None:
            return
        (increment,) = _unpack_u32(payload)
        credit = call.send_credit + increment
        if increment == 0 or credit > F.MAX_CREDIT:
            raise _RemoteProtocolError(f"CREDIT of {increment} on call {call_id} is invalid")
        call.send_credit = credit
        if call.deferred:
            self._flush_deferred(call_id, call)
            if not call.deferred:
                if self.role is Role.SERVER and call.response is Half.CLOSED:
                    self._drop(call_id)
                else:
                    events.append(SendUnblocked(call_id))

    def _on_ping(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        if len(payload) != F.PING_PAYLOAD_SIZE or call_id != 0:
            raise _RemoteProtocolError("PING must carry 8 bytes on call 0")
        self._emit(F.PONG, 0, 0, bytes(payload))

    def _on_pong(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        if len(payload) != F.PING_PAYLOAD_SIZE or call_id != 0:
            raise _RemoteProtocolError("PONG must carry 8 bytes on call 0")
        events.append(PongReceived(bytes(payload)))

    def _on_goaway(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        try:
            body = _decode(payload)
        except Exception as exc:
            raise _RemoteProtocolError(f"malformed GOAWAY: {exc}") from None
        if (
            not isinstance(body, list)
            or len(body) < 3
            or isinstance(body[0], bool)
            or not isinstance(body[0], int)
            or isinstance(body[1], bool)
            or not isinstance(body[1], int)
            or not isinstance(body[2], str)
        ):
            raise _RemoteProtocolError("GOAWAY is not [last_call_id, code, message]")
        last, code, message = body[0], body[1], body[2]
        self.goaway_received = True
        events.append(GoAwayReceived(last, code, message))
        if self.role is Role.CLIENT:
            for refused in [cid for cid in self._calls if cid > last]:
                self._drop(refused)
                self._drop_pieces(refused)
                events.append(CallRefused(refused, message or "the server is going away"))

    def _on_late_hello(self, flags: int, call_id: int, payload: _Buf, events: list[Event]) -> None:
        raise _RemoteProtocolError("a second HELLO")
