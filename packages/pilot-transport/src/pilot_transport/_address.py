"""Pilot's 48-bit virtual addresses.

An :class:`Address` is a 16-bit network id and a 32-bit node id, packed on the
wire as 6 big-endian bytes ``[u16 network][u32 node]``. Its text form, as the
Pilot daemon prints and parses it, is ``N:NNNN.HHHH.LLLL``:

- ``N``: the network id in decimal;
- ``NNNN``: the same network id again, as four hex digits (redundant, for
  readability; parsing checks that it agrees with ``N``);
- ``HHHH`` / ``LLLL``: the high and low 16 bits of the node id, four hex digits each.

So ``0:0000.0000.0001`` is node 1 of network 0 and ``1:0001.00A3.F291`` node
``0x00A3F291`` of network 1. Hex digits are printed upper case and parsed in
either case. A :class:`SocketAddress` appends a decimal port:
``0:0000.0000.0001:7``; on the wire it is the 6 address bytes then a u16 port.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Self

from pilot_transport.errors import AddressError

__all__ = ["Address", "SocketAddress"]

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_ADDR = struct.Struct(">HI")
_SOCK = struct.Struct(">HIH")
_DECIMAL = re.compile(r"[0-9]{1,5}", re.ASCII)
_HEX4 = re.compile(r"[0-9A-Fa-f]{4}", re.ASCII)
_MAX_TEXT = 64  # far above the longest valid text; bounds the work done on garbage


def _show(text: str) -> str:
    """A bounded repr for error messages (garbage can be huge)."""
    return repr(text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "...")


def _check_int(name: str, value: object, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AddressError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= limit:
        raise AddressError(f"{name} {value} is out of range 0..{limit}")
    return value


@dataclass(frozen=True, order=True, slots=True)
class Address:
    """A Pilot virtual address: 16-bit network id + 32-bit node id.

    Immutable, hashable and ordered by ``(network, node)``. ``str(address)``
    gives the canonical text form (``0:0000.0000.0001``).

    Raises:
        AddressError: ``network`` or ``node`` is not an int in range.
    """

    network: int
    node: int

    SIZE = 6
    """Bytes on the wire."""

    def __post_init__(self) -> None:
        _check_int("network id", self.network, _U16)
        _check_int("node id", self.node, _U32)

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``N:NNNN.HHHH.LLLL``.

        Raises:
            AddressError: the text is malformed; the message names the bad part.
        """
        if not isinstance(text, str):  # pyright: ignore[reportUnnecessaryIsInstance]  # runtime guard
            raise AddressError(f"address must be str, got {type(text).__name__}")
        if len(text) > _MAX_TEXT:
            raise AddressError(f"address text too long ({len(text)} chars): {_show(text)}")
        network_text, sep, node_text = text.partition(":")
        if not sep:
            raise AddressError(f"address {_show(text)} has no ':' (expected N:NNNN.HHHH.LLLL)")
        if not _DECIMAL.fullmatch(network_text):
            raise AddressError(
                f"network id {_show(network_text)} in {_show(text)} is not a decimal number"
            )
        network = int(network_text)
        if network > _U16:
            raise AddressError(f"network id {network} in {_show(text)} is out of range 0..65535")
        groups = node_text.split(".")
        if len(groups) != 3:
            raise AddressError(
                f"{_show(node_text)} in {_show(text)} must be three dot-separated groups "
                "of four hex digits"
            )
        for group in groups:
            if not _HEX4.fullmatch(group):
                raise AddressError(
                    f"hex group {_show(group)} in {_show(text)} is not four hex digits"
                )
        network_hex, high, low = (int(group, 16) for group in groups)
        if network_hex != network:
            raise AddressError(
                f"network id mismatch in {_show(text)}: decimal {network} "
                f"but hex group {groups[0]!r} is {network_hex}"
            )
        return cls(network, (high << 16) | low)

    def __str__(self) -> str:
        node = self.node
        return f"{self.network}:{self.network:04X}.{node >> 16:04X}.{node & _U16:04X}"

    def __repr__(self) -> str:
        return f"Address({str(self)!r})"

    def to_bytes(self) -> bytes:
        """The 6-byte wire form ``[u16 network][u32 node]``, big-endian."""
        return _ADDR.pack(self.network, self.node)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Self:
        """Unpack exactly 6 bytes.

        Raises:
            AddressError: ``data`` is not 6 bytes long.
        """
        if len(data) != cls.SIZE:
            raise AddressError(f"address must be {cls.SIZE} bytes, got {len(data)}")
        network, node = _ADDR.unpack(data)
        return cls(network, node)

    @classmethod
    def coerce(cls, value: Address | str) -> Address:
        """Return ``value`` if it is an :class:`Address`, else parse it."""
        return value if isinstance(value, Address) else cls.parse(value)


@dataclass(frozen=True, order=True, slots=True)
class SocketAddress:
    """A Pilot address plus a 16-bit port: ``N:NNNN.HHHH.LLLL:port``.

    Immutable, hashable and ordered by ``(address, port)``.

    Raises:
        AddressError: ``address`` is not an :class:`Address` or ``port`` is out of range.
    """

    address: Address
    port: int

    SIZE = 8
    """Bytes on the wire."""

    def __post_init__(self) -> None:
        if not isinstance(self.address, Address):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise AddressError(f"address must be an Address, got {type(self.address).__name__}")
        _check_int("port", self.port, _U16)

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``N:NNNN.HHHH.LLLL:port``.

        Raises:
            AddressError: the text is malformed; the message names the bad part.
        """
        if not isinstance(text, str):  # pyright: ignore[reportUnnecessaryIsInstance]  # runtime guard
            raise AddressError(f"socket address must be str, got {type(text).__name__}")
        if len(text) > _MAX_TEXT:
            raise AddressError(f"socket address text too long ({len(text)} chars): {_show(text)}")
        address_text, sep, port_text = text.rpartition(":")
        if not sep or ":" not in address_text:
            raise AddressError(
                f"socket address {_show(text)} has no port (expected N:NNNN.HHHH.LLLL:port)"
            )
        if not _DECIMAL.fullmatch(port_text) or int(port_text) > _U16:
            raise AddressError(f"port {_show(port_text)} in {_show(text)} is not in 0..65535")
        return cls(Address.parse(address_text), int(port_text))

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"

    def __repr__(self) -> str:
        return f"SocketAddress({str(self)!r})"

    def to_bytes(self) -> bytes:
        """The 8-byte wire form: 6 address bytes then a big-endian u16 port."""
        return _SOCK.pack(self.address.network, self.address.node, self.port)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Self:
        """Unpack exactly 8 bytes.

        Raises:
            AddressError: ``data`` is not 8 bytes long.
        """
        if len(data) != cls.SIZE:
            raise AddressError(f"socket address must be {cls.SIZE} bytes, got {len(data)}")
        network, node, port = _SOCK.unpack(data)
        return cls(Address(network, node), port)
