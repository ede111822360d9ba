"""A pilot-rpc peer speaking literal frames over one transport stream: what an
attacker (a trusted peer that does not follow the protocol's intent) can send.
Shared by the real-process tests of pilot-rpc and pilot-worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from typing import Any

import msgpack
from pilot_rpc import _protocol as P
from pilot_transport import Transport

__all__ = ["FRAME", "SERVER_FRAME", "WINDOW", "MiB", "RawPeer"]

TIMEOUT = 30.0

FRAME = struct.Struct(">IBBI")
SERVER_FRAME = 256 * 1024  # the server's default max_frame_size
WINDOW = 256 * 1024  # the server's default initial_window
MiB = 1024 * 1024


class RawPeer:
    """One connection speaking literal frames (the attacker), with the client core for HELLO."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buffer = b""
        self.frames: list[tuple[int, int, int, bytes]] = []

    @classmethod
    async def open(cls, transport: Transport, peer: str = "server", port: int = 5000) -> RawPeer:
        stream = await transport.connect(peer, port, timeout=10)
        raw = cls(stream)
        await stream.write(P.Connection(P.Role.CLIENT).data_to_send())
        async with asyncio.timeout(TIMEOUT):
            while not raw.frames:  # the server's HELLO
                await raw.read_some()
        assert raw.frames[0][0] == 0x01
        raw.frames.clear()
        return raw

    async def read_some(self) -> None:
        data = await self.stream.read(1 << 20)
        if not data:
            raise EOFError("the server closed the connection")
        self.buffer += data
        pos = 0
        while len(self.buffer) - pos >= 10:
            length, kind, flags, call_id = FRAME.unpack_from(self.buffer, pos)
            if len(self.buffer) - pos - 10 < length:
                break
            self.frames.append((kind, flags, call_id, self.buffer[pos + 10 : pos + 10 + length]))
            pos += 10 + length
        self.buffer = self.buffer[pos:]

    async def send(self, kind: int, call_id: int, payload: bytes = b"", flags: int = 0) -> None:
        await self.stream.write(FRAME.pack(len(payload), kind, flags, call_id) + payload)

    async def start_split_call(self, call_id: int, method: str, size: int) -> None:
        """The first piece of a unary CALL whose ``size``-byte request never finishes."""
        header = msgpack.packb([method, 1, None, None])
        prefix = struct.pack(">H", len(header)) + header + b"\xc6" + struct.pack(">I", size)
        body = prefix + b"a" * (SERVER_FRAME - len(prefix))
        await self.send(0x02, call_id, body, 0x02 | 0x01)  # CALL, END_STREAM | MORE

    async def ping_pong(self) -> None:
        """A round trip: every frame the server sends for what we sent so far is in."""
        payload = os.urandom(8)
        await self.send(0x0A, 0, payload)
        async with asyncio.timeout(TIMEOUT):
            while not any(k == 0x0B and p == payload for k, _, _, p in self.frames):
                await self.read_some()

    def errors(self) -> dict[int, list[Any]]:
        return {c: msgpack.unpackb(p) for k, _, c, p in self.frames if k == 0x07}

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()
