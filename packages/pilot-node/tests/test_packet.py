"""The Pilot packet, address and SACK codecs against literal wire bytes."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pilot_node._packet import (
    HEADER_SIZE,
    Address,
    AddressFormatError,
    Flags,
    Packet,
    PacketError,
    Protocol,
    SackBlock,
    decode_sack,
    encode_sack,
    is_sack_payload,
    seq_after,
    seq_diff,
)

# The specification's SYN example: 0:0000.0000.0001 port 49152 -> 0:0000.0000.0002
# port 1000, seq 0, ack 0, window 512, no payload. The last four bytes are the
# CRC-32 (IEEE) of the header with the checksum field zeroed.
SYN_WIRE = bytes.fromhex(
    "11"  # version 1, SYN
    "01"  # stream
    "0000"  # payload length
    "0000"
    "00000001"  # source
    "0000"
    "00000002"  # destination
    "c000"
    "03e8"  # ports
    "00000000"
    "00000000"  # seq, ack
    "0200"  # window
    "145ed874"  # checksum
)

# The specification's data example: ACK, seq 1, ack 1, window 502, "hello".
DATA_WIRE = bytes.fromhex(
    "12" "01" "0005" "0000" "00000001" "0000" "00000002" "c000" "03e8"
    "00000001" "00000001" "01f6" "5ee872c8" "68656c6c6f"
)  # fmt: skip


def _syn() -> Packet:
    return Packet(
        flags=Flags.SYN,
        protocol=Protocol.STREAM,
        src=Address(0, 1),
        dst=Address(0, 2),
        src_port=49152,
        dst_port=1000,
        window=512,
    )


def test_syn_encodes_to_the_specified_bytes() -> None:
    assert _syn().encode() == SYN_WIRE
    assert len(SYN_WIRE) == HEADER_SIZE


def test_data_packet_round_trips_through_literal_bytes() -> None:
    packet = Packet.decode(DATA_WIRE)
    assert packet.flags == Flags.ACK
    assert packet.protocol is Protocol.STREAM
    assert (packet.src, packet.dst) == (Address(0, 1), Address(0, 2))
    assert (packet.src_port, packet.dst_port) == (49152, 1000)
    assert (packet.seq, packet.ack, packet.window) == (1, 1, 502)
    assert packet.payload == b"hello"
    assert packet.encode() == DATA_WIRE


def test_flags_combine_in_the_low_nibble() -> None:
    packet = Packet(flags=Flags.SYN | Flags.ACK, protocol=Protocol.DATAGRAM)
    wire = packet.encode()
    assert wire[0] == 0x13
    assert wire[1] == 0x02
    decoded = Packet.decode(wire)
    assert decoded.has(Flags.SYN | Flags.ACK)
    assert not decoded.has(Flags.FIN)


def test_a_flipped_bit_fails_the_checksum() -> None:
    wire = bytearray(DATA_WIRE)
    wire[-1] ^= 0x01
    with pytest.raises(PacketError, match="checksum"):
        Packet.decode(bytes(wire))


def test_a_wrong_checksum_field_fails() -> None:
    wire = bytearray(SYN_WIRE)
    wire[33] ^= 0xFF
    with pytest.raises(PacketError, match="checksum"):
        Packet.decode(bytes(wire))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"", "too short"),
        (SYN_WIRE[:33], "too short"),
        (DATA_WIRE[:-1], "truncated"),
        (DATA_WIRE + b"x", "trailing"),
    ],
)
def test_malformed_lengths_are_typed_errors(wire: bytes, message: str) -> None:
    with pytest.raises(PacketError, match=message):
        Packet.decode(wire)


def test_unknown_version_and_protocol_are_rejected() -> None:
    v2 = Packet(version=2).encode()
    with pytest.raises(PacketError, match="version"):
        Packet.decode(v2)
    # Protocol byte 0x09 with a valid checksum.
    raw = bytearray(_syn().encode())
    raw[1] = 0x09
    raw[30:34] = b"\x00\x00\x00\x00"
    raw[30:34] = zlib.crc32(bytes(raw)).to_bytes(4, "big")
    with pytest.raises(PacketError, match="protocol"):
        Packet.decode(bytes(raw))


def test_out_of_range_fields_are_refused_at_construction() -> None:
    with pytest.raises(PacketError):
        Packet(seq=1 << 32)
    with pytest.raises(PacketError):
        Packet(window=70000)
    with pytest.raises(PacketError):
        Packet(payload=b"x" * 65536)


def test_packet_is_frozen() -> None:
    packet = _syn()
    with pytest.raises(AttributeError):
        packet.seq = 5  # type: ignore[misc]


@given(
    flags=st.integers(0, 15),
    proto=st.sampled_from(list(Protocol)),
    nets=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
    nodes=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    ports=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
    seq=st.integers(0, 2**32 - 1),
    ack=st.integers(0, 2**32 - 1),
    window=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=2048),
)
def test_any_packet_round_trips(
    flags: int,
    proto: Protocol,
    nets: tuple[int, int],
    nodes: tuple[int, int],
    ports: tuple[int, int],
    seq: int,
    ack: int,
    window: int,
    payload: bytes,
) -> None:
    packet = Packet(
        flags=Flags(flags),
        protocol=proto,
        src=Address(nets[0], nodes[0]),
        dst=Address(nets[1], nodes[1]),
        src_port=ports[0],
        dst_port=ports[1],
        seq=seq,
        ack=ack,
        window=window,
        payload=payload,
    )
    assert Packet.decode(packet.encode()) == packet


# --- addresses -------------------------------------------------------------


def test_address_text_forms() -> None:
    assert str(Address(0, 1)) == "0:0000.0000.0001"
    assert str(Address(1, 0x00A3F291)) == "1:0001.00A3.F291"
    assert Address.parse("0:0000.0000.0001") == Address(0, 1)
    assert Address.parse("1:0001.00a3.f291") == Address(1, 0x00A3F291)
    assert Address.parse(" 65535:FFFF.FFFF.FFFF ").is_broadcast


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0:0000.0000",
        "0:0000.0000.00001",
        "x:0000.0000.0001",
        "1:0000.0000.0001",  # hex network group disagrees with the decimal one
        "70000:1170.0000.0001",
        "0:0000.0000.000G",
    ],
)
def test_bad_address_text_is_a_typed_error(text: str) -> None:
    with pytest.raises(AddressFormatError):
        Address.parse(text)


def test_address_bytes() -> None:
    assert Address(1, 0x00A3F291).to_bytes() == bytes.fromhex("000100a3f291")
    assert Address.from_bytes(bytes.fromhex("000100a3f291")) == Address(1, 0x00A3F291)
    with pytest.raises(AddressFormatError):
        Address.from_bytes(b"\x00" * 5)
    with pytest.raises(AddressFormatError):
        Address(0x10000, 0)


# --- SACK ------------------------------------------------------------------


def test_sack_literal_bytes() -> None:
    wire = encode_sack([SackBlock(100, 200), SackBlock(0xFFFFFF00, 16)])
    assert wire == bytes.fromhex("5341434b0200000064000000c8ffffff0000000010")
    assert decode_sack(wire) == (SackBlock(100, 200), SackBlock(0xFFFFFF00, 16))


def test_sack_keeps_at_most_four_blocks() -> None:
    blocks = [SackBlock(i * 10, i * 10 + 5) for i in range(6)]
    wire = encode_sack(blocks)
    assert wire[4] == 4
    assert decode_sack(wire) == tuple(blocks[:4])
    assert encode_sack([]) == b""


def test_non_sack_payloads_are_not_sack() -> None:
    assert decode_sack(b"hello") is None
    assert decode_sack(b"SACK\x00") is None  # count 0 is not a SACK to the peer
    assert decode_sack(b"SACK\x05" + b"\x00" * 40) is None
    assert not is_sack_payload(b"SACK")
    assert is_sack_payload(b"SACK\x01")


def test_a_short_sack_is_a_typed_error() -> None:
    with pytest.raises(PacketError, match="SACK"):
        decode_sack(b"SACK\x02" + b"\x00" * 8)


def test_serial_arithmetic_wraps() -> None:
    assert seq_after(1, 0)
    assert seq_after(5, 0xFFFFFFF0)
    assert not seq_after(0xFFFFFFF0, 5)
    assert seq_diff(5, 0xFFFFFFFB) == 10
    assert seq_diff(0xFFFFFFFB, 5) == -10
