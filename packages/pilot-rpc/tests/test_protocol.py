"""The sans-IO core, driven with literal bytes and as a client/server pair without sockets."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from pilot_rpc import _frames as F
from pilot_rpc._protocol import (
    NO_MESSAGE,
    REQUEST_TRANSITIONS,
    RESPONSE_TRANSITIONS,
    CallCancelled,
    CallNotActive,
    CallReceived,
    CallRefused,
    Connection,
    ConnectionClosed,
    ErrorReceived,
    Event,
    GoAwayReceived,
    Half,
    HelloReceived,
    LocalProtocolError,
    MessageEncodeError,
    MessageReceived,
    MessageTooLarge,
    PongReceived,
    ProgressReceived,
    ReplyReceived,
    Role,
    SendUnblocked,
    StreamEnded,
)
from pilot_rpc._types import MethodKind
from pilot_rpc.errors import StatusCode

LIMITS: dict[str, Any] = {
    "max_frame_size": 16384,
    "max_message_size": 1024 * 1024,
    "initial_window": 65536,
}


def frame(kind: int, call_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return struct.pack(">IBBI", len(payload), kind, flags, call_id) + payload


def hello_payload(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "proto": "pilot-rpc",
        "versions": [1],
        "max_frame_size": 16384,
        "max_message_size": 1024 * 1024,
        "max_concurrent_calls": 8,
        "initial_window": 65536,
        "agent": "test",
    }
    body.update(overrides)
    return msgpack.packb(body)


def server_hello(**overrides: Any) -> bytes:
    return frame(F.HELLO, 0, hello_payload(**overrides))


def client_hello(**overrides: Any) -> bytes:
    return frame(F.HELLO, 0, hello_payload(max_concurrent_calls=0, **overrides))


def pair(**server_kw: Any) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, **LIMITS)
    server = Connection(Role.SERVER, max_concurrent_calls=server_kw.pop("calls", 8), **LIMITS)
    assert isinstance(server.receive_data(client.data_to_send())[0], HelloReceived)
    assert isinstance(client.receive_data(server.data_to_send())[0], HelloReceived)
    return client, server


def pump(src: Connection, dst: Connection) -> list[Event]:
    data = src.data_to_send()
    return dst.receive_data(data) if data else []


def ready_server() -> Connection:
    """A server that has exchanged HELLO with a literal client."""
    server = Connection(Role.SERVER, max_concurrent_calls=8, **LIMITS)
    server.data_to_send()
    (hello,) = server.receive_data(client_hello())
    assert isinstance(hello, HelloReceived)
    return server


def ready_client() -> Connection:
    client = Connection(Role.CLIENT, **LIMITS)
    client.data_to_send()
    (hello,) = client.receive_data(server_hello())
    assert isinstance(hello, HelloReceived)
    return client


# -- literal bytes --------------------------------------------------------------------------------


def test_hello_is_the_first_frame_and_literal() -> None:
    conn = Connection(Role.CLIENT, agent="t", **LIMITS)
    data = conn.data_to_send()
    assert data[:10] == b"\x00\x00\x00\x76\x01\x00\x00\x00\x00\x00"
    assert msgpack.unpackb(data[10:]) == {
        "proto": "pilot-rpc",
        "versions": [1],
        "max_frame_size": 16384,
        "max_message_size": 1048576,
        "max_concurrent_calls": 0,
        "initial_window": 65536,
        "agent": "t",
    }


def test_unary_call_literal_bytes() -> None:
    client = ready_client()
    call_id = client.start_call(
        "echo", MethodKind.UNARY, {"a": 1}, timeout=1.5, metadata={"x": "y"}
    )
    assert call_id == 1
    expected = (
        b"\x00\x00\x00\x17"  # payload length 23
        b"\x02"  # CALL
        b"\x02"  # END_STREAM
        b"\x00\x00\x00\x01"  # call 1
        b"\x00\x11"  # header length 17
        b"\x94\xa4echo\x01\xce\x00\x16\xe3\x60\x81\xa1x\xa1y"  # ["echo", 1, 1500000, {"x": "y"}]
        b"\x81\xa1a\x01"  # {"a": 1}
    )
    assert client.data_to_send() == expected

    server = ready_server()
    assert server.receive_data(expected) == [
        CallReceived(1, "echo", MethodKind.UNARY, 1.5, {"x": "y"}, {"a": 1})
    ]
    server.send_reply(1, [1, 2])
    reply = server.data_to_send()
    assert reply == b"\x00\x00\x00\x03\x03\x00\x00\x00\x00\x01\x92\x01\x02"
    assert client.receive_data(reply) == [ReplyReceived(1, [1, 2])]
    assert client.active_calls == 0


def test_error_literal_bytes() -> None:
    client = ready_client()
    client.start_call("get", MethodKind.UNARY, "k")
    client.data_to_send()
    payload = b"\x93\x05\xa7missing\x81\xa3key\xa1k"  # [5, "missing", {"key": "k"}]
    events = client.receive_data(frame(F.ERROR, 1, payload))
    assert events == [ErrorReceived(1, StatusCode.NOT_FOUND, "missing", {"key": "k"})]


def test_ping_is_answered_with_the_same_bytes() -> None:
    server = ready_server()
    assert server.receive_data(frame(F.PING, 0, b"12345678")) == []
    assert server.data_to_send() == frame(F.PONG, 0, b"12345678")
    client = ready_client()
    assert client.receive_data(frame(F.PONG, 0, b"abcdefgh")) == [PongReceived(b"abcdefgh")]


def test_byte_at_a_time_gives_the_same_events() -> None:
    client, server = pair()
    client.start_call("echo", MethodKind.UNARY, {"payload": "x" * 300})
    client.start_call("count", MethodKind.SERVER_STREAMING, 3)
    data = client.data_to_send()
    whole = Connection(Role.SERVER, max_concurrent_calls=8, **LIMITS)
    whole.receive_data(Connection(Role.CLIENT, **LIMITS).data_to_send())
    expected = whole.receive_data(data)
    events: list[Event] = []
    for i in range(len(data)):
        events.extend(server.receive_data(data[i : i + 1]))
    assert events == expected
    assert len(events) == 2


def test_unknown_frame_kinds_are_ignored() -> None:
    server = ready_server()
    assert server.receive_data(frame(0x7F, 0, b"future")) == []
    assert not server.closed


# -- hello ----------------------------------------------------------------------------------------


def test_first_frame_must_be_hello_checked_on_the_first_bytes() -> None:
    server = Connection(Role.SERVER)
    server.data_to_send()
    events = server.receive_data(b"GET / HTTP/1.1\r\n")
    assert len(events) == 1
    assert isinstance(events[0], ConnectionClosed)
    assert events[0].protocol_error
    goaway = server.data_to_send()
    assert goaway[4] == F.GOAWAY
    assert server.receive_data(b"more") == []


def test_oversize_hello_is_refused_before_buffering() -> None:
    server = Connection(Role.SERVER)
    server.data_to_send()
    (event,) = server.receive_data(struct.pack(">IBBI", 1 << 30, F.HELLO, 0, 0))
    assert isinstance(event, ConnectionClosed)
    assert "HELLO" in event.message


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"proto": "http"}, "pilot-rpc"),
        ({"versions": [7, 8]}, "no common protocol version"),
        ({"versions": "1"}, "version list"),
        ({"max_frame_size": 10}, "max_frame_size"),
        ({"initial_window": 2**40}, "initial_window"),
        ({"max_concurrent_calls": 0}, "max_concurrent_calls"),
    ],
)
def test_bad_hello(overrides: dict[str, Any], fragment: str) -> None:
    client = Connection(Role.CLIENT)
    (event,) = client.receive_data(server_hello(**overrides))
    assert isinstance(event, ConnectionClosed)
    assert fragment in event.message


def test_hello_limits_bind_the_sender() -> None:
    client = Connection(Role.CLIENT)
    client.receive_data(server_hello(max_frame_size=16384, max_message_size=65536))
    assert client.peer_max_frame_size == 16384
    with pytest.raises(MessageTooLarge):
        client.start_call("x", MethodKind.UNARY, b"x" * 70000)
    assert client.active_calls == 0


def test_calls_wait_for_the_peer_hello() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="HELLO"):
        client.start_call("x", MethodKind.UNARY, 1)


def test_second_hello_is_a_protocol_error() -> None:
    server = ready_server()
    (event,) = server.receive_data(client_hello())
    assert isinstance(event, ConnectionClosed)


# -- frames and limits ----------------------------------------------------------------------------


def test_oversize_frame_ends_the_connection_from_its_header_alone() -> None:
    server = ready_server()
    header = struct.pack(">IBBI", 16385, F.CALL, 2, 1)
    (event,) = server.receive_data(header)
    assert isinstance(event, ConnectionClosed)
    assert event.protocol_error
    assert "exceeds max_frame_size" in event.message
    out = server.data_to_send()
    length, kind, _flags, call_id = struct.unpack_from(">IBBI", out)
    assert kind == F.GOAWAY
    assert call_id == 0
    last, code, message = msgpack.unpackb(out[10 : 10 + length])
    assert (last, code) == (0, StatusCode.INTERNAL)
    assert message.startswith("protocol error")


def test_call_ids_must_increase() -> None:
    server = ready_server()
    call = frame(F.CALL, 5, b"\x00\x06\x94\xa1m\x01\xc0\xc0" + b"\x01", F.FLAG_END_STREAM)
    assert len(server.receive_data(call)) == 1
    (event,) = server.receive_data(
        frame(F.CALL, 5, b"\x00\x06\x94\xa1m\x01\xc0\xc0" + b"\x01", F.FLAG_END_STREAM)
    )
    assert isinstance(event, ConnectionClosed)
    assert "not above" in event.message


def test_frames_for_never_opened_calls_are_errors_for_closed_calls_ignored() -> None:
    client, server = pair()
    client.start_call("echo", MethodKind.UNARY, 1)
    pump(client, server)
    server.send_reply(1, 1)
    pump(server, client)
    # Call 1 is over on both sides: a late frame for it is ignored.
    assert client.receive_data(frame(F.REPLY, 1, b"\x01")) == []
    assert server.receive_data(frame(F.CANCEL, 1)) == []
    # Call 9 was never opened.
    (event,) = client.receive_data(frame(F.REPLY, 9, b"\x01"))
    assert isinstance(event, ConnectionClosed)
    assert "unknown call 9" in event.message


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\x00", "too short"),
        (b"\x00\x09\x94", "header length exceeds"),
        (b"\x00\x01\xc1\x01", "malformed CALL header"),
        (b"\x00\x02\x91\x01\x01", "is not [method"),
        (b"\x00\x05\x94\x01\x01\xc0\xc0\x01", "method must be"),
        (b"\x00\x06\x94\xa1m\x09\xc0\xc0\x01", "unknown method kind"),
        (b"\x00\x06\x94\xa1m\x01\xff\xc0\x01", "timeout"),
        (b"\x00\x08\x94\xa1m\x01\xc0\x81\x01\x02\x01", "metadata"),
        (b"\x00\x06\x94\xa1m\x01\xc0\xc0\xc1", "malformed message"),
        (b"\x00\x06\x94\xa1m\x01\xc0\xc0", "no message"),
    ],
)
def test_malformed_call_frames_end_the_connection(payload: bytes, fragment: str) -> None:
    server = ready_server()
    (event,) = server.receive_data(frame(F.CALL, 1, payload, F.FLAG_END_STREAM))
    assert isinstance(event, ConnectionClosed)
    assert event.protocol_error
    assert fragment in event.message
    assert server.closed


def test_frames_in_the_wrong_direction_are_errors() -> None:
    client = ready_client()
    (event,) = client.receive_data(frame(F.CALL, 1, b"\x00\x06\x94\xa1m\x01\xc0\xc0\x01", 2))
    assert isinstance(event, ConnectionClosed)
    server = ready_server()
    (event,) = server.receive_data(frame(F.ERROR, 0, b"\x93\x01\xa0\x80"))
    assert isinstance(event, ConnectionClosed)


def test_eof_in_the_middle_of_a_frame() -> None:
    server = ready_server()
    server.receive_data(frame(F.PING, 0, b"1234")[:12])
    (event,) = server.receive_data(b"")
    assert isinstance(event, ConnectionClosed)
    assert not event.protocol_error
    assert "middle of a frame" in event.message


# -- the state tables -----------------------------------------------------------------------------


def test_state_tables_cover_the_call_shapes() -> None:
    # A single request is one CALL; a request stream is CALL, ITEM*, END.
    assert REQUEST_TRANSITIONS[(False, Half.IDLE, 0x102)] is Half.CLOSED
    assert REQUEST_TRANSITIONS[(True, Half.OPEN, F.END)] is Half.CLOSED
    # A single response is PROGRESS* then REPLY; a stream is ITEM* then END; ERROR ends either.
    assert RESPONSE_TRANSITIONS[(False, Half.IDLE, F.PROGRESS)] is Half.IDLE
    assert (False, Half.IDLE, F.ITEM) not in RESPONSE_TRANSITIONS
    assert (True, Half.IDLE, F.REPLY) not in RESPONSE_TRANSITIONS
    assert all(state is not Half.CLOSED for (_, state, _) in RESPONSE_TRANSITIONS)


def test_reply_on_a_streaming_call_is_refused_locally_and_remotely() -> None:
    client, server = pair()
    client.start_call("count", MethodKind.SERVER_STREAMING, 3)
    pump(client, server)
    with pytest.raises(LocalProtocolError, match="REPLY not allowed"):
        server.send_reply(1, 1)
    (event,) = client.receive_data(frame(F.REPLY, 1, b"\x01"))
    assert isinstance(event, ConnectionClosed)
    assert "REPLY not allowed" in event.message


def test_item_on_a_unary_call_is_refused() -> None:
    client, server = pair()
    client.start_call("echo", MethodKind.UNARY, 1)
    pump(client, server)
    with pytest.raises(LocalProtocolError):
        server.send_item(1, 1)
    (event,) = server.receive_data(frame(F.ITEM, 1, b"\x01"))
    assert isinstance(event, ConnectionClosed)


def test_nothing_may_follow_the_final_frame() -> None:
    client, server = pair()
    client.start_call("echo", MethodKind.UNARY, 1)
    pump(client, server)
    server.send_reply(1, 1)
    with pytest.raises(CallNotActive):
        server.send_reply(1, 2)
    with pytest.raises(CallNotActive):
        server.send_error(1, StatusCode.INTERNAL, "late")


def test_unencodable_request_sends_nothing_and_uses_no_id() -> None:
    client = ready_client()
    with pytest.raises(MessageEncodeError):
        client.start_call("echo", MethodKind.UNARY, object())
    assert client.data_to_send() == b""
    assert client.start_call("echo", MethodKind.UNARY, 1) == 1


# -- call shapes end to end -----------------------------------------------------------------------


def test_server_streaming_with_progress_free_end() -> None:
    client, server = pair()
    client.start_call("count", MethodKind.SERVER_STREAMING, 3, metadata={"traceparent": "t"})
    (call,) = pump(client, server)
    assert isinstance(call, CallReceived)
    assert call.metadata == {"traceparent": "t"}
    for i in range(3):
        assert server.send_item(1, i)
    server.end_stream(1)
    events = pump(server, client)
    assert [type(e) for e in events] == [MessageReceived] * 3 + [StreamEnded]
    assert [e.message for e in events if isinstance(e, MessageReceived)] == [0, 1, 2]
    assert client.active_calls == 0
    assert server.active_calls == 0


def test_progress_then_reply() -> None:
    client, server = pair()
    client.start_call("work", MethodKind.UNARY, None)
    pump(client, server)
    assert server.send_progress(1, {"pct": 50})
    server.send_reply(1, "done")
    events = pump(server, client)
    assert events == [ProgressReceived(1, {"pct": 50}, 6), ReplyReceived(1, "done")]


def test_client_streaming_and_bidi() -> None:
    client, server = pair()
    client.start_call("sum", MethodKind.CLIENT_STREAMING)
    client.send_item(1, 1)
    client.send_item(1, 2)
    client.end_requests(1)
    events = pump(client, server)
    assert events == [
        CallReceived(1, "sum", MethodKind.CLIENT_STREAMING, None, {}, NO_MESSAGE),
        MessageReceived(1, 1, 1),
        MessageReceived(1, 2, 1),
        StreamEnded(1),
    ]
    server.send_reply(1, 3)
    assert pump(server, client) == [ReplyReceived(1, 3)]

    client.start_call("chat", MethodKind.BIDI_STREAMING)
    client.send_item(2, "hi")
    pump(client, server)
    server.send_item(2, "hello")
    assert pump(server, client) == [MessageReceived(2, "hello", 6)]
    client.end_requests(2)
    with pytest.raises(LocalProtocolError):
        client.send_item(2, "late")
    assert pump(client, server) == [StreamEnded(2)]
    server.end_stream(2)
    assert pump(server, client) == [StreamEnded(2)]


def test_cancel_reaches_the_server_and_closes_the_call() -> None:
    client, server = pair()
    client.start_call("slow", MethodKind.UNARY, 1)
    pump(client, server)
    client.cancel_call(1)
    client.cancel_call(1)  # idempotent
    assert client.data_to_send() == frame(F.CANCEL, 1)
    assert server.receive_data(frame(F.CANCEL, 1)) == [CallCancelled(1)]
    with pytest.raises(CallNotActive):
        server.send_reply(1, "late")


def test_error_status_ends_the_call() -> None:
    client, server = pair()
    client.start_call("get", MethodKind.SERVER_STREAMING, 1)
    pump(client, server)
    server.send_item(1, "partial")
    server.send_error(1, StatusCode.DATA_LOSS, "disk", {"sector": 7})
    events = pump(server, client)
    assert events == [
        MessageReceived(1, "partial", 8),
        ErrorReceived(1, StatusCode.DATA_LOSS, "disk", {"sector": 7}),
    ]


def test_unencodable_error_details_are_replaced() -> None:
    client, server = pair()
    client.start_call("get", MethodKind.UNARY, 1)
    pump(client, server)
    server.send_error(1, StatusCode.INTERNAL, "x", {"obj": object()})
    (event,) = pump(server, client)
    assert isinstance(event, ErrorReceived)
    assert "details_repr" in event.details


def test_concurrency_limit_refuses_with_a_retry_safe_error() -> None:
    client, server = pair(calls=2)
    for _ in range(3):
        client.start_call("slow", MethodKind.UNARY, 1)
    events = pump(client, server)
    assert [e.call_id for e in events if isinstance(e, CallReceived)] == [1, 2]
    (refused,) = pump(server, client)
    assert isinstance(refused, ErrorReceived)
    assert refused.call_id == 3
    assert refused.code == StatusCode.RESOURCE_EXHAUSTED
    assert refused.details["retry_safe"] is True


# -- goaway ---------------------------------------------------------------------------------------


def test_goaway_refuses_calls_that_crossed_it() -> None:
    client, server = pair()
    client.start_call("a", MethodKind.UNARY, 1)
    pump(client, server)
    client.start_call("b", MethodKind.UNARY, 2)  # in flight while the server says goodbye
    server.goaway(StatusCode.OK, "draining")
    assert pump(client, server) == []  # call 2 is above last_call_id: ignored
    events = pump(server, client)
    assert events == [GoAwayReceived(1, 0, "draining"), CallRefused(2, "draining")]
    with pytest.raises(LocalProtocolError, match="no new calls"):
        client.start_call("c", MethodKind.UNARY, 3)
    server.send_reply(1, "still answered")
    assert pump(server, client) == [ReplyReceived(1, "still answered")]


# -- flow control ---------------------------------------------------------------------------------


def test_a_slow_reader_makes_the_writer_wait() -> None:
    client, server = pair()
    client.start_call("fast", MethodKind.SERVER_STREAMING, None)
    pump(client, server)
    item = "x" * 1000  # 1003 bytes encoded
    sent = 0
    while server.send_item(1, item):
        sent += 1
    assert sent == 65536 // 1003  # the window holds this many whole items
    assert server.send_blocked(1)
    queued = server.pending_output
    assert queued < 65536 + 1024 * 10  # no more than the window (plus framing)
    events = pump(server, client)
    received = [e for e in events if isinstance(e, MessageReceived)]
    # The blocked item waits whole: 341 bytes of credit left is too little to start it.
    assert len(received) == sent
    # Nothing more moves until the reader consumes.
    assert pump(server, client) == []
    for event in received:
        client.consumed(1, event.flow)
    unblocked = pump(client, server)
    assert unblocked == [SendUnblocked(1)]
    assert not server.send_blocked(1)


def test_credit_beyond_the_window_is_a_protocol_error() -> None:
    client = ready_client()
    client.start_call("s", MethodKind.SERVER_STREAMING, 1)
    client.data_to_send()
    big = msgpack.packb("x" * 16000)
    for _ in range(4):
        assert client.receive_data(frame(F.ITEM, 1, big))
    (event,) = client.receive_data(frame(F.ITEM, 1, big))
    assert isinstance(event, ConnectionClosed)
    assert "credit" in event.message


def test_zero_or_overflowing_credit_is_a_protocol_error() -> None:
    client, server = pair()
    client.start_call("s", MethodKind.SERVER_STREAMING, 1)
    pump(client, server)
    (event,) = server.receive_data(frame(F.CREDIT, 1, b"\x00\x00\x00\x00"))
    assert isinstance(event, ConnectionClosed)
    client, server = pair()
    client.start_call("s", MethodKind.SERVER_STREAMING, 1)
    pump(client, server)
    (event,) = server.receive_data(frame(F.CREDIT, 1, b"\x7f\xff\xff\xff"))
    assert isinstance(event, ConnectionClosed)


# -- messages larger than a frame -----------------------------------------------------------------


def test_large_request_and_reply_travel_in_pieces() -> None:
    client, server = pair()
    body = bytes(range(256)) * 2000  # 512,000 bytes, 32 frames of 16 KiB
    client.start_call("echo", MethodKind.UNARY, body)
    data = client.data_to_send()
    kinds = []
    pos = 0
    while pos < len(data):
        length, kind, _flags, _cid = struct.unpack_from(">IBBI", data, pos)
        assert length <= 16384
        kinds.append(kind)
        pos += 10 + length
    assert kinds[0] == F.CALL
    assert set(kinds[1:]) == {F.CONTINUATION}
    (call,) = server.receive_data(data)
    assert isinstance(call, CallReceived)
    assert call.message == body
    server.send_reply(1, body)
    assert pump(server, client) == [ReplyReceived(1, body)]


def test_large_stream_item_larger_than_the_window() -> None:
    client, server = pair()
    client.start_call("s", MethodKind.SERVER_STREAMING, 1)
    pump(client, server)
    big = b"y" * 200_000  # more than three windows
    assert not server.send_item(1, big)
    received: list[Event] = []
    for _ in range(20):
        events = pump(server, client)
        received += events
        if any(isinstance(e, MessageReceived) for e in events):
            break
        pump(client, server)  # the credit returned for pieces
    (item,) = [e for e in received if isinstance(e, MessageReceived)]
    assert item.message == big


def test_oversize_message_is_refused_while_it_arrives() -> None:
    server = ready_server()
    header = b"\x00\x06\x94\xa1m\x01\xc0\xc0"
    piece = b"\x00" * 16000
    events = server.receive_data(
        frame(F.CALL, 1, header + b"\xc6\x00\x20\x00\x00" + piece, F.FLAG_END_STREAM | 1)
    )
    assert events == []
    n = 0
    while True:
        n += 1
        events = server.receive_data(frame(F.CONTINUATION, 1, piece, F.FLAG_MORE))
        if events:
            break
        assert n < 100
    (event,) = events
    assert isinstance(event, ConnectionClosed)
    assert "max_message_size" in event.message
    # Refused at the first piece past 1 MiB: never more than the limit held.
    assert n * 16000 <= 1024 * 1024 + 16000


def test_new_message_before_continuation_is_an_error() -> None:
    client = ready_client()
    client.start_call("s", MethodKind.SERVER_STREAMING, 1)
    client.data_to_send()
    client.receive_data(frame(F.ITEM, 1, b"\xc4\x10" + b"a" * 8, F.FLAG_MORE))
    (event,) = client.receive_data(frame(F.ITEM, 1, b"\x01"))
    assert isinstance(event, ConnectionClosed)
    assert "CONTINUATION" in event.message
