"""Beacon messages: endpoint discovery, punch requests and relay.

Wire facts (protocol documentation and observed 1.18.0 traffic), UDP, big-endian:

* discover ``0x01 | u32 node id``; reply ``0x02 | u8 ip length | ip | u16 port`` (the
  endpoint the beacon saw the request come from).
* punch request ``0x03 | u32 requester | u32 target``: asks the beacon to tell both sides
  to send to each other (punch command ``0x04 | u8 ip length | ip | u16 port``).
* relay ``0x05 | u32 source | u32 destination | tunnel frame``; the beacon delivers it to
  the destination as ``0x06 | u32 source | tunnel frame``.
"""

from __future__ import annotations

import ipaddress
import struct

from .errors import TunnelError

__all__ = [
    "DISCOVER",
    "DISCOVER_REPLY",
    "PUNCH_COMMAND",
    "PUNCH_REQUEST",
    "RELAY",
    "RELAY_DELIVER",
    "decode_endpoint",
    "decode_relay_deliver",
    "discover",
    "punch_request",
    "relay",
]

DISCOVER = 0x01
DISCOVER_REPLY = 0x02
PUNCH_REQUEST = 0x03
PUNCH_COMMAND = 0x04
RELAY = 0x05
RELAY_DELIVER = 0x06
_U32 = struct.Struct(">I")
_TWO = struct.Struct(">II")


def discover(node_id: int) -> bytes:
    """A discover request for ``node_id``."""
    return bytes([DISCOVER]) + _U32.pack(node_id)


def punch_request(requester: int, target: int) -> bytes:
    """Ask the beacon to introduce ``requester`` and ``target`` to each other."""
    return bytes([PUNCH_REQUEST]) + _TWO.pack(requester, target)


def relay(source: int, destination: int, frame: bytes) -> bytes:
    """Wrap a tunnel frame for relaying through the beacon."""
    return bytes([RELAY]) + _TWO.pack(source, destination) + frame


def decode_endpoint(data: bytes) -> tuple[str, int]:
    """The endpoint in a discover reply or punch command.

    Raises:
        TunnelError: malformed.
    """
    if len(data) < 2:
        raise TunnelError("beacon endpoint message too short")
    size = data[1]
    if size not in (4, 16) or len(data) < 2 + size + 2:
        raise TunnelError(f"beacon endpoint message malformed ({len(data)} bytes, ip {size})")
    ip = str(ipaddress.ip_address(data[2 : 2 + size]))
    (port,) = struct.unpack_from(">H", data, 2 + size)
    return ip, port


def decode_relay_deliver(data: bytes) -> tuple[int, bytes]:
    """``(source node id, tunnel frame)`` from a relay delivery.

    Raises:
        TunnelError: malformed.
    """
    if len(data) < 5 or data[0] != RELAY_DELIVER:
        raise TunnelError("not a relay delivery")
    (source,) = _U32.unpack_from(data, 1)
    return source, data[5:]
