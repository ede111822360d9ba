"""The sans-IO core's peer-facing limits, driven with literal frames.

Authorization on a CALL's first piece, budgets and an idle deadline for
unfinished messages, credit of message pieces (one window plus one message per
call), and the structured error detail on the wire.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from pilot_rpc import _frames as F
from pilot_rpc._protocol import (
    CallAborted,
    CallReceived,
    Connection,
    ConnectionClosed,
    ErrorReceived,
    Event,
    HelloReceived,
    MessageReceived,
    Role,
    UnfinishedBudget,
)
from pilot_rpc._types import MethodKind
from pilot_rpc.errors import ErrorInfo, NotFound, PermissionDenied, RpcError, StatusCode

FRAME = 16384
WINDOW = 65536
LIMITS: dict[str, Any] = {
    "max_frame_size": FRAME,
    "max_message_size": 1024 * 1024,
    "initial_window": WINDOW,
}
_HEADER = struct.Struct(">IBBI")


def frame(kind: int, call_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return _HEADER.pack(len(payload), kind, flags, call_id) + payload


def client_hello() -> bytes:
    body = {
        "proto": "pilot-rpc",
        "versions": [1],
        "max_frame_size": FRAME,
        "max_message_size": 1024 * 1024,
        "max_concurrent_calls": 0,
        "initial_window": WINDOW,
    }
    return frame(F.HELLO, 0, msgpack.packb(body))


def server_hello() -> bytes:
    body = {
        "proto": "pilot-rpc",
        "versions": [1],
        "max_frame_size": FRAME,
        "max_message_size": 1024 * 1024,
        "max_concurrent_calls": 8,
        "initial_window": WINDOW,
    }
    return frame(F.HELLO, 0, msgpack.packb(body))


def server(**kw: Any) -> Connection:
    conn = Connection(Role.SERVER, max_concurrent_calls=8, **LIMITS, **kw)
    conn.data_to_send()
    (hello,) = conn.receive_data(client_hello())
    assert isinstance(hello, HelloReceived)
    return conn


def call_header(method: str, kind: MethodKind) -> bytes:
    header = msgpack.packb([method, int(kind), None, None])
    return struct.pack(">H", len(header)) + header


def frames_of(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split output into (kind, flags, call_id, payload)."""
    out: list[tuple[int, int, int, bytes]] = []
    pos = 0
    while pos < len(data):
        length, kind, flags, call_id = _HEADER.unpack_from(data, pos)
        out.append((kind, flags, call_id, data[pos + 10 : pos + 10 + length]))
        pos += 10 + length
    return out


def errors_sent(conn: Connection) -> dict[int, list[Any]]:
    return {
        call_id: msgpack.unpackb(payload)
        for kind, _, call_id, payload in frames_of(conn.data_to_send())
        if kind == F.ERROR
    }


def bin_prefix(size: int) -> bytes:
    """msgpack bin32 header: the first bytes of a ``size``-byte bytes value."""
    return b"\xc6" + struct.pack(">I", size)


# -- authorization on the first piece -------------------------------------------------------------


def test_refused_call_is_answered_on_its_first_piece_and_its_pieces_are_never_buffered() -> None:
    asked: list[tuple[str, MethodKind]] = []

    def admit(method: str, kind: MethodKind) -> RpcError | None:
        asked.append((method, kind))
        if method == "secret":
            return PermissionDenied(
                "not for you", info=ErrorInfo("ACL_DENIED", "pilot-worker", {"method": method})
            )
        return None

    conn = server(admit=admit)
    size = 512 * 1024
    first = call_header("secret", MethodKind.UNARY) + bin_prefix(size) + b"a" * 15000
    events = conn.receive_data(frame(F.CALL, 1, first, F.FLAG_END_STREAM | F.FLAG_MORE))
    assert events == []
    assert asked == [("secret", MethodKind.UNARY)]
    assert errors_sent(conn) == {
        1: [7, "not for you", {}, ["ACL_DENIED", "pilot-worker", {"method": "secret"}]]
    }
    assert conn.unfinished_bytes == 0
    # The rest of the refused message is dropped unread: nothing held, nothing sent.
    for _ in range(40):
        assert conn.receive_data(frame(F.CONTINUATION, 1, b"b" * FRAME, F.FLAG_MORE)) == []
        assert conn.unfinished_bytes == 0
    assert conn.receive_data(frame(F.CONTINUATION, 1, b"c")) == []
    assert conn.data_to_send() == b""
    # The connection still serves allowed calls.
    whole = call_header("echo", MethodKind.UNARY) + msgpack.packb("hi")
    (event,) = conn.receive_data(frame(F.CALL, 3, whole, F.FLAG_END_STREAM))
    assert isinstance(event, CallReceived)
    assert event.message == "hi"


def test_a_refused_request_stream_drops_its_items() -> None:
    conn = server(admit=lambda method, kind: NotFound("no such method"))
    header = call_header("upload", MethodKind.CLIENT_STREAMING)
    assert conn.receive_data(frame(F.CALL, 1, header)) == []
    assert 1 in errors_sent(conn)
    for _ in range(10):
        assert conn.receive_data(frame(F.ITEM, 1, msgpack.packb("x" * 1000))) == []
    assert conn.receive_data(frame(F.END, 1)) == []
    assert conn.active_calls == 0


# -- budgets for unfinished messages --------------------------------------------------------------


def start_split_call(conn: Connection, call_id: int, piece: int = 15000) -> list[Event]:
    first = call_header("echo", MethodKind.UNARY) + bin_prefix(1000 * 1000) + b"a" * piece
    return conn.receive_data(frame(F.CALL, call_id, first, F.FLAG_END_STREAM | F.FLAG_MORE))


def test_per_connection_budget_fails_the_call_that_would_exceed_it() -> None:
    conn = server(max_unfinished_bytes=40_000)
    assert start_split_call(conn, 1) == []
    assert start_split_call(conn, 3) == []
    held = conn.unfinished_bytes
    assert 30_000 < held <= 40_000
    assert start_split_call(conn, 5) == []  # would exceed: refused, nothing kept
    sent = errors_sent(conn)
    assert list(sent) == [5]
    code, _, details, info = sent[5]
    assert code == StatusCode.RESOURCE_EXHAUSTED
    assert details == {"limit": 40_000}
    assert info[0] == "UNFINISHED_BYTES_PER_CONNECTION"
    assert conn.unfinished_bytes == held
    # Its later pieces are ignored; a piece of call 1 past the budget fails call 1.
    assert conn.receive_data(frame(F.CONTINUATION, 5, b"x" * FRAME, F.FLAG_MORE)) == []
    assert conn.receive_data(frame(F.CONTINUATION, 1, b"x" * FRAME, F.FLAG_MORE)) == []
    assert list(errors_sent(conn)) == [1]
    assert 0 < conn.unfinished_bytes < held
    # Cancelling call 3 frees the rest.
    assert conn.receive_data(frame(F.CANCEL, 3)) == []
    assert conn.unfinished_bytes == 0


def test_a_completed_message_releases_its_budget() -> None:
    budget = UnfinishedBudget(1 << 20)
    conn = server(shared_budget=budget)
    value = b"z" * 40_000
    body = msgpack.packb(value)
    first = call_header("echo", MethodKind.UNARY) + body[:15000]
    assert conn.receive_data(frame(F.CALL, 1, first, F.FLAG_END_STREAM | F.FLAG_MORE)) == []
    assert conn.receive_data(frame(F.CONTINUATION, 1, body[15000:30000], F.FLAG_MORE)) == []
    assert budget.used == conn.unfinished_bytes == 30000
    (event,) = conn.receive_data(frame(F.CONTINUATION, 1, body[30000:]))
    assert isinstance(event, CallReceived)
    assert event.message == value
    assert budget.used == conn.unfinished_bytes == 0


def test_shared_budget_spans_connections_and_is_freed_when_one_closes() -> None:
    budget = UnfinishedBudget(50_000)
    a = server(shared_budget=budget)
    b = server(shared_budget=budget)
    assert start_split_call(a, 1) == []
    assert start_split_call(a, 3) == []
    assert start_split_call(b, 1) == []
    assert budget.used == 3 * a.unfinished_bytes // 2
    assert start_split_call(b, 3) == []
    code, _, _, info = errors_sent(b)[3]
    assert code == StatusCode.RESOURCE_EXHAUSTED
    assert info[0] == "UNFINISHED_BYTES_PER_SERVER"
    held_by_b = b.unfinished_bytes
    (closed,) = a.receive_data(b"")  # a's peer went away
    assert isinstance(closed, ConnectionClosed)
    assert budget.used == held_by_b
    assert start_split_call(b, 5) == []
    assert 5 not in errors_sent(b)


def test_protocol_error_frees_the_budget() -> None:
    budget = UnfinishedBudget(1 << 20)
    conn = server(shared_budget=budget)
    start_split_call(conn, 1)
    assert budget.used > 0
    (event,) = conn.receive_data(frame(F.CALL, 1, b"\x00"))  # id reused: protocol error
    assert isinstance(event, ConnectionClosed)
    assert budget.used == 0


def test_an_unfinished_message_idle_too_long_fails_its_call_and_frees_its_pieces() -> None:
    budget = UnfinishedBudget(1 << 20)
    conn = server(shared_budget=budget)
    conn.now = 100.0
    start_split_call(conn, 1)
    conn.now = 110.0
    start_split_call(conn, 3)
    assert conn.oldest_unfinished == 100.0
    conn.now = 125.0
    assert conn.receive_data(frame(F.CONTINUATION, 3, b"b" * 1000, F.FLAG_MORE)) == []
    assert conn.expire_unfinished(129.0, 30.0) == []
    assert conn.data_to_send() == b""
    # Call 1 got nothing for 30 s; call 3 got a piece at 125.
    assert conn.expire_unfinished(130.0, 30.0) == []  # no handler runs yet: no event
    sent = errors_sent(conn)
    assert list(sent) == [1]
    assert sent[1][0] == StatusCode.DEADLINE_EXCEEDED
    assert sent[1][3][0] == "UNFINISHED_MESSAGE_IDLE"
    assert conn.oldest_unfinished == 125.0
    assert budget.used == conn.unfinished_bytes > 0
    assert conn.expire_unfinished(155.0, 30.0) == []
    assert list(errors_sent(conn)) == [3]
    assert budget.used == conn.unfinished_bytes == 0
    assert conn.oldest_unfinished is None


def test_an_idle_request_item_aborts_the_running_handler() -> None:
    conn = server()
    conn.now = 0.0
    (started,) = conn.receive_data(frame(F.CALL, 1, call_header("up", MethodKind.BIDI_STREAMING)))
    assert isinstance(started, CallReceived)
    item = bin_prefix(50_000) + b"q" * 10_000
    assert conn.receive_data(frame(F.ITEM, 1, item, F.FLAG_MORE)) == []
    (aborted,) = conn.expire_unfinished(31.0, 30.0)
    assert isinstance(aborted, CallAborted)
    assert aborted.call_id == 1
    assert aborted.code == StatusCode.DEADLINE_EXCEEDED
    assert conn.active_calls == 0
    assert conn.unfinished_bytes == 0


# -- credit of message pieces ---------------------------------------------------------------------


class CreditFollowingSender:
    """A literal client that sends each item as [big piece, MORE][1 byte], within its credit."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.credit = WINDOW
        self.sent_messages = 0

    def take_credit(self) -> None:
        for kind, _, call_id, payload in frames_of(self.conn.data_to_send()):
            if kind == F.CREDIT and call_id == 1:
                self.credit += struct.unpack(">I", payload)[0]

    def send_all_it_may(self, delivered: list[MessageReceived]) -> None:
        body = msgpack.packb(b"m" * 15990)  # 15995 bytes: one piece of 15994 and one of 1
        while True:
            self.take_credit()
            if self.credit < len(body):
                return
            events = self.conn.receive_data(
                frame(F.ITEM, 1, body[:-1], F.FLAG_MORE) + frame(F.CONTINUATION, 1, body[-1:])
            )
            self.credit -= len(body)
            self.sent_messages += 1
            delivered += [e for e in events if isinstance(e, MessageReceived)]
            assert self.sent_messages < 1000, "the receiver keeps crediting: no bound"


def test_one_byte_last_pieces_cannot_exceed_one_window_plus_one_message() -> None:
    conn = server()
    (call,) = conn.receive_data(frame(F.CALL, 1, call_header("up", MethodKind.CLIENT_STREAMING)))
    assert isinstance(call, CallReceived)
    sender = CreditFollowingSender(conn)
    delivered: list[MessageReceived] = []
    sender.send_all_it_may(delivered)
    held = sum(len(msgpack.packb(e.message)) for e in delivered)
    assert held <= WINDOW + 15995
    assert len(delivered) == sender.sent_messages
    # Consuming them credits the window back, pieces included: the sender goes on.
    for event in delivered:
        conn.consumed(1, event.flow)
    before = sender.sent_messages
    more: list[MessageReceived] = []
    sender.send_all_it_may(more)
    assert sender.sent_messages > before
    assert sum(len(msgpack.packb(e.message)) for e in more) <= WINDOW + 15995


def test_pieces_owed_while_earlier_messages_wait_are_credited_once_those_are_consumed() -> None:
    conn = server()
    conn.receive_data(frame(F.CALL, 1, call_header("up", MethodKind.CLIENT_STREAMING)))
    small = msgpack.packb("s")
    (first,) = conn.receive_data(frame(F.ITEM, 1, small))
    assert isinstance(first, MessageReceived)
    big = msgpack.packb(b"B" * 40_000)
    # A large message arrives while "s" is unconsumed: its pieces are not credited.
    assert conn.receive_data(frame(F.ITEM, 1, big[:FRAME], F.FLAG_MORE)) == []
    assert conn.receive_data(frame(F.CONTINUATION, 1, big[FRAME : 2 * FRAME], F.FLAG_MORE)) == []
    assert not [f for f in frames_of(conn.data_to_send()) if f[0] == F.CREDIT]
    # The application takes "s": the owed pieces are credited, so the message can finish.
    conn.consumed(1, first.flow)
    credits = [f for f in frames_of(conn.data_to_send()) if f[0] == F.CREDIT]
    assert sum(struct.unpack(">I", f[3])[0] for f in credits) == len(small) + 2 * FRAME
    (last,) = conn.receive_data(frame(F.CONTINUATION, 1, big[2 * FRAME :]))
    assert isinstance(last, MessageReceived)
    assert last.flow == len(big) - 2 * FRAME


# -- the structured error detail on the wire ------------------------------------------------------


def test_error_info_is_encoded_and_decoded() -> None:
    client = Connection(Role.CLIENT, **LIMITS)
    client.data_to_send()
    client.receive_data(server_hello())
    call_id = client.start_call("m", MethodKind.UNARY, 1)
    client.data_to_send()
    payload = msgpack.packb([9, "stale", {"x": 1}, ["STALE_VERSION", "my-app", {"v": "3"}]])
    (event,) = client.receive_data(frame(F.ERROR, call_id, payload))
    assert isinstance(event, ErrorReceived)
    assert event.info == ErrorInfo("STALE_VERSION", "my-app", {"v": "3"})
    error = RpcError.from_code(event.code, event.message, event.details, event.info)
    assert error.info.reason == "STALE_VERSION"
    assert error.details == {"x": 1}


def test_an_error_without_info_gets_the_code_name() -> None:
    client = Connection(Role.CLIENT, **LIMITS)
    client.data_to_send()
    client.receive_data(server_hello())
    call_id = client.start_call("m", MethodKind.UNARY, 1)
    (event,) = client.receive_data(frame(F.ERROR, call_id, msgpack.packb([5, "gone", {}])))
    assert isinstance(event, ErrorReceived)
    assert event.info is None
    error = RpcError.from_code(event.code, event.message, event.details, event.info)
    assert error.info == ErrorInfo("NOT_FOUND", "pilot-rpc", {})


@pytest.mark.parametrize("info", [["R"], [1, "d", {}], ["R", "d", {"k": 1}], "R"])
def test_malformed_error_info_is_a_protocol_error(info: Any) -> None:
    client = Connection(Role.CLIENT, **LIMITS)
    client.data_to_send()
    client.receive_data(server_hello())
    call_id = client.start_call("m", MethodKind.UNARY, 1)
    payload = msgpack.packb([5, "gone", {}, info])
    (event,) = client.receive_data(frame(F.ERROR, call_id, payload))
    assert isinstance(event, ConnectionClosed)
    assert "ERROR info" in event.message


def test_server_sends_error_info_literally() -> None:
    conn = server()
    whole = call_header("m", MethodKind.UNARY) + msgpack.packb(1)
    conn.receive_data(frame(F.CALL, 1, whole, F.FLAG_END_STREAM))
    conn.send_error(1, StatusCode.ABORTED, "lost a race", {"a": 1}, ErrorInfo("RACE", "app"))
    assert frames_of(conn.data_to_send()) == [
        (F.ERROR, 0, 1, msgpack.packb([10, "lost a race", {"a": 1}, ["RACE", "app", {}]]))
    ]


def test_error_info_validates() -> None:
    with pytest.raises(ValueError, match="reason"):
        ErrorInfo("")
    with pytest.raises(ValueError, match="metadata"):
        ErrorInfo("R", metadata={"k": 1})  # type: ignore[dict-item]  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="ErrorInfo"):
        RpcError("x", info="R")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    assert PermissionDenied("no").info == ErrorInfo("PERMISSION_DENIED")


# -- large messages do not hold back control frames and small calls --------------------------------


def client() -> Connection:
    conn = Connection(Role.CLIENT, **LIMITS)
    conn.data_to_send()
    conn.receive_data(server_hello())
    return conn


def test_control_frames_and_small_calls_overtake_a_large_messages_pieces() -> None:
    conn = client()
    big = conn.start_call("upload", MethodKind.UNARY, b"u" * (512 * 1024))
    first = frames_of(conn.data_to_send(2 * FRAME))  # the CALL's first piece and one more
    assert [(k, c) for k, _, c, _ in first] == [(F.CALL, big), (F.CONTINUATION, big)]
    conn.ping(b"12345678")
    small = conn.start_call("echo", MethodKind.UNARY, "hi")
    nxt = frames_of(conn.data_to_send(FRAME))
    # The ping and the small call leave before the next piece of the large request.
    assert [(k, c) for k, _, c, _ in nxt][:2] == [(F.PING, 0), (F.CALL, small)]
    assert all(k == F.CONTINUATION for k, _, _, _ in nxt[2:])
    # A server reading it all sees a valid stream: the small call is complete first.
    srv = server()
    events = srv.receive_data(b"".join(frame(k, c, p, f) for k, f, c, p in first + nxt))
    assert [e.call_id for e in events if isinstance(e, CallReceived)] == [small]
    rest = srv.receive_data(conn.data_to_send())
    (done,) = [e for e in rest if isinstance(e, CallReceived)]
    assert done.call_id == big
    assert done.message == b"u" * (512 * 1024)


def test_pieces_of_two_large_replies_alternate() -> None:
    srv = server()
    for call_id in (1, 3):
        whole = call_header("get", MethodKind.UNARY) + msgpack.packb(call_id)
        srv.receive_data(frame(F.CALL, call_id, whole, F.FLAG_END_STREAM))
    srv.send_reply(1, b"1" * (200 * 1024))
    srv.send_reply(3, b"3" * (200 * 1024))
    out = frames_of(srv.data_to_send())
    order = [c for k, _, c, _ in out]
    assert [k for k, _, _, _ in out[:2]] == [F.REPLY, F.REPLY]
    # After both first pieces, the continuations alternate between the calls.
    assert order[2:8] == [1, 3, 1, 3, 1, 3]
    cl = client()
    cl.start_call("get", MethodKind.UNARY, 1)
    cl.start_call("get", MethodKind.UNARY, 3)
    cl.data_to_send()
    # (the client's own ids are 1 and 2; renumber the server's frames to match)
    renumber = {1: 1, 3: 2}
    events = cl.receive_data(b"".join(frame(k, renumber[c], p, f) for k, f, c, p in out))
    replies = {e.call_id: e.message for e in events if hasattr(e, "message")}
    assert replies == {1: b"1" * (200 * 1024), 2: b"3" * (200 * 1024)}


def test_cancelling_a_large_call_drops_its_queued_pieces() -> None:
    conn = client()
    big = conn.start_call("upload", MethodKind.UNARY, b"u" * (512 * 1024))
    conn.data_to_send(2 * FRAME)
    conn.cancel_call(big)
    assert conn.pending_output == 10  # only the CANCEL frame is left
    assert frames_of(conn.data_to_send()) == [(F.CANCEL, 0, big, b"")]


def test_a_refusal_drops_the_rest_of_our_request() -> None:
    conn = client()
    big = conn.start_call("upload", MethodKind.UNARY, b"u" * (512 * 1024))
    conn.data_to_send(2 * FRAME)
    payload = msgpack.packb([7, "no", {}, ["ACL_DENIED", "app", {}]])
    (event,) = conn.receive_data(frame(F.ERROR, big, payload))
    assert isinstance(event, ErrorReceived)
    assert conn.pending_output == 0
