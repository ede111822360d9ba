"""Wire constants of the pilot-rpc frame format (PROTOCOL.md is the prose version).

Every frame is a 10-byte header followed by ``length`` payload bytes::

    +----------------+--------+--------+----------------+-----------------+
    | length  u32 BE | kind u8|flags u8| call_id  u32 BE| payload (length)|
    +----------------+--------+--------+----------------+-----------------+

All integers are big-endian. ``length`` counts the payload only, and is
checked against the receiver's ``max_frame_size`` as soon as the header is in,
before any payload is buffered.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "CALL_HEADER_LEN",
    "HEADER",
    "HEADER_SIZE",
    "HELLO_MAX_SIZE",
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
]

HEADER: Final = struct.Struct(">IBBI")
HEADER_SIZE: Final = HEADER.size  # 10
CALL_HEADER_LEN: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")

PROTOCOL_NAME: Final = "pilot-rpc"
PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)
HELLO_MAX_SIZE: Final = 4096
"""The first frame must be a HELLO no larger than this."""

# Frame kinds.
HELLO: Final = 0x01
CALL: Final = 0x02
REPLY: Final = 0x03
ITEM: Final = 0x04
PROGRESS: Final = 0x05
END: Final = 0x06
ERROR: Final = 0x07
CANCEL: Final = 0x08
CREDIT: Final = 0x09
PING: Final = 0x0A
PONG: Final = 0x0B
GOAWAY: Final = 0x0C
CONTINUATION: Final = 0x0D

KIND_NAMES: Final = {
    HELLO: "HELLO",
    CALL: "CALL",
    REPLY: "REPLY",
    ITEM: "ITEM",
    PROGRESS: "PROGRESS",
    END: "END",
    ERROR: "ERROR",
    CANCEL: "CANCEL",
    CREDIT: "CREDIT",
    PING: "PING",
    PONG: "PONG",
    GOAWAY: "GOAWAY",
    CONTINUATION: "CONTINUATION",
}

# Flags.
FLAG_MORE: Final = 0x01
"""The message continues in CONTINUATION frames on the same call."""
FLAG_END_STREAM: Final = 0x02
"""On CALL: the request is complete (no request ITEM/END frames follow)."""

PING_PAYLOAD_SIZE: Final = 8
MAX_CREDIT: Final = 2**31 - 1
MAX_CALL_ID: Final = 2**32 - 1
MAX_METHOD_LEN: Final = 1024
