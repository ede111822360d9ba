"""Registry message codecs, signed challenges and the client against an in-process server."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pilot_node import NodeIdentity, RegistryError, RegistryRefusedError
from pilot_node._identity import verify_signature
from pilot_node._registry import RegistryClient, decode_message, encode_message, parse_endpoint
from pilot_node.errors import RegistryUnavailableError


def test_message_framing_roundtrip() -> None:
    frame = encode_message({"type": "lookup", "node_id": 7})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert decode_message(frame[4:]) == {"type": "lookup", "node_id": 7}
    with pytest.raises(RegistryError):
        decode_message(b"[1, 2]")
    with pytest.raises(RegistryError):
        decode_message(b"{nope")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:4000", ("127.0.0.1", 4000)),
        ("[::1]:9", ("::1", 9)),
        ("", None),
        ("host", None),
        ("host:0", None),
        ("host:70000", None),
        ("host:x", None),
    ],
)
def test_parse_endpoint(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_endpoint(text) == expected


class FakeRegistry:
    """Answers like the registry and records every message."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                msg = json.loads(await reader.readexactly(length))
                self.seen.append(msg)
                writer.write(encode_message(self.reply(msg)))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def reply(self, msg: dict[str, Any]) -> dict[str, Any]:
        kind = msg["type"]
        if kind == "register":
            return {"type": "register_ok", "node_id": 5, "address": "0:0000.0000.0005"}
        if kind == "resolve":
            if msg["node_id"] == 99:
                return {"error": "node 99 is private"}
            return {"type": "resolve_ok", "real_addr": "10.0.0.2:4000"}
        if kind == "poll_handshakes":
            return {
                "type": "poll_handshakes_ok",
                "requests": [{"from_node_id": 8, "justification": "hi"}],
                "responses": [{"from_node_id": 9, "accept": True}],
            }
        return {"type": f"{kind}_ok"}


@pytest.fixture
async def registry() -> AsyncIterator[tuple[FakeRegistry, int]]:
    fake = FakeRegistry()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        yield fake, port
    finally:
        server.close()
        await server.wait_closed()


async def test_calls_are_signed_with_the_documented_challenges(
    registry: tuple[FakeRegistry, int],
) -> None:
    fake, port = registry
    identity = NodeIdentity.generate()
    client = RegistryClient("127.0.0.1", port, identity)
    try:
        reg = await client.register("127.0.0.1:4000", hostname="")
        assert reg.node_id == 5
        assert await client.resolve(6) == ("10.0.0.2", 4000)
        await client.heartbeat()
        await client.request_handshake(8, "why")
        await client.respond_handshake(8, True)
        inbox = await client.poll_handshakes()
        assert inbox.requests == ((8, "hi"),)
        assert inbox.responses == ((9, True),)
        with pytest.raises(RegistryRefusedError, match="private"):
            await client.resolve(99)
    finally:
        await client.aclose()
    key = identity.public_key_b64
    challenges = {
        "register": f"register:127.0.0.1:4000:{key}",
        "resolve": "resolve:5:{node_id}",
        "heartbeat": "heartbeat:5",
        "request_handshake": "handshake:5:8",
        "respond_handshake": "respond:5:8",
        "poll_handshakes": "poll_handshakes:5",
    }
    for msg in fake.seen:
        expected = challenges[msg["type"]].format(node_id=msg.get("node_id"))
        signature = base64.b64decode(msg["signature"])
        assert verify_signature(identity.public_key, expected.encode(), signature), msg["type"]


async def test_unreachable_registry_is_a_typed_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(probe.sockets[0].getsockname()[1])
    probe.close()
    await probe.wait_closed()
    client = RegistryClient("127.0.0.1", port, NodeIdentity.generate(), timeout=2.0)
    with pytest.raises(RegistryUnavailableError):
        await client.lookup(1)
    await client.aclose()
