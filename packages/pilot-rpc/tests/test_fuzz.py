"""Fuzzing the decoder: any input ends in events or a clean protocol error, never a crash,
and never a buffer larger than the limits allow."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pilot_rpc import _frames as F
from pilot_rpc._protocol import (
    CallReceived,
    Connection,
    ConnectionClosed,
    Event,
    MessageReceived,
    ReplyReceived,
    Role,
)
from pilot_rpc._types import MethodKind

MAX_FRAME = 16384
MAX_MESSAGE = 64 * 1024
LIMITS: dict[str, Any] = {
    "max_frame_size": MAX_FRAME,
    "max_message_size": MAX_MESSAGE,
    "initial_window": 65536,
}
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def ready(role: Role) -> Connection:
    conn = Connection(role, max_concurrent_calls=4, **LIMITS)
    other = Connection(Role.SERVER if role is Role.CLIENT else Role.CLIENT, **LIMITS)
    conn.receive_data(other.data_to_send())
    conn.data_to_send()
    assert conn.ready
    return conn


def frame(kind: int, flags: int, call_id: int, payload: bytes) -> bytes:
    return struct.pack(">IBBI", len(payload), kind, flags, call_id) + payload


def assembly_bytes(conn: Connection) -> int:
    return sum(len(c.asm_buf) for c in conn._calls.values() if c.asm_buf is not None)


def feed(conn: Connection, data: bytes, cuts: list[int]) -> list[Event]:
    """Feed ``data`` split at ``cuts``, checking the memory bounds after every chunk."""
    events: list[Event] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        chunk = data[start:end]
        if not chunk:
            continue
        events += conn.receive_data(chunk)
        # Never more buffered than one frame plus what just arrived...
        assert len(conn._inbuf) <= F.HEADER_SIZE + MAX_FRAME + len(chunk)
        # ...and never more under assembly than the message limit per open call.
        assert assembly_bytes(conn) <= MAX_MESSAGE * max(1, conn.active_calls)
    return events


def check_events(conn: Connection, events: list[Event]) -> None:
    for i, event in enumerate(events):
        assert isinstance(event, Event)
        if isinstance(event, ConnectionClosed):
            assert i == len(events) - 1, "nothing after the connection closed"
            assert conn.closed
    if conn.closed:
        assert conn.receive_data(b"\x00" * 20) == []


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)

payloads = st.one_of(
    st.binary(max_size=64),
    msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.tuples(st.text(max_size=8), st.integers(0, 6), st.none() | st.integers(-5, 10**7)).map(
        lambda t: (
            struct.pack(">H", len(h := msgpack.packb([t[0], t[1], t[2], {}])))
            + h
            + msgpack.packb(1)
        )
    ),
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
)
frames = st.builds(
    frame,
    kind=st.integers(0, 15),
    flags=st.integers(0, 3),
    call_id=st.integers(0, 4),
    payload=payloads,
)


@FUZZ
@given(data=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 4096), max_size=8))
def test_random_bytes_before_hello(data: bytes, cuts: list[int]) -> None:
    for role in (Role.CLIENT, Role.SERVER):
        conn = Connection(role, **LIMITS)
        check_events(conn, feed(conn, data, cuts))


@FUZZ
@given(data=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 4096), max_size=8))
def test_random_bytes_after_hello(data: bytes, cuts: list[int]) -> None:
    for role in (Role.CLIENT, Role.SERVER):
        conn = ready(role)
        check_events(conn, feed(conn, data, cuts))


@FUZZ
@given(
    script=st.lists(frames, max_size=30),
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
    open_calls=st.integers(0, 4),
)
def test_random_frames(script: list[bytes], cuts: list[int], open_calls: int) -> None:
    # A server, and a client with some calls open, so frames reach the per-call paths.
    server = ready(Role.SERVER)
    data = b"".join(script)
    check_events(server, feed(server, data, cuts))

    client = ready(Role.CLIENT)
    kinds = list(MethodKind)
    for i in range(open_calls):
        kind = kinds[i % len(kinds)]
        if kind in (MethodKind.UNARY, MethodKind.SERVER_STREAMING):
            client.start_call("m", kind, None)
        else:
            client.start_call("m", kind)
    client.data_to_send()
    check_events(client, feed(client, data, cuts))


@FUZZ
@given(length=st.integers(MAX_FRAME + 1, 2**32 - 1), kind=st.integers(0, 255))
def test_oversize_length_is_refused_from_the_header(length: int, kind: int) -> None:
    conn = ready(Role.SERVER)
    (event,) = conn.receive_data(struct.pack(">IBBI", length, kind, 0, 1))
    assert isinstance(event, ConnectionClosed)
    assert event.protocol_error
    assert len(conn._inbuf) == 0


@FUZZ
@given(
    values=st.lists(msgpack_values, min_size=1, max_size=10),
    cuts=st.lists(st.integers(0, 100_000), max_size=12),
)
def test_round_trip_any_split(values: list[Any], cuts: list[int]) -> None:
    client = Connection(Role.CLIENT, **LIMITS)
    server = Connection(Role.SERVER, max_concurrent_calls=64, **LIMITS)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    for value in values:
        client.start_call("echo", MethodKind.UNARY, value)
    events = feed(server, client.data_to_send(), cuts)
    calls = [e for e in events if isinstance(e, CallReceived)]
    assert [c.message for c in calls] == values
    for call in calls:
        server.send_reply(call.call_id, call.message)
    replies = feed(client, server.data_to_send(), cuts)
    assert [r.message for r in replies if isinstance(r, ReplyReceived)] == values


@settings(max_examples=30, deadline=None)
@given(size=st.integers(MAX_FRAME, MAX_MESSAGE - 16), cuts=st.lists(st.integers(), max_size=5))
def test_stream_items_of_any_size_arrive_whole(size: int, cuts: list[int]) -> None:
    client = Connection(Role.CLIENT, **LIMITS)
    server = Connection(Role.SERVER, **LIMITS)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.start_call("s", MethodKind.SERVER_STREAMING, None)
    server.receive_data(client.data_to_send())
    item = b"z" * size
    server.send_item(1, item)
    server.end_stream(1)
    got: list[Any] = []
    for _ in range(50):
        out = server.data_to_send()
        if out:
            for event in feed(client, out, cuts):
                if isinstance(event, MessageReceived):
                    got.append(event.message)
                    client.consumed(1, event.flow)
        credit = client.data_to_send()
        if credit:
            server.receive_data(credit)
        if got and not client.active_calls:
            break
    assert got == [item]


# -- budgets for unfinished messages: the books always balance ------------------------------------

_BUDGET_OPS = st.lists(
    st.tuples(
        st.sampled_from(["call", "more", "last", "cancel", "item", "expire", "eof"]),
        st.integers(0, 1),  # which connection
        st.integers(0, 5),  # which call (index)
        st.integers(1, MAX_FRAME - 64),  # piece size
    ),
    max_size=60,
)


@FUZZ
@given(_BUDGET_OPS)
def test_unfinished_budget_books_balance(ops: list[tuple[str, int, int, int]]) -> None:
    from pilot_rpc._protocol import UnfinishedBudget

    budget = UnfinishedBudget(120_000)
    conns = []
    for _ in range(2):
        conn = Connection(
            Role.SERVER,
            max_concurrent_calls=4,
            max_unfinished_bytes=50_000,
            shared_budget=budget,
            **LIMITS,
        )
        conn.receive_data(Connection(Role.CLIENT, **LIMITS).data_to_send())
        conn.data_to_send()
        conns.append(conn)
    next_id = [1, 1]
    ids: list[list[int]] = [[], []]
    clock = 0.0
    for op, which, index, size in ops:
        conn = conns[which]
        clock += 1.0
        conn.now = clock
        if op == "call":
            call_id = next_id[which]
            next_id[which] += 2
            kind = MethodKind.UNARY if index % 2 else MethodKind.BIDI_STREAMING
            header = msgpack.packb(["m", int(kind), None, None])
            prefix = struct.pack(">H", len(header)) + header
            if kind is MethodKind.UNARY:
                body = prefix + b"\xc6" + struct.pack(">I", 60_000) + b"a" * min(size, 1000)
                conn.receive_data(frame(F.CALL, F.FLAG_END_STREAM | F.FLAG_MORE, call_id, body))
            else:
                conn.receive_data(frame(F.CALL, 0, call_id, prefix))
            ids[which].append(call_id)
        elif ids[which]:
            call_id = ids[which][index % len(ids[which])]
            if op == "more":
                conn.receive_data(frame(F.CONTINUATION, F.FLAG_MORE, call_id, b"b" * size))
            elif op == "last":
                conn.receive_data(frame(F.CONTINUATION, 0, call_id, b"c" * size))
            elif op == "item":
                item = b"\xc6" + struct.pack(">I", 60_000) + b"d" * min(size, 8000)
                conn.receive_data(frame(F.ITEM, F.FLAG_MORE, call_id, item))
            elif op == "cancel":
                conn.receive_data(frame(F.CANCEL, 0, call_id, b""))
            elif op == "expire":
                conn.expire_unfinished(clock, 3.0)
            elif op == "eof":
                conn.receive_data(b"")
        for c in conns:
            held = assembly_bytes(c)
            assert c.unfinished_bytes == held
            assert held <= 50_000
        assert budget.used == sum(c.unfinished_bytes for c in conns)
        assert budget.used <= budget.limit
    for conn in conns:
        conn.receive_data(b"")
    assert budget.used == 0
