"""The Pilot packet and the Pilot address, as they travel inside a tunnel.

Wire facts (from the protocol's published specification and the observed
behaviour of the ``pilotprotocol`` 1.18.0 daemon):

* A packet is a 34-byte header followed by ``payload_length`` payload bytes.
  All integers are big-endian.

  ====== ====== =========================================================
  offset size   field
  ====== ====== =========================================================
  0      1      version (high nibble, currently 1) | flags (low nibble)
  1      1      protocol: 1 stream, 2 datagram, 3 control
  2      2      payload length (at most 65,535)
  4      6      source address (u16 network, u32 node)
  10     6      destination address
  16     2      source port
  18     2      destination port
  20     4      sequence number (byte offset of the first payload byte)
  24     4      acknowledgement number (next byte expected from the peer)
  28     2      receive window in segments (0: no limit)
  30     4      CRC-32 (IEEE) over header (this field zeroed) and payload
  ====== ====== =========================================================

* Flags: SYN 0x1, ACK 0x2, FIN 0x4, RST 0x8.
* Selective acknowledgements ride in the payload of a pure ACK: the ASCII
  bytes ``SACK``, a count byte (1 to 4), then per block a u32 *left* (first
  byte received) and u32 *right* (first byte after the range).
* An address prints as ``N:NNNN.HHHH.LLLL``: the network in decimal, then the
  network again in four hex digits, then the node id's high and low 16 bits in
  hex (``1:0001.00A3.F291``).

This module is pure: no I/O, no clocks.
"""

from __future__ import annotations

import enum
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Final

from .errors import AddressFormatError, PacketError

__all__ = [
    "BROADCAST_NODE",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "MAX_SACK_BLOCKS",
    "VERSION",
    "Address",
    "AddressFormatError",
    "Flags",
    "Packet",
    "PacketError",
    "Protocol",
    "SackBlock",
    "decode_sack",
    "encode_sack",
    "is_sack_payload",
    "seq_after",
    "seq_diff",
]

VERSION = 1
HEADER_SIZE = 34
MAX_PAYLOAD = 0xFFFF
MAX_SACK_BLOCKS = 4
BROADCAST_NODE = 0xFFFFFFFF

_HEADER = struct.Struct(">BBHHIHIHHIIHI")
_CRC = struct.Struct(">I")
_ZERO_CRC = b"\x00\x00\x00\x00"
_SACK_MAGIC = b"SACK"
_SACK_BLOCK = struct.Struct(">II")
_ADDRESS = struct.Struct(">HI")
_ADDRESS_RE = re.compile(r"^(\d{1,5}):([0-9A-Fa-f]{4})\.([0-9A-Fa-f]{4})\.([0-9A-Fa-f]{4})$")


class Flags(enum.IntFlag):
    """The four header flags."""

    NONE = 0
    SYN = 0x1
    ACK = 0x2
    FIN = 0x4
    RST = 0x8


class Protocol(enum.IntEnum):
    """The transport a packet belongs to."""

    STREAM = 0x01
    DATAGRAM = 0x02
    CONTROL = 0x03


_FLAG_VALUES: tuple[Flags, ...] = tuple(Flags(bits) for bits in range(16))
_PROTOCOLS: dict[int, Protocol] = {int(p): p for p in Protocol}


@dataclass(frozen=True, order=True, slots=True)
class Address:
    """A 48-bit Pilot address: a 16-bit network and a 32-bit node id.

    Text form ``N:NNNN.HHHH.LLLL`` (``0:0000.0000.0001`` is node 1 on the backbone);
    the hex network group must equal the decimal one.
    """

    network: int
    node: int

    def __post_init__(self) -> None:
        if not 0 <= self.network <= 0xFFFF:
            raise AddressFormatError(f"network id {self.network} is outside 0..65535")
        if not 0 <= self.node <= 0xFFFFFFFF:
            raise AddressFormatError(f"node id {self.node} is outside 0..2**32-1")

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``N:NNNN.HHHH.LLLL``.

        Raises:
            AddressFormatError: the text is not a Pilot address.
        """
        match = _ADDRESS_RE.match(text.strip())
        if match is None:
            raise AddressFormatError(f"not a Pilot address (want N:XXXX.XXXX.XXXX): {text!r}")
        network = int(match.group(1))
        if network > 0xFFFF:
            raise AddressFormatError(f"network id {network} is outside 0..65535: {text!r}")
        if int(match.group(2), 16) != network:
            raise AddressFormatError(
                f"network {network} does not match its hex group {match.group(2)}: {text!r}"
            )
        node = (int(match.group(3), 16) << 16) | int(match.group(4), 16)
        return cls(network, node)

    @classmethod
    def from_bytes(cls, data: bytes) -> Address:
        """Decode the 6-byte wire form.

        Raises:
            AddressFormatError: ``data`` is not exactly 6 bytes.
        """
        if len(data) != _ADDRESS.size:
            raise AddressFormatError(f"a Pilot address is 6 bytes, got {len(data)}")
        network, node = _ADDRESS.unpack(data)
        return cls(network, node)

    def to_bytes(self) -> bytes:
        """The 6-byte wire form."""
        return _ADDRESS.pack(self.network, self.node)

    def __str__(self) -> str:
        high, low = (self.node >> 16) & 0xFFFF, self.node & 0xFFFF
        return f"{self.network}:{self.network:04X}.{high:04X}.{low:04X}"

    @property
    def is_broadcast(self) -> bool:
        """Whether this is the broadcast address of its network."""
        return self.node == BROADCAST_NODE


@dataclass(frozen=True, slots=True)
class SackBlock:
    """A received range ``[left, right)`` of sequence numbers (mod 2**32)."""

    left: int
    right: int


def seq_diff(a: int, b: int) -> int:
    """``a - b`` in 32-bit serial arithmetic, as a signed int."""
    d = (a - b) & 0xFFFFFFFF
    return d - 0x100000000 if d >= 0x80000000 else d


def seq_after(a: int, b: int) -> bool:
    """True when sequence number ``a`` comes after ``b`` (RFC 1982)."""
    return seq_diff(a, b) > 0


def encode_sack(blocks: tuple[SackBlock, ...] | list[SackBlock]) -> bytes:
    """Encode up to four SACK blocks as an ACK payload (extra blocks are dropped).

    Returns ``b""`` for no blocks.
    """
    chosen = list(blocks)[:MAX_SACK_BLOCKS]
    if not chosen:
        return b""
    out = bytearray(_SACK_MAGIC)
    out.append(len(chosen))
    for block in chosen:
        out += _SACK_BLOCK.pack(block.left & 0xFFFFFFFF, block.right & 0xFFFFFFFF)
    return bytes(out)


def is_sack_payload(payload: bytes) -> bool:
    """Whether a peer would read ``payload`` as SACK blocks (``SACK`` + count 1..4)."""
    return len(payload) >= 5 and payload[:4] == _SACK_MAGIC and 1 <= payload[4] <= MAX_SACK_BLOCKS


def decode_sack(payload: bytes) -> tuple[SackBlock, ...] | None:
    """Decode an ACK payload's SACK blocks, or ``None`` when it carries none.

    Raises:
        PacketError: the payload announces SACK blocks but is too short for them.
    """
    if not is_sack_payload(payload):
        return None
    count = payload[4]
    need = 5 + count * _SACK_BLOCK.size
    if len(payload) < need:
        raise PacketError(f"SACK payload announces {count} blocks but has {len(payload)} bytes")
    return tuple(
        SackBlock(*_SACK_BLOCK.unpack_from(payload, 5 + i * _SACK_BLOCK.size)) for i in range(count)
    )


_ZERO_ADDRESS = Address(0, 0)
"""The unspecified address."""

_ADDRESS_CACHE: dict[int, Address] = {}
_ADDRESS_CACHE_MAX: Final = 4096


def _address(network: int, node: int) -> Address:
    # Decoding meets the same few addresses over and over: reuse the (immutable) objects.
    key = (network << 32) | node
    found = _ADDRESS_CACHE.get(key)
    if found is None:
        if len(_ADDRESS_CACHE) >= _ADDRESS_CACHE_MAX:
            _ADDRESS_CACHE.clear()
        found = _ADDRESS_CACHE[key] = Address(network, node)
    return found


@dataclass(frozen=True, slots=True)
class Packet:
    """One Pilot packet (header and payload).

    ``encode()`` fills in the payload length and checksum; ``decode()`` checks them.
    """

    flags: Flags = Flags.NONE
    protocol: Protocol = Protocol.STREAM
    src: Address = _ZERO_ADDRESS
    dst: Address = _ZERO_ADDRESS
    src_port: int = 0
    dst_port: int = 0
    seq: int = 0
    ack: int = 0
    window: int = 0
    payload: bytes = field(default=b"", repr=False)
    version: int = VERSION

    def __post_init__(self) -> None:
        # One combined test on the hot path; the loop below only names the culprit.
        if (
            0 <= self.src_port <= 0xFFFF
            and 0 <= self.dst_port <= 0xFFFF
            and 0 <= self.seq <= 0xFFFFFFFF
            and 0 <= self.ack <= 0xFFFFFFFF
            and 0 <= self.window <= 0xFFFF
            and 0 <= self.version <= 0xF
            and 0 <= self.flags <= 0xF
            and len(self.payload) <= MAX_PAYLOAD
        ):
            return
        for name, value, top in (
            ("src_port", self.src_port, 0xFFFF),
            ("dst_port", self.dst_port, 0xFFFF),
            ("seq", self.seq, 0xFFFFFFFF),
            ("ack", self.ack, 0xFFFFFFFF),
            ("window", self.window, 0xFFFF),
            ("version", self.version, 0xF),
        ):
            if not 0 <= value <= top:
                raise PacketError(f"{name}={value} is outside 0..{top}")
        if not 0 <= int(self.flags) <= 0xF:
            raise PacketError(f"flags={int(self.flags)} do not fit in four bits")
        if len(self.payload) > MAX_PAYLOAD:
            raise PacketError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")

    def has(self, flag: Flags) -> bool:
        """Whether every bit of ``flag`` is set."""
        bits = int(flag)
        return (int(self.flags) & bits) == bits

    def encode(self) -> bytes:
        """The packet's wire bytes, checksum included."""
        header = _HEADER.pack(
            (self.version << 4) | int(self.flags),
            self.protocol,
            len(self.payload),
            self.src.network,
            self.src.node,
            self.dst.network,
            self.dst.node,
            self.src_port,
            self.dst_port,
            self.seq,
            self.ack,
            self.window,
            0,
        )
        crc = zlib.crc32(self.payload, zlib.crc32(header))
        return b"".join((header[:30], _CRC.pack(crc), self.payload))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Packet:
        """Parse one packet; its length must match the header exactly.

        Raises:
            PacketError: too short, truncated, trailing bytes, bad checksum,
                unknown version or protocol.
        """
        raw = bytes(data)
        if len(raw) < HEADER_SIZE:
            raise PacketError(f"packet too short: {len(raw)} bytes (header is {HEADER_SIZE})")
        (
            ver_flags,
            protocol,
            length,
            src_net,
            src_node,
            dst_net,
            dst_node,
            src_port,
            dst_port,
            seq,
            ack,
            window,
            checksum,
        ) = _HEADER.unpack_from(raw)
        total = HEADER_SIZE + length
        if len(raw) < total:
            raise PacketError(f"packet truncated: {len(raw)} bytes, header says {total}")
        if len(raw) > total:
            raise PacketError(f"{len(raw) - total} trailing bytes after a {total}-byte packet")
        payload = raw[HEADER_SIZE:]
        crc = zlib.crc32(payload, zlib.crc32(_ZERO_CRC, zlib.crc32(raw[:30])))
        if crc != checksum:
            raise PacketError(f"checksum mismatch: wire {checksum:#010x}, computed {crc:#010x}")
        version = ver_flags >> 4
        if version != VERSION:
            raise PacketError(f"unsupported packet version {version}")
        proto = _PROTOCOLS.get(protocol)
        if proto is None:
            raise PacketError(f"unknown protocol {protocol:#04x}")
        return cls(
            flags=_FLAG_VALUES[ver_flags & 0x0F],
            protocol=proto,
            src=_address(src_net, src_node),
            dst=_address(dst_net, dst_node),
            src_port=src_port,
            dst_port=dst_port,
            seq=seq,
            ack=ack,
            window=window,
            payload=payload,
            version=version,
        )
