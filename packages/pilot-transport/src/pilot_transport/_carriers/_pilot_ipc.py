"""Sans-IO codec of the Pilot daemon's Unix-socket protocol (see PILOT-DAEMON.md).

Theory of operation
-------------------

Every message in either direction is one frame::

    [u32 big-endian L][u8 command][payload: L - 1 bytes]

``L`` counts the command byte and the payload and is at most 1,048,576; the
daemon drops a client that announces more, and ignores ``L == 0``. There are no
request ids: the daemon answers one client's requests in order, one reply each,
except ``Send`` and ``SendTo`` which have no success reply and fail *later*
with an ``Error`` that names neither the request nor the connection. Pushes
(``Accept``, ``Recv``, ``RecvFrom``, unsolicited ``CloseOK``) can arrive between
any two replies.

This module only turns bytes into :class:`Frame` objects and typed messages
and back. It performs no I/O, owns no clock and is shared by the client
(:mod:`pilot_transport._carriers.pilot`) and the daemon double
(:mod:`pilot_transport.testing._daemon_double`). Builders return one ``bytes``
object holding header and body, so a driver writes each frame with a single
write (a header written apart from its body is the Nagle trap PILOT-DAEMON.md
measures at 40 ms).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from pilot_transport._address import Address, SocketAddress
from pilot_transport.errors import DaemonError

__all__ = [
    "JSON_REPLIES",
    "MAX_DATAGRAM",
    "MAX_FRAME",
    "MAX_SEND_DATA",
    "Accept",
    "BindOK",
    "CloseOK",
    "Cmd",
    "DialOK",
    "Error",
    "Frame",
    "FrameDecoder",
    "FrameTooLargeError",
    "HandshakeSub",
    "IpcProtocolError",
    "JsonReply",
    "Message",
    "Recv",
    "RecvFrom",
    "accept",
    "bind",
    "bind_ok",
    "close",
    "close_ok",
    "dial",
    "dial_ok",
    "encode_frame",
    "error",
    "flag_command",
    "handshake",
    "info",
    "json_reply",
    "parse_message",
    "recv",
    "recv_from",
    "send",
    "send_to",
    "set_tags",
    "text_command",
]

MAX_FRAME = 1_048_576
"""Largest ``L`` (command byte + payload) the daemon accepts."""

MAX_SEND_DATA = MAX_FRAME - 1 - 4
"""Most data bytes one ``Send`` frame can carry (1,048,571)."""

MAX_DATAGRAM = 65_535
"""Largest ``SendTo`` payload; the daemon drops bigger ones with an async Error."""

_HEADER = struct.Struct(">IB")
_SEND_HEADER = struct.Struct(">IBI")  # length, command, conn id: a Send frame's first 9 bytes
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_ACCEPT = struct.Struct(">HIHIH")  # local_port, conn_id, remote net, remote node, remote port
_RECVFROM = struct.Struct(">HIHH")  # src net, src node, src port, dst port
_ERROR = struct.Struct(">H")


class Cmd(IntEnum):
    """Command bytes of the daemon's socket protocol."""

    BIND = 0x01
    BIND_OK = 0x02
    DIAL = 0x03
    DIAL_OK = 0x04
    ACCEPT = 0x05
    SEND = 0x06
    RECV = 0x07
    CLOSE = 0x08
    CLOSE_OK = 0x09
    ERROR = 0x0A
    SEND_TO = 0x0B
    RECV_FROM = 0x0C
    INFO = 0x0D
    INFO_OK = 0x0E
    HANDSHAKE = 0x0F
    HANDSHAKE_OK = 0x10
    RESOLVE_HOSTNAME = 0x11
    RESOLVE_HOSTNAME_OK = 0x12
    SET_HOSTNAME = 0x13
    SET_HOSTNAME_OK = 0x14
    SET_VISIBILITY = 0x15
    SET_VISIBILITY_OK = 0x16
    DEREGISTER = 0x17
    DEREGISTER_OK = 0x18
    SET_TAGS = 0x19
    SET_TAGS_OK = 0x1A
    SET_WEBHOOK = 0x1B
    SET_WEBHOOK_OK = 0x1C
    SET_TASK_EXEC = 0x1D
    SET_TASK_EXEC_OK = 0x1E


class HandshakeSub(IntEnum):
    """Sub-command byte of ``Handshake`` (0x0F)."""

    REQUEST = 0x01
    APPROVE = 0x02
    REJECT = 0x03
    PENDING = 0x04
    TRUSTED = 0x05
    REVOKE = 0x06


JSON_REPLIES = frozenset(
    {
        Cmd.INFO_OK,
        Cmd.HANDSHAKE_OK,
        Cmd.RESOLVE_HOSTNAME_OK,
        Cmd.SET_HOSTNAME_OK,
        Cmd.SET_VISIBILITY_OK,
        Cmd.DEREGISTER_OK,
        Cmd.SET_TAGS_OK,
        Cmd.SET_WEBHOOK_OK,
        Cmd.SET_TASK_EXEC_OK,
    }
)
"""Replies whose payload is a JSON document."""


class IpcProtocolError(DaemonError):
    """The peer broke the socket protocol (bad length, truncated payload, bad JSON)."""


class FrameTooLargeError(IpcProtocolError):
    """A frame announced ``L`` above :data:`MAX_FRAME`."""

    def __init__(self, length: int) -> None:
        super().__init__(f"frame length {length} exceeds the {MAX_FRAME}-byte limit")
        self.length = length


@dataclass(frozen=True, slots=True)
class Frame:
    """One raw frame: a command byte and its payload."""

    cmd: int
    payload: bytes


def encode_frame(cmd: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Header and body as one ``bytes`` (one write per frame).

    Raises:
        ValueError: the frame would exceed :data:`MAX_FRAME` (a bug in the caller:
            every sender splits below the limit first).
    """
    length = 1 + len(payload)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return _HEADER.pack(length, cmd) + payload


class FrameDecoder:
    """Incremental frame splitter: feed bytes, get whole frames.

    ``L == 0`` frames are skipped (the daemon ignores them too). A frame above
    ``max_frame`` raises :class:`FrameTooLargeError` before anything is
    allocated for it; the decoder is unusable afterwards (the stream is out of
    sync, so the only safe move is to drop the connection, as the daemon does).
    """

    __slots__ = ("_broken", "_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._broken = False
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Append ``data``; return every frame now complete, in order.

        Raises:
            FrameTooLargeError: a header announced more than ``max_frame`` bytes.
        """
        if self._broken:
            raise IpcProtocolError("decoder used after a framing error")
        buf = self._buf
        if not buf and len(data) >= 5:
            # The common case: nothing held back and the read is exactly one
            # whole frame. Slice it straight out (one copy, no buffering).
            (length,) = _U32.unpack_from(data)
            if length == len(data) - 4 and 0 < length <= self.max_frame:
                return [Frame(data[4], bytes(data[5:]))]
        buf += data
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= 4:
                (length,) = _U32.unpack_from(buf, pos)
                if length == 0:
                    pos += 4
                    continue
                if length > self.max_frame:
                    self._broken = True
                    raise FrameTooLargeError(length)
                if end - pos - 4 < length:
                    break
                start = pos + 4
                frames.append(Frame(buf[start], bytes(view[start + 1 : start + length])))
                pos = start + length
        finally:
            view.release()
        if self._broken:
            del buf[:]
        elif pos:
            del buf[:pos]
        return frames


# -- typed messages (daemon -> client) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindOK:
    port: int


@dataclass(frozen=True, slots=True)
class DialOK:
    conn_id: int


@dataclass(frozen=True, slots=True)
class Accept:
    local_port: int
    conn_id: int
    remote: SocketAddress


@dataclass(frozen=True, slots=True)
class Recv:
    conn_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseOK:
    conn_id: int


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class RecvFrom:
    source: SocketAddress
    dst_port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class JsonReply:
    cmd: int
    value: Any


Message = BindOK | DialOK | Accept | Recv | CloseOK | Error | RecvFrom | JsonReply | Frame
"""A parsed daemon -> client frame; unknown commands stay a raw :class:`Frame`."""


def _need(frame: Frame, size: int, what: str) -> None:
    if len(frame.payload) < size:
        raise IpcProtocolError(
            f"{what} frame (0x{frame.cmd:02X}) has {len(frame.payload)} payload bytes, needs {size}"
        )


def parse_message(frame: Frame) -> Message:
    """Decode a daemon -> client frame into a typed message.

    Raises:
        IpcProtocolError: the payload is too short for its command or is bad JSON.
    """
    cmd, p = frame.cmd, frame.payload
    if cmd == Cmd.RECV:
        _need(frame, 4, "Recv")
        return Recv(_U32.unpack_from(p)[0], p[4:])
    if cmd == Cmd.CLOSE_OK:
        _need(frame, 4, "CloseOK")
        return CloseOK(_U32.unpack_from(p)[0])
    if cmd == Cmd.ACCEPT:
        _need(frame, _ACCEPT.size, "Accept")
        local_port, conn_id, net, node, port = _ACCEPT.unpack_from(p)
        return Accept(local_port, conn_id, SocketAddress(Address(net, node), port))
    if cmd == Cmd.DIAL_OK:
        _need(frame, 4, "DialOK")
        return DialOK(_U32.unpack_from(p)[0])
    if cmd == Cmd.BIND_OK:
        _need(frame, 2, "BindOK")
        return BindOK(_U16.unpack_from(p)[0])
    if cmd == Cmd.ERROR:
        _need(frame, 2, "Error")
        return Error(_ERROR.unpack_from(p)[0], p[2:].decode("utf-8", "replace"))
    if cmd == Cmd.RECV_FROM:
        _need(frame, _RECVFROM.size, "RecvFrom")
        net, node, sport, dport = _RECVFROM.unpack_from(p)
        return RecvFrom(SocketAddress(Address(net, node), sport), dport, p[_RECVFROM.size :])
    if cmd in JSON_REPLIES:
        try:
            return JsonReply(cmd, json.loads(p.decode("utf-8")) if p else None)
        except (UnicodeDecodeError, ValueError) as exc:
            raise IpcProtocolError(f"reply 0x{cmd:02X} carries invalid JSON: {exc}") from exc
    return frame


# -- client -> daemon builders -----------------------------------------------------------


def bind(port: int) -> bytes:
    return encode_frame(Cmd.BIND, _U16.pack(port))


def dial(address: Address, port: int) -> bytes:
    return encode_frame(Cmd.DIAL, address.to_bytes() + _U16.pack(port))


def send(conn_id: int, data: bytes | bytearray | memoryview) -> bytes:
    """One ``Send`` frame; ``data`` must be at most :data:`MAX_SEND_DATA` bytes."""
    return _SEND_HEADER.pack(5 + len(data), Cmd.SEND, conn_id) + data


def close(conn_id: int) -> bytes:
    return encode_frame(Cmd.CLOSE, _U32.pack(conn_id))


def send_to(address: Address, port: int, data: bytes | bytearray | memoryview) -> bytes:
    return encode_frame(Cmd.SEND_TO, address.to_bytes() + _U16.pack(port) + data)


def info() -> bytes:
    return encode_frame(Cmd.INFO)


def handshake(sub: HandshakeSub, node_id: int | None = None, text: str = "") -> bytes:
    body = bytes([sub])
    if node_id is not None:
        body += _U32.pack(node_id)
    return encode_frame(Cmd.HANDSHAKE, body + text.encode("utf-8"))


def text_command(cmd: Cmd, text: str) -> bytes:
    """ResolveHostname, SetHostname, SetWebhook: a UTF-8 payload."""
    return encode_frame(cmd, text.encode("utf-8"))


def flag_command(cmd: Cmd, flag: bool) -> bytes:
    """SetVisibility, SetTaskExec: one byte, 1 = on."""
    return encode_frame(cmd, b"\x01" if flag else b"\x00")


def set_tags(tags: list[str]) -> bytes:
    return encode_frame(Cmd.SET_TAGS, json.dumps(tags).encode("utf-8"))


# -- daemon -> client builders (used by the daemon double and by codec tests) ------------


def bind_ok(port: int) -> bytes:
    return encode_frame(Cmd.BIND_OK, _U16.pack(port))


def dial_ok(conn_id: int) -> bytes:
    return encode_frame(Cmd.DIAL_OK, _U32.pack(conn_id))


def accept(local_port: int, conn_id: int, remote: SocketAddress) -> bytes:
    a = remote.address
    return encode_frame(
        Cmd.ACCEPT, _ACCEPT.pack(local_port, conn_id, a.network, a.node, remote.port)
    )


def recv(conn_id: int, data: bytes | bytearray | memoryview) -> bytes:
    return _HEADER.pack(5 + len(data), Cmd.RECV) + _U32.pack(conn_id) + data


def close_ok(conn_id: int) -> bytes:
    return encode_frame(Cmd.CLOSE_OK, _U32.pack(conn_id))


def error(message: str, code: int = 1) -> bytes:
    return encode_frame(Cmd.ERROR, _ERROR.pack(code) + message.encode("utf-8"))


def recv_from(source: SocketAddress, dst_port: int, data: bytes | bytearray | memoryview) -> bytes:
    a = source.address
    return encode_frame(
        Cmd.RECV_FROM, _RECVFROM.pack(a.network, a.node, source.port, dst_port) + data
    )


def json_reply(cmd: Cmd, value: Any) -> bytes:
    return encode_frame(cmd, json.dumps(value, separators=(",", ":")).encode("utf-8"))
