"""The sans-IO stream state machine, driven by scripted packet sequences.

The peer in these scripts behaves like the ``pilotprotocol`` 1.18.0 daemon: its
keepalive probe is a pure ACK with window 0, it answers a FIN with FIN|ACK, it
sends its FIN without ACK and with window 0, and it reads ``SACK`` + 1..4 at the
start of a payload as SACK blocks. Time is a plain number passed in.
"""

from __future__ import annotations

import pytest
from pilot_node._packet import (
    Address,
    Flags,
    Packet,
    Protocol,
    SackBlock,
    decode_sack,
    encode_sack,
)
from pilot_node._streams import (
    ADVERTISE_UNIT,
    WINDOW_UNIT,
    Connection,
    ConnState,
    DialTimeoutError,
    StreamClosedError,
    StreamConfig,
    StreamRefusedError,
    StreamResetError,
    StreamTruncatedError,
)

US = Address(0, 1)
GO = Address(0, 2)
OUR_PORT = 49200
GO_PORT = 7
ISN = 1000
PEER_ISN = 0xFFFFFFF0  # wraps during the tests


def _conn(config: StreamConfig | None = None) -> Connection:
    return Connection(
        local=US,
        local_port=OUR_PORT,
        remote=GO,
        remote_port=GO_PORT,
        isn=ISN,
        now=0.0,
        config=config or StreamConfig(),
    )


def _go(
    flags: Flags,
    *,
    seq: int = 0,
    ack: int = 0,
    window: int = 512,
    payload: bytes = b"",
) -> Packet:
    return Packet(
        flags=flags,
        protocol=Protocol.STREAM,
        src=GO,
        dst=US,
        src_port=GO_PORT,
        dst_port=OUR_PORT,
        seq=seq & 0xFFFFFFFF,
        ack=ack & 0xFFFFFFFF,
        window=window,
        payload=payload,
    )


def _peer_seq(offset: int) -> int:
    return (PEER_ISN + 1 + offset) & 0xFFFFFFFF


def _our_seq(offset: int) -> int:
    return (ISN + 1 + offset) & 0xFFFFFFFF


def _established(config: StreamConfig | None = None) -> Connection:
    conn = _conn(config)
    conn.connect(0.0)
    conn.take_outbox()
    conn.on_packet(_go(Flags.SYN | Flags.ACK, seq=PEER_ISN, ack=_our_seq(0)), 0.0)
    conn.take_outbox()
    return conn


def _data(out: list[Packet]) -> list[Packet]:
    return [p for p in out if p.payload and decode_sack(p.payload) is None]


# --- handshake ---------------------------------------------------------------


def test_dial_sends_syn_and_acknowledges_the_synack() -> None:
    conn = _conn()
    conn.connect(0.0)
    (syn,) = conn.take_outbox()
    assert syn.flags == Flags.SYN
    assert syn.seq == ISN
    assert syn.window > 0  # the daemon honours 0 as "stop"
    conn.on_packet(_go(Flags.SYN | Flags.ACK, seq=PEER_ISN, ack=ISN + 1, window=7), 0.01)
    assert conn.state is ConnState.ESTABLISHED
    (ack,) = conn.take_outbox()
    assert ack.flags == Flags.ACK
    assert (ack.seq, ack.ack) == (ISN + 1, _peer_seq(0))
    assert conn.peer_window == 7 * WINDOW_UNIT


def test_a_synack_for_another_syn_is_ignored() -> None:
    conn = _conn()
    conn.connect(0.0)
    conn.take_outbox()
    conn.on_packet(_go(Flags.SYN | Flags.ACK, seq=PEER_ISN, ack=ISN + 77), 0.01)
    assert conn.state is ConnState.SYN_SENT
    assert conn.take_outbox() == []


def test_syn_is_retransmitted_then_the_dial_times_out() -> None:
    conn = _conn(StreamConfig(syn_rto=0.25, syn_retries=3))
    conn.connect(0.0)
    conn.take_outbox()
    now = 0.0
    syns = 0
    while conn.error is None:
        deadline = conn.next_deadline(now)
        assert deadline is not None
        now = deadline
        conn.poll(now)
        syns += sum(1 for p in conn.take_outbox() if p.flags == Flags.SYN)
    assert syns == 3
    assert isinstance(conn.error, DialTimeoutError)
    assert now == pytest.approx(0.25 + 0.5 + 1.0 + 2.0)


def test_rst_answering_our_syn_is_a_refusal() -> None:
    conn = _conn()
    conn.connect(0.0)
    conn.on_packet(_go(Flags.RST), 0.01)
    assert isinstance(conn.error, StreamRefusedError)


def test_listener_answers_syn_and_a_retransmitted_syn_again() -> None:
    conn = _conn()
    syn = _go(Flags.SYN, seq=PEER_ISN, window=512)
    conn.accept_syn(syn, 0.0)
    (synack,) = conn.take_outbox()
    assert synack.flags == Flags.SYN | Flags.ACK
    assert (synack.seq, synack.ack) == (ISN, _peer_seq(0))
    conn.on_syn_again(syn, 1.0)
    (again,) = conn.take_outbox()
    assert again == synack


def test_a_retransmitted_synack_is_acknowledged_again() -> None:
    conn = _established()
    conn.on_packet(_go(Flags.SYN | Flags.ACK, seq=PEER_ISN, ack=_our_seq(0)), 1.0)
    (ack,) = conn.take_outbox()
    assert ack.flags == Flags.ACK
    assert ack.ack == _peer_seq(0)


# --- receiving ---------------------------------------------------------------


def test_out_of_order_segments_are_sacked_at_once_and_reassembled() -> None:
    conn = _established()
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(10), ack=_our_seq(0), payload=b"B" * 10), 0.1)
    (ack,) = conn.take_outbox()
    assert ack.ack == _peer_seq(0)
    assert decode_sack(ack.payload) == (SackBlock(_peer_seq(10), _peer_seq(20)),)
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(30), ack=_our_seq(0), payload=b"D" * 5), 0.1)
    (ack,) = conn.take_outbox()
    # The block holding the latest arrival comes first.
    assert decode_sack(ack.payload) == (
        SackBlock(_peer_seq(30), _peer_seq(35)),
        SackBlock(_peer_seq(10), _peer_seq(20)),
    )
    assert not conn.readable
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), payload=b"A" * 10), 0.2)
    (ack,) = conn.take_outbox()
    assert ack.ack == _peer_seq(20)
    assert decode_sack(ack.payload) == (SackBlock(_peer_seq(30), _peer_seq(35)),)
    assert conn.read(100, 0.2) == b"A" * 10 + b"B" * 10
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(20), ack=_our_seq(0), payload=b"C" * 10), 0.3)
    assert conn.read(100, 0.3) == b"C" * 10 + b"D" * 5


def test_in_order_data_is_acknowledged_every_second_segment_or_after_the_delay() -> None:
    conn = _established(StreamConfig(delayed_ack=0.005))
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), payload=b"x"), 1.0)
    assert conn.take_outbox() == []
    assert conn.next_deadline(1.0) == pytest.approx(1.005)
    conn.poll(1.005)
    (ack,) = conn.take_outbox()
    assert ack.ack == _peer_seq(1)
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(1), ack=_our_seq(0), payload=b"y"), 2.0)
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(2), ack=_our_seq(0), payload=b"z"), 2.0)
    (ack,) = conn.take_outbox()
    assert ack.ack == _peer_seq(3)


def test_duplicates_and_overlaps_are_trimmed() -> None:
    conn = _established()
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), payload=b"abcd"), 0.1)
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), payload=b"abcd"), 0.1)
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(2), ack=_our_seq(0), payload=b"cdef"), 0.1)
    assert conn.read(100, 0.2) == b"abcdef"


def test_the_receive_buffer_is_bounded_and_advertised() -> None:
    unit = ADVERTISE_UNIT  # the daemon's segment size, our advertising unit
    config = StreamConfig(recv_buffer=4 * unit)
    conn = _established(config)
    seg = b"q" * unit
    for i in range(4):
        conn.on_packet(_go(Flags.ACK, seq=_peer_seq(i * unit), ack=_our_seq(0), payload=seg), 0.1)
    acks = conn.take_outbox()
    assert [a.window for a in acks] == [2, 0]  # an ACK every second segment
    # A fifth segment does not fit: dropped, and our window re-advertised.
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(4 * unit), ack=_our_seq(0), payload=seg), 0.2)
    (again,) = conn.take_outbox()
    assert again.ack == _peer_seq(4 * unit)
    # Reading opens the window and tells the peer at once (it was told 0).
    assert len(conn.read(4 * unit, 0.3)) == 4 * unit
    (update,) = conn.take_outbox()
    assert update.window == 4


def test_out_of_order_segments_are_bounded() -> None:
    conn = _established(StreamConfig(max_ooo_segments=2))
    for i in (2, 4, 6):
        conn.on_packet(_go(Flags.ACK, seq=_peer_seq(i), ack=_our_seq(0), payload=b"o"), 0.1)
    conn.take_outbox()
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), payload=b"ab"), 0.2)
    # 2 and 4 were kept, 6 was not.
    assert conn.read(100, 0.2) == b"abo"
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(3), ack=_our_seq(0), payload=b"p"), 0.2)
    assert conn.read(100, 0.2) == b"po"


# --- sending -----------------------------------------------------------------


def test_writes_are_segmented_and_bounded_by_the_send_buffer() -> None:
    conn = _established(StreamConfig(mss=1000, send_buffer=5000))
    assert conn.write(b"a" * 8000, 0.1) == 5000
    conn.flush(0.1)
    segs = _data(conn.take_outbox())
    assert [len(p.payload) for p in segs] == [1000] * 5
    assert [p.seq for p in segs] == [_our_seq(i * 1000) for i in range(5)]
    assert conn.write(b"b", 0.1) == 0
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(2000)), 0.2)
    assert conn.send_space == 2000


def test_a_reply_carries_the_ack_no_separate_ack_is_sent() -> None:
    conn = _established(StreamConfig(delayed_ack=0.005))
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), payload=b"q" * 200), 1.0)
    assert conn.take_outbox() == []  # the ACK waits (delayed ACK)
    assert conn.read(65536, 1.001) == b"q" * 200
    conn.write(b"r" * 200, 1.001)
    conn.flush(1.001)
    (reply,) = conn.take_outbox()
    assert reply.payload == b"r" * 200
    assert reply.flags == Flags.ACK
    assert reply.ack == _peer_seq(200)
    # Nothing else is due before the retransmission timer: no pure ACK follows.
    due = conn.next_deadline(1.001)
    assert due is not None
    assert due >= 1.001 + conn.config.min_rto
    conn.poll(1.006)
    assert conn.take_outbox() == []


def test_a_segment_that_would_read_as_sack_is_split() -> None:
    conn = _established()
    conn.write(b"SACK\x02" + b"z" * 20, 0.1)
    conn.flush(0.1)
    segs = _data(conn.take_outbox())
    assert [p.payload for p in segs] == [b"S", b"ACK\x02" + b"z" * 20]
    for seg in segs:
        assert decode_sack(seg.payload) is None


def test_sack_from_the_peer_retransmits_only_the_hole() -> None:
    conn = _established(StreamConfig(mss=100))
    conn.write(b"d" * 500, 0.0)
    conn.flush(0.0)
    conn.take_outbox()
    # Segment 100..200 was lost; the peer has 0..100 and 200..500.
    sack = encode_sack([SackBlock(_our_seq(200), _our_seq(500))])
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(100), payload=sack), 0.05)
    retx = _data(conn.take_outbox())
    assert [p.seq for p in retx] == [_our_seq(100)]
    assert conn.stats["fast_retransmits"] == 1
    # The same SACK again does not retransmit again (one repair per episode).
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(100), payload=sack), 0.06)
    assert _data(conn.take_outbox()) == []
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(500)), 0.07)
    assert conn.all_acked


def test_three_duplicate_acks_trigger_a_fast_retransmit() -> None:
    conn = _established(StreamConfig(mss=100))
    conn.write(b"d" * 500, 0.0)
    conn.flush(0.0)
    conn.take_outbox()
    for _ in range(2):
        conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(100)), 0.05)
        conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(100)), 0.05)
    retx = _data(conn.take_outbox())
    assert [p.seq for p in retx] == [_our_seq(100)]


def test_rto_retransmits_backs_off_and_finally_resets() -> None:
    conn = _established(StreamConfig(initial_rto=1.0, max_retransmits=3))
    conn.write(b"x" * 10, 0.0)
    conn.flush(0.0)
    conn.take_outbox()
    now = 0.0
    times: list[float] = []
    while conn.error is None:
        deadline = conn.next_deadline(now)
        assert deadline is not None
        now = deadline
        conn.poll(now)
        if _data(conn.take_outbox()):
            times.append(now)
    assert times == pytest.approx([1.0, 3.0, 7.0])
    assert isinstance(conn.error, StreamResetError)
    assert conn.lost_bytes == 10


def test_the_daemons_keepalive_probe_does_not_close_our_window() -> None:
    conn = _established()
    # Idle, nothing in flight: the daemon's keepalive is a pure ACK with window 0.
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), window=0), 60.0)
    conn.write(b"after the probe", 60.1)
    conn.flush(60.1)
    (seg,) = _data(conn.take_outbox())
    assert seg.payload == b"after the probe"


def test_a_real_zero_window_stops_sending_and_is_probed_with_one_byte() -> None:
    conn = _established(StreamConfig(zero_window_probe=0.5))
    conn.write(b"abc", 0.0)
    conn.flush(0.0)
    conn.take_outbox()
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(3), window=0), 0.1)
    conn.write(b"defg", 0.2)
    conn.flush(0.2)
    assert _data(conn.take_outbox()) == []
    assert conn.next_deadline(0.2) == pytest.approx(0.7)
    conn.poll(0.7)
    (probe,) = _data(conn.take_outbox())
    assert (probe.seq, probe.payload) == (_our_seq(3), b"d")
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(4), window=4), 0.7)
    (rest,) = _data(conn.take_outbox())
    assert rest.payload == b"efg"


def test_the_congestion_window_limits_the_first_flight() -> None:
    conn = _established(StreamConfig(mss=100, initial_cwnd_segments=4))
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), window=512), 0.0)
    conn.write(b"w" * 1000, 0.0)
    conn.flush(0.0)
    assert len(_data(conn.take_outbox())) == 4
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(400)), 0.01)
    # Slow start: four acknowledged, window now eight segments; pacing lets four go
    # at once (the burst allowance) and the rest when its deadline comes.
    sent = len(_data(conn.take_outbox()))
    assert sent == 4
    now = 0.01
    while sent < 6:
        deadline = conn.next_deadline(now)
        assert deadline is not None
        assert deadline > now
        now = deadline
        conn.poll(now)
        sent += len(_data(conn.take_outbox()))
    assert sent == 6
    assert conn.cwnd == 800


def test_an_idle_stream_sends_keepalives_that_expect_an_answer() -> None:
    conn = _established(StreamConfig(keepalive_interval=25.0, keepalive_probes=3))
    assert conn.next_deadline(0.0) == pytest.approx(25.0)
    conn.poll(25.0)
    (probe,) = conn.take_outbox()
    # The daemon ignores a pure ACK; one byte it already has is answered with an ACK.
    # Before any data that is the SYN's sequence number.
    assert probe.flags == Flags.ACK
    assert (probe.seq, probe.payload) == (_our_seq(-1), b"\x00")
    assert probe.window > 0
    assert conn.keepalives_unanswered == 1
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0)), 25.001)
    assert conn.keepalives_unanswered == 0
    assert conn.take_outbox() == []
    assert conn.next_deadline(25.001) == pytest.approx(50.001)


def test_after_data_the_keepalive_repeats_the_last_acknowledged_byte() -> None:
    conn = _established(StreamConfig(keepalive_interval=25.0))
    conn.write(b"abc", 0.0)
    conn.flush(0.0)
    conn.take_outbox()
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(3)), 0.1)
    conn.take_outbox()
    conn.poll(25.1)
    (probe,) = conn.take_outbox()
    assert (probe.seq, len(probe.payload)) == (_our_seq(2), 1)
    # Not a write: nothing is in flight and nothing is owed to the writer.
    assert conn.all_acked
    assert conn.snd_nxt == 3


def test_unanswered_keepalives_reset_the_stream() -> None:
    conn = _established(StreamConfig(keepalive_interval=10.0, keepalive_probes=3))
    now = 0.0
    probes: list[float] = []
    while conn.state is ConnState.ESTABLISHED:
        deadline = conn.next_deadline(now)
        assert deadline is not None
        assert deadline > now
        now = deadline
        conn.poll(now)
        for packet in conn.take_outbox():
            if packet.flags == Flags.ACK and packet.payload:
                probes.append(now)
            elif packet.flags == Flags.RST:
                assert now == pytest.approx(40.0)
    assert probes == pytest.approx([10.0, 20.0, 30.0])
    assert now == pytest.approx(40.0)
    assert isinstance(conn.error, StreamResetError)
    assert "3 keepalives" in str(conn.error)
    with pytest.raises(StreamResetError):
        conn.read(10, now)
    with pytest.raises(StreamResetError):
        conn.write(b"late", now)


def test_answered_keepalives_keep_an_idle_stream_open() -> None:
    conn = _established(StreamConfig(keepalive_interval=10.0, keepalive_probes=2))
    now = 0.0
    for _ in range(50):
        deadline = conn.next_deadline(now)
        assert deadline is not None
        now = deadline
        conn.poll(now)
        (probe,) = conn.take_outbox()
        assert probe.payload == b"\x00"
        conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0)), now + 0.001)
    assert conn.state is ConnState.ESTABLISHED
    assert conn.error is None


def test_the_daemons_own_keepalive_counts_as_an_answer() -> None:
    conn = _established(StreamConfig(keepalive_interval=10.0, keepalive_probes=1))
    conn.poll(10.0)
    assert len(conn.take_outbox()) == 1
    # The daemon's probe: a pure ACK with window 0 (it answers ours the same way).
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), window=0), 15.0)
    conn.poll(20.0)
    assert conn.state is ConnState.ESTABLISHED
    assert conn.take_outbox() == []
    conn.poll(25.0)
    assert [p.payload for p in conn.take_outbox()] == [b"\x00"]
    conn.poll(35.0)
    assert isinstance(conn.error, StreamResetError)


def test_zero_keepalive_probes_never_reset() -> None:
    conn = _established(StreamConfig(keepalive_interval=10.0, keepalive_probes=0))
    for i in range(1, 20):
        conn.poll(10.0 * i)
        assert len(conn.take_outbox()) == 1
    assert conn.state is ConnState.ESTABLISHED


def test_after_a_fin_the_keepalive_is_a_plain_ack_that_expects_nothing() -> None:
    conn = _established(StreamConfig(keepalive_interval=10.0, keepalive_probes=1))
    conn.on_packet(_go(Flags.FIN, seq=_peer_seq(0), window=0), 1.0)
    conn.take_outbox()
    now = 1.0
    for _ in range(10):
        deadline = conn.next_deadline(now)
        assert deadline is not None
        now = deadline
        conn.poll(now)
        for packet in conn.take_outbox():
            assert packet.flags == Flags.ACK
            assert not packet.payload
    assert conn.state is ConnState.ESTABLISHED
    assert conn.error is None


def test_a_peers_keepalive_probe_is_answered_and_not_delivered() -> None:
    conn = _established()
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), payload=b"hi"), 1.0)
    conn.poll(1.1)
    conn.take_outbox()
    assert conn.read(10, 1.1) == b"hi"
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(1), ack=_our_seq(0), payload=b"\x00"), 30.0)
    (answer,) = conn.take_outbox()
    assert answer.flags == Flags.ACK
    assert not answer.payload
    assert answer.ack == _peer_seq(2)
    assert not conn.readable


# --- closing -----------------------------------------------------------------


def test_fin_waits_until_every_byte_is_acknowledged() -> None:
    conn = _established()
    conn.write(b"tail", 0.0)
    conn.flush(0.0)
    conn.take_outbox()
    conn.close_write(0.0)
    assert [p for p in conn.take_outbox() if p.flags & Flags.FIN] == []
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(4)), 0.1)
    (fin,) = [p for p in conn.take_outbox() if p.flags & Flags.FIN]
    assert fin.flags == Flags.FIN  # like the daemon's: no ACK flag
    assert fin.seq == _our_seq(4)
    with pytest.raises(StreamClosedError):
        conn.write(b"late", 0.1)
    # The daemon answers FIN|ACK; we do not answer that.
    conn.on_packet(_go(Flags.FIN | Flags.ACK, seq=_peer_seq(0), ack=_our_seq(5), window=0), 0.2)
    assert conn.take_outbox() == []
    assert conn.fin_acked
    assert conn.eof
    assert conn.finished


def test_the_fin_is_retransmitted_until_answered() -> None:
    conn = _established(StreamConfig(initial_rto=1.0))
    conn.close_write(0.0)
    assert [p.flags for p in conn.take_outbox()] == [Flags.FIN]
    conn.poll(1.0)
    assert [p.flags for p in conn.take_outbox()] == [Flags.FIN]


def test_a_peer_fin_is_a_half_close() -> None:
    conn = _established()
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), payload=b"req"), 0.1)
    conn.on_packet(_go(Flags.FIN, seq=_peer_seq(3), window=0), 0.1)
    acks = conn.take_outbox()
    assert acks[-1].flags == Flags.ACK
    assert acks[-1].ack == _peer_seq(4)  # the FIN is acknowledged
    assert conn.read(10, 0.2) == b"req"
    assert conn.read(10, 0.2) == b""
    # We may still answer.
    conn.write(b"resp", 0.3)
    conn.flush(0.3)
    (seg,) = _data(conn.take_outbox())
    assert seg.payload == b"resp"
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(4), ack=_our_seq(4)), 0.4)
    conn.close_write(0.5)
    (fin,) = conn.take_outbox()
    # Both ends now: our FIN also acknowledges theirs.
    assert fin.flags == Flags.FIN | Flags.ACK
    assert fin.ack == _peer_seq(4)


def test_a_retransmitted_fin_is_acknowledged_again() -> None:
    conn = _established()
    conn.on_packet(_go(Flags.FIN, seq=_peer_seq(0)), 0.1)
    conn.take_outbox()
    conn.on_packet(_go(Flags.FIN, seq=_peer_seq(0)), 0.5)
    (ack,) = conn.take_outbox()
    assert ack.ack == _peer_seq(1)


def test_a_fin_with_data_missing_waits_then_truncates() -> None:
    conn = _established(StreamConfig(fin_hole_timeout=5.0))
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(4), ack=_our_seq(0), payload=b"late"), 0.1)
    conn.on_packet(_go(Flags.FIN, seq=_peer_seq(8)), 0.1)
    out = conn.take_outbox()
    assert all(p.ack == _peer_seq(0) for p in out)  # the FIN is not acknowledged yet
    assert not conn.readable
    conn.poll(5.1)
    assert isinstance(conn.error, StreamTruncatedError)
    with pytest.raises(StreamTruncatedError, match="4 bytes missing"):
        conn.read(10, 5.2)


def test_a_fin_with_data_missing_completes_when_the_hole_fills() -> None:
    conn = _established()
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(4), ack=_our_seq(0), payload=b"late"), 0.1)
    conn.on_packet(_go(Flags.FIN, seq=_peer_seq(8)), 0.1)
    conn.take_outbox()
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(0), payload=b"miss"), 0.5)
    assert conn.read(100, 0.6) == b"misslate"
    assert conn.eof
    assert conn.take_outbox()[-1].ack == _peer_seq(9)  # data and FIN acknowledged


def test_close_gives_up_after_the_linger_with_a_truncation_error() -> None:
    conn = _established(StreamConfig(close_linger=3.0, initial_rto=10.0))
    conn.write(b"never acknowledged", 0.0)
    conn.flush(0.0)
    conn.take_outbox()
    conn.close(0.0)
    conn.poll(3.0)
    assert isinstance(conn.error, StreamTruncatedError)
    assert conn.lost_bytes == len(b"never acknowledged")
    assert any(p.flags == Flags.RST for p in conn.take_outbox())


def test_a_peer_reset_fails_the_stream() -> None:
    conn = _established()
    conn.on_packet(_go(Flags.RST), 0.1)
    assert isinstance(conn.error, StreamResetError)
    with pytest.raises(StreamResetError):
        conn.write(b"x", 0.2)


def test_data_after_our_close_is_answered_with_rst() -> None:
    conn = _established(StreamConfig(time_wait=5.0))
    conn.close(0.0)
    conn.take_outbox()
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(1)), 0.1)
    assert conn.fin_acked
    conn.on_packet(_go(Flags.FIN, seq=_peer_seq(0)), 0.2)
    conn.take_outbox()
    assert conn.state is ConnState.ESTABLISHED or conn.finished
    conn.poll(0.3)
    assert conn.state is ConnState.CLOSED
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(1), ack=_our_seq(1), payload=b"zz"), 0.4)
    assert [p.flags for p in conn.take_outbox()] == [Flags.RST]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="mss"):
        StreamConfig(mss=0)
    with pytest.raises(ValueError, match="recv_buffer"):
        StreamConfig(recv_buffer=100)
    with pytest.raises(ValueError, match="keepalive_interval"):
        StreamConfig(keepalive_interval=0)
    with pytest.raises(ValueError, match="keepalive_probes"):
        StreamConfig(keepalive_probes=-1)


def test_the_pacing_deadline_does_not_move_with_the_clock() -> None:
    conn = _established(StreamConfig(mss=100, initial_cwnd_segments=4))
    conn.write(b"p" * 400, 0.0)
    conn.flush(0.0)
    conn.take_outbox()
    conn.on_packet(_go(Flags.ACK, seq=_peer_seq(0), ack=_our_seq(400)), 0.01)  # RTT sample
    conn.write(b"q" * 2000, 0.01)
    conn.flush(0.01)
    conn.take_outbox()
    first = conn.next_deadline(0.01)
    assert first is not None
    # Asking again later (before it is due) must not push it further away.
    assert conn.next_deadline((0.01 + first) / 2) == first
    conn.poll(first)
    assert _data(conn.take_outbox())
