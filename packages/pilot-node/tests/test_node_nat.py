"""Discovery, punching and relay fallback, on loopback with a scripted registry and beacon.

The beacon here is a real UDP socket that answers discover requests with an endpoint the
test chooses (as a beacon outside a NAT sees the router's address), relays frames and
sends punch commands. The registry is an in-memory directory shared by the nodes, which
can hand out an endpoint that swallows everything (what a NAT that defeats punching looks
like from outside). Real NATs between network namespaces are exercised by the integration
tests (``integration-tests/tests/test_pilot_node_nat.py``).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
from pilot_node import Datagram, Node, NodeConfig
from pilot_node._registry import HandshakeInbox, LookupResult, Registration

WaitFor = Callable[..., Awaitable[None]]


class Directory:
    """The registry's view: who registered with which endpoint and key."""

    def __init__(self) -> None:
        self.registered: dict[int, list[tuple[str, list[str]]]] = {}
        self.keys: dict[int, bytes] = {}
        self.resolve_to: dict[int, tuple[str, int]] = {}
        self.resolves: list[tuple[int, int]] = []  # (asking node, resolved node)

    def client(self, node_id: int, key: bytes) -> ScriptedRegistry:
        self.keys[node_id] = key
        return ScriptedRegistry(self, node_id)


class ScriptedRegistry:
    def __init__(self, directory: Directory, node_id: int) -> None:
        self.directory = directory
        self.node_id = node_id
        self.forever = asyncio.Event()

    async def register(
        self, listen_addr: str, *, hostname: str = "", lan_addrs: list[str] | None = None
    ) -> Registration:
        entries = self.directory.registered.setdefault(self.node_id, [])
        entries.append((listen_addr, list(lan_addrs or [])))
        host, _, port = listen_addr.rpartition(":")
        self.directory.resolve_to.setdefault(self.node_id, (host, int(port)))
        return Registration(self.node_id, f"0:0000.0000.{self.node_id:04X}", listen_addr, "")

    async def heartbeat(self) -> None:
        return None

    async def set_visibility(self, public: bool) -> None:
        return None

    async def poll_handshakes(self) -> HandshakeInbox:
        await self.forever.wait()
        return HandshakeInbox()

    async def resolve(self, node_id: int) -> tuple[str, int]:
        self.directory.resolves.append((self.node_id, node_id))
        return self.directory.resolve_to[node_id]

    async def lookup(self, node_id: int) -> LookupResult:
        key = self.directory.keys[node_id]
        return LookupResult(node_id, f"0:0000.0000.{node_id:04X}", key, True, "", None, "")

    async def aclose(self) -> None:
        return None


class FakeBeacon(asyncio.DatagramProtocol):
    """Discover replies (``observed`` overrides what it saw), relay and punch commands."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.seen: dict[int, tuple[str, int]] = {}
        self.observed: dict[int, tuple[str, int]] = {}
        self.relayed = 0
        self.punches = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        assert self.transport is not None
        source = (str(addr[0]), int(addr[1]))
        (node_id,) = struct.unpack_from(">I", data, 1)
        if data[0] == 0x01:
            self.seen[node_id] = source
            host, port = self.observed.get(node_id, source)
            self.transport.sendto(b"\x02" + _endpoint(host, port), addr)
        elif data[0] == 0x03:
            (target,) = struct.unpack_from(">I", data, 5)
            self.punches += 1
            mine, theirs = self.seen[node_id], self.seen[target]
            self.transport.sendto(b"\x04" + _endpoint(*theirs), mine)
            self.transport.sendto(b"\x04" + _endpoint(*mine), theirs)
        elif data[0] == 0x05:
            (target,) = struct.unpack_from(">I", data, 5)
            self.relayed += 1
            self.transport.sendto(b"\x06" + data[1:5] + data[9:], self.seen[target])


def _endpoint(host: str, port: int) -> bytes:
    return b"\x04" + socket.inet_aton(host) + struct.pack(">H", port)


class Lab:
    def __init__(self, beacon: FakeBeacon, beacon_port: int) -> None:
        self.beacon = beacon
        self.beacon_port = beacon_port
        self.directory = Directory()
        self.nodes: list[Node] = []

    async def node(self, node_id: int, **overrides: Any) -> Node:
        config = NodeConfig(
            registry="127.0.0.1:9",
            beacon=f"127.0.0.1:{self.beacon_port}",
            poll_interval=3600.0,
            key_exchange_timeout=2.0,
            announce_interval=0.05,
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        node = Node(config)
        registry = self.directory.client(node_id, node.identity.public_key)
        node.registry = registry  # type: ignore[assignment]
        self.nodes.append(node)
        await node.start()
        return node


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    loop = asyncio.get_running_loop()
    transport, beacon = await loop.create_datagram_endpoint(FakeBeacon, local_addr=("127.0.0.1", 0))
    made = Lab(beacon, int(transport.get_extra_info("sockname")[1]))
    try:
        yield made
    finally:
        for node in made.nodes:
            await node.aclose()
        transport.close()


@pytest.fixture
def black_hole() -> Iterator[tuple[str, int]]:
    """A UDP endpoint that receives and never answers (a NAT dropping what we send)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield ("127.0.0.1", int(sock.getsockname()[1]))
    finally:
        sock.close()


def both_direct(a: Node, b: Node) -> bool:
    return (
        a.peer_info(b.node_id).get("via_relay") is False
        and b.peer_info(a.node_id).get("via_relay") is False
    )


def collect(node: Node, port: int) -> list[bytes]:
    got: list[bytes] = []

    def handler(datagram: Datagram) -> None:
        got.append(datagram.payload)

    node.on_datagram(port, handler)
    return got


async def test_registers_the_endpoint_the_beacon_saw_not_the_bound_one(lab: Lab) -> None:
    lab.beacon.observed[0] = ("192.0.2.7", 4242)  # the discover before registering
    node = await lab.node(5)
    assert node.observed_endpoint == ("192.0.2.7", 4242)
    [(listen, lan)] = lab.directory.registered[5]
    assert listen == "192.0.2.7:4242"
    assert lan == []  # a LAN address misleads peers on the same private subnet


async def test_a_new_mapping_seen_by_the_beacon_is_registered_again(
    lab: Lab, wait_for: WaitFor
) -> None:
    node = await lab.node(5, heartbeat_interval=0.02)
    assert lab.directory.registered[5][0][0] == f"127.0.0.1:{node.endpoint[1]}"
    assert lab.directory.registered[5][0][1] == []  # the beacon saw the bound endpoint
    lab.beacon.observed[5] = ("192.0.2.8", 5000)  # the NAT mapped us anew
    await wait_for(lambda: len(lab.directory.registered[5]) >= 2, "a re-registration")
    assert lab.directory.registered[5][-1][0] == "192.0.2.8:5000"
    assert node.observed_endpoint == ("192.0.2.8", 5000)
    assert node.stats["observed_endpoint_changes"] == 1


async def test_an_unreachable_endpoint_falls_back_to_the_relay(
    lab: Lab, black_hole: tuple[str, int], wait_for: WaitFor
) -> None:
    a = await lab.node(1)
    b = await lab.node(2)
    # What each is told is the other's endpoint (a NAT that never lets anything in).
    lab.directory.resolve_to[1] = lab.directory.resolve_to[2] = black_hole
    got = collect(b, 9)
    await a.send_datagram(2, 9, b"through the relay", timeout=5.0)
    await wait_for(lambda: got == [b"through the relay"], "the relayed datagram")
    assert a.peer_info(2)["via_relay"] is True
    assert a.stats["punch_requests"] == 1
    await wait_for(lambda: a.stats.get("relay_fallbacks", 0) == 1, "the punch to give up")
    relayed = lab.beacon.relayed
    await a.send_datagram(2, 9, b"still relayed")
    await wait_for(lambda: len(got) == 2, "the second datagram")
    assert lab.beacon.relayed > relayed
    assert a.stats.get("direct_paths_confirmed", 0) == 0
    assert b.peer_info(1)["via_relay"] is True
    # B, reached through the relay, looked A up and punched once; A announcing itself
    # through the relay again does not start another attempt (one per 30 s per peer).
    await wait_for(lambda: b.stats.get("relay_fallbacks", 0) == 1, "B's punch to give up")
    assert lab.directory.resolves.count((2, 1)) == 1
    handshakes = b.stats.get("handshakes_same_session", 0)
    a._announce(a._peers[2], also_relay=True)  # pyright: ignore[reportPrivateUsage]
    await wait_for(
        lambda: b.stats.get("handshakes_same_session", 0) > handshakes, "the relayed announcement"
    )
    assert lab.directory.resolves.count((2, 1)) == 1
    assert b.stats["punch_requests"] == 1


async def test_the_side_reached_through_the_relay_punches_too(
    lab: Lab, black_hole: tuple[str, int], wait_for: WaitFor
) -> None:
    a = await lab.node(1)
    b = await lab.node(2)
    lab.directory.resolve_to[2] = black_hole  # A cannot reach B where it was told to
    got = collect(b, 9)
    await a.send_datagram(2, 9, b"hello", timeout=5.0)
    await wait_for(lambda: got == [b"hello"], "the datagram")
    # B heard from A through the relay only: it resolves A and sends to it straight,
    # and A answers B's direct frame, so both switch to the path that works.
    await wait_for(lambda: both_direct(a, b), "both sides to switch to the direct path")
    assert b.stats["punch_requests"] == 1
    assert a.peer_info(2)["endpoint"] == b.endpoint
    assert b.peer_info(1)["endpoint"] == a.endpoint


async def test_the_direct_path_is_used_once_a_frame_arrives_straight_from_the_peer(
    lab: Lab, wait_for: WaitFor
) -> None:
    a = await lab.node(1)
    b = await lab.node(2)
    got = collect(b, 9)
    await a.send_datagram(2, 9, b"first", timeout=5.0)
    await wait_for(lambda: got == [b"first"], "the first datagram")
    # The resolved endpoint is only a candidate until the peer is heard from it.
    await wait_for(lambda: both_direct(a, b), "both sides to confirm the direct path")
    assert a.peer_info(2)["endpoint"] == b.endpoint
    assert b.peer_info(1)["endpoint"] == a.endpoint
    assert a.stats["direct_paths_confirmed"] >= 1
    assert a.stats["punch_requests"] == 1
    assert lab.beacon.punches == 1
    relayed = lab.beacon.relayed
    for n in range(20):
        await a.send_datagram(2, 9, b"direct %d" % n)
    await wait_for(lambda: len(got) == 21, "the direct datagrams")
    assert lab.beacon.relayed == relayed


async def test_without_a_beacon_the_resolved_endpoint_is_used_directly(
    lab: Lab, wait_for: WaitFor
) -> None:
    a = await lab.node(1, beacon="")
    b = await lab.node(2, beacon="")
    got = collect(b, 9)
    await a.send_datagram(2, 9, b"direct", timeout=5.0)
    await wait_for(lambda: got == [b"direct"], "the datagram")
    assert a.peer_info(2)["via_relay"] is False
    assert "punch_requests" not in a.stats
    assert lab.beacon.relayed == 0
