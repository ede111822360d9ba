"""The daemon socket codec and the pilot-to-pilot stream encoding, with literal bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pilot_transport._address import Address, SocketAddress
from pilot_transport._carriers import _pilot_framing as framing
from pilot_transport._carriers import _pilot_ipc as ipc

# The shared CI machine is slow and noisy: judge correctness, not speed.
no_deadline = settings(deadline=None)

A1 = Address(0, 1)
A2 = Address(1, 0x00A3F291)


def test_requests_are_literal_bytes() -> None:
    assert ipc.bind(5000) == b"\x00\x00\x00\x03\x01\x13\x88"
    assert ipc.dial(A2, 7) == b"\x00\x00\x00\x09\x03\x00\x01\x00\xa3\xf2\x91\x00\x07"
    assert ipc.send(9, b"hi") == b"\x00\x00\x00\x07\x06\x00\x00\x00\x09hi"
    assert ipc.send(9, memoryview(b"hi")) == ipc.send(9, b"hi")
    assert ipc.close(9) == b"\x00\x00\x00\x05\x08\x00\x00\x00\x09"
    assert ipc.send_to(A1, 1002, b"x") == (b"\x00\x00\x00\x0a\x0b\x00\x00\x00\x00\x00\x01\x03\xeax")
    assert ipc.info() == b"\x00\x00\x00\x01\x0d"
    assert ipc.handshake(ipc.HandshakeSub.REQUEST, 2, "pls") == (
        b"\x00\x00\x00\x09\x0f\x01\x00\x00\x00\x02pls"
    )
    assert ipc.handshake(ipc.HandshakeSub.PENDING) == b"\x00\x00\x00\x02\x0f\x04"
    assert ipc.text_command(ipc.Cmd.RESOLVE_HOSTNAME, "db") == b"\x00\x00\x00\x03\x11db"
    assert ipc.flag_command(ipc.Cmd.SET_VISIBILITY, True) == b"\x00\x00\x00\x02\x15\x01"
    assert ipc.set_tags(["a"]) == b'\x00\x00\x00\x06\x19["a"]'


def test_replies_parse_from_literal_bytes() -> None:
    decoder = ipc.FrameDecoder()
    wire = (
        b"\x00\x00\x00\x03\x02\x13\x88"  # BindOK 5000
        b"\x00\x00\x00\x05\x04\x00\x00\x00\x2a"  # DialOK 42
        b"\x00\x00\x00\x0f\x05\x13\x88\x00\x00\x00\x07\x00\x01\x00\xa3\xf2\x91\xc0\x00"  # Accept
        b"\x00\x00\x00\x07\x07\x00\x00\x00\x2aok"  # Recv 42 "ok"
        b"\x00\x00\x00\x05\x09\x00\x00\x00\x2a"  # CloseOK 42
        b"\x00\x00\x00\x07\x0a\x00\x01boom"  # Error
        b"\x00\x00\x00\x0f\x0c\x00\x00\x00\x00\x00\x01\x00\x00\x03\xeadata"  # RecvFrom
        b'\x00\x00\x00\x09\x0e{"a": 1}'  # InfoOK
        b"\x00\x00\x00\x01\x7f"  # unknown command
    )
    messages = [ipc.parse_message(f) for f in decoder.feed(wire)]
    assert messages == [
        ipc.BindOK(5000),
        ipc.DialOK(42),
        ipc.Accept(5000, 7, SocketAddress(A2, 0xC000)),
        ipc.Recv(42, b"ok"),
        ipc.CloseOK(42),
        ipc.Error(1, "boom"),
        ipc.RecvFrom(SocketAddress(A1, 0), 1002, b"data"),
        ipc.JsonReply(ipc.Cmd.INFO_OK, {"a": 1}),
        ipc.Frame(0x7F, b""),
    ]
    assert decoder.buffered == 0


@no_deadline
@given(st.lists(st.binary(max_size=300), max_size=8), st.data())
def test_decoder_reassembles_any_split(payloads: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(ipc.encode_frame(0x07, p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = ipc.FrameDecoder()
    frames: list[ipc.Frame] = []
    last = 0
    for cut in [*cuts, len(wire)]:
        frames += decoder.feed(wire[last:cut])
        last = cut
    assert [f.payload for f in frames] == payloads
    assert decoder.buffered == 0


def test_zero_length_frames_are_skipped() -> None:
    decoder = ipc.FrameDecoder()
    assert decoder.feed(b"\x00\x00\x00\x00" * 3 + ipc.info()) == [ipc.Frame(0x0D, b"")]


def test_oversize_frame_is_refused_before_allocation() -> None:
    decoder = ipc.FrameDecoder()
    with pytest.raises(ipc.FrameTooLargeError, match="1048577"):
        decoder.feed(b"\x00\x10\x00\x01\x06")
    with pytest.raises(ipc.IpcProtocolError):
        decoder.feed(b"")
    assert len(ipc.encode_frame(ipc.Cmd.SEND, b"\x00" * (ipc.MAX_FRAME - 1))) == ipc.MAX_FRAME + 4
    with pytest.raises(ValueError, match="exceeds"):
        ipc.encode_frame(ipc.Cmd.SEND, b"\x00" * ipc.MAX_FRAME)
    assert ipc.MAX_SEND_DATA == 1_048_571


@pytest.mark.parametrize(
    ("frame", "needs"),
    [
        (ipc.Frame(ipc.Cmd.RECV, b"\x00\x00"), "needs 4"),
        (ipc.Frame(ipc.Cmd.ACCEPT, b"\x00" * 13), "needs 14"),
        (ipc.Frame(ipc.Cmd.ERROR, b""), "needs 2"),
        (ipc.Frame(ipc.Cmd.INFO_OK, b"{not json"), "invalid JSON"),
    ],
)
def test_short_or_bad_payloads_are_protocol_errors(frame: ipc.Frame, needs: str) -> None:
    with pytest.raises(ipc.IpcProtocolError, match=needs):
        ipc.parse_message(frame)


# -- the pilot-to-pilot stream encoding -----------------------------------------------------


def test_encoding_literal_bytes() -> None:
    assert framing.encode_data(b"SACK\x01") == b"SAC\x00K\x01"
    assert framing.encode_data(b"plain") == b"plain"
    assert framing.encode_data(b"ends in S") == b"ends in SSAC\x03"
    assert framing.encode_data(b"ends in SA") == b"ends in SASAC\x03"
    assert framing.EOF_MARKER == b"SAC\x01"
    assert framing.credit_controls(130) == b"SAC\x02\x40SAC\x02\x40SAC\x02\x02"
    decoder = framing.FramingDecoder()
    out = decoder.feed(b"aSAC\x00bSAC\x02\x05cSAC\x03SAC\x01SAC\x02\x01")
    assert (out.data, out.credit, out.eof) == (b"aSACbc", 6 * 1024, True)


def test_decoder_holds_back_only_a_possible_escape_start() -> None:
    decoder = framing.FramingDecoder()
    assert decoder.feed(b"xyS").data == b"xy"
    assert decoder.feed(b"A").data == b""
    assert decoder.feed(b"C").data == b""
    out = decoder.feed(b"\x01")
    assert (out.data, out.eof) == (b"", True)
    # a chunk ending in S is always closed by a no-op, so nothing stays held back
    decoder = framing.FramingDecoder()
    assert decoder.feed(framing.encode_data(b"US")).data == b"US"


chunks = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.sampled_from([b"S", b"A", b"C", b"K", b"\x00", b"\x01", b"x"]), max_size=40
        ).map(b"".join),
    ),
    max_size=6,
)


@no_deadline
@given(chunks, st.data())
def test_encoding_round_trips_across_any_split_and_never_contains_sack(
    writes: list[bytes], data: st.DataObject
) -> None:
    wire = b"".join(framing.encode_data(w) + framing.credit_controls(1) for w in writes)
    wire += framing.EOF_MARKER
    assert b"SACK" not in wire  # so no segment boundary can ever start with it
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    decoder = framing.FramingDecoder()
    got = bytearray()
    credit = 0
    eofs = 0
    last = 0
    for cut in [*cuts, len(wire)]:
        out = decoder.feed(wire[last:cut])
        got += out.data
        credit += out.credit
        eofs += out.eof
        last = cut
    assert (bytes(got), credit, eofs) == (b"".join(writes), len(writes) * 1024, 1)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"SAC\x07", "unknown escape"),
        (b"SACK", "unknown escape"),
        (b"SAC\x02\x00", "bad credit"),
        (b"SAC\x02\x53", "bad credit"),
        (b"SAC\x01x", "data after end"),
        (b"SAC\x01SAC\x00", "data after end"),
        (b"SAC\x01SAC\x01", "marked twice"),
    ],
)
def test_encoding_violations_are_errors(wire: bytes, message: str) -> None:
    with pytest.raises(framing.FramingError, match=message):
        framing.FramingDecoder().feed(wire)
