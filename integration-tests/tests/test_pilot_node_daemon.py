"""Our pure-Python Pilot node (``pilot_node.Node``) against real 1.18.0 Go daemons.

Each test brings its own network (our registry/beacon stand-in and Go daemons from
the ``pilotprotocol`` wheel on loopback, ``_pilot_daemons.PilotNet``) plus one or two
of our nodes in this process, and drives the daemons with ``pilotctl --json`` and their
IPC socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pilot_node._identity import NodeIdentity
from pilot_node._node import Datagram, Node
from pilot_node._packet import Address, Packet, Protocol
from pilot_node._tunnel import KeyExchange, build_auth_frame
from pilot_node.errors import PilotTimeoutError, RegistryRefusedError
from pilot_transport._address import Address as TransportAddress
from pilot_transport._carriers import _pilot_ipc as ipc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pilot_daemons import PilotNet, pilot_binaries
from _pilot_node_fixtures import ctl, node_config, wait_for

pytestmark = [
    pytest.mark.skipif(pilot_binaries() is None, reason="pilotprotocol wheel not installed"),
    pytest.mark.timeout(300),
]


@pytest.fixture
def net(tmp_path: Path) -> Iterator[PilotNet]:
    with PilotNet(tmp_path / "net", count=1, trust=False) as n:
        yield n


@pytest.fixture
async def node(net: PilotNet) -> AsyncIterator[Node]:
    async with Node(node_config(net, hostname="py-node")) as n:
        yield n


class DaemonDatagrams:
    """A raw IPC connection to a daemon: send datagrams, collect the ones it receives."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.sock.setblocking(False)
        self.buffer = bytearray()

    def send_to(self, address: Address, port: int, payload: bytes) -> None:
        self.sock.settimeout(5.0)
        try:
            self.sock.sendall(ipc.send_to(TransportAddress.parse(str(address)), port, payload))
        finally:
            self.sock.setblocking(False)

    def received(self) -> list[tuple[int, int, bytes]]:
        """(source node, destination port, payload) of every RecvFrom so far."""
        try:
            while chunk := self.sock.recv(65536):
                self.buffer += chunk
        except BlockingIOError:
            pass
        out: list[tuple[int, int, bytes]] = []
        while len(self.buffer) >= 4:
            (length,) = struct.unpack_from(">I", self.buffer)
            if len(self.buffer) < 4 + length:
                break
            body = bytes(self.buffer[4 : 4 + length])
            del self.buffer[: 4 + length]
            if body[0] == ipc.Cmd.RECV_FROM:
                _net, src_node, _sport, dport = struct.unpack_from(">HIHH", body, 1)
                out.append((src_node, dport, body[1 + 10 :]))
        return out

    def close(self) -> None:
        self.sock.close()


# -- 1: registration ------------------------------------------------------------------------


async def test_registers_and_the_daemon_finds_it_by_hostname(net: PilotNet, node: Node) -> None:
    found = await ctl(net, 0, "find", "py-node")
    assert found["address"] == str(node.address)
    assert found["node_id"] == node.node_id
    entry = await node.lookup(net.daemons[0].address)
    assert entry.node_id == net.daemons[0].node_id
    assert len(entry.public_key) == 32


# Still registered after five minutes: test_pilot_node_streams.py checks it in the same
# five idle minutes as a long-lived stream.


async def test_reregisters_after_the_registry_forgot_it(tmp_path: Path) -> None:
    with PilotNet(tmp_path / "net", count=1, trust=False, registry_ttl=1.5) as net:
        config = node_config(net, hostname="comeback", heartbeat_interval=3.0)
        async with Node(config) as n:
            first = n.stats.get("registrations", 0)
            # Heartbeats every 3 s against a 1.5 s expiry: each one finds us forgotten.
            await wait_for(
                lambda: n.stats.get("registrations", 0) > first, 20.0, "a re-registration"
            )
            found = await ctl(net, 0, "find", "comeback")
            assert found["node_id"] == n.node_id


# -- 3: trust between private nodes -----------------------------------------------------------


async def test_trust_both_ways_between_private_nodes(tmp_path: Path) -> None:
    with PilotNet(tmp_path / "net", count=2, trust=False) as net:
        for index in (0, 1):
            await ctl(net, index, "set-private")
        d0, d1 = net.daemons
        async with Node(node_config(net, public=False)) as n:
            # A private node's endpoint is not resolved for a stranger.
            with pytest.raises(RegistryRefusedError):
                await n.registry.resolve(d0.node_id)

            # Our request, relayed through the registry; the daemon approves it.
            assert await n.trust(d0.address, "integration test") is False
            await wait_for_pending(net, 0, n.node_id)
            await ctl(net, 0, "approve", str(n.node_id))
            await wait_for(lambda: d0.node_id in n.trusted, 30.0, "our node to learn the approval")

            # The daemon's request to us, relayed the same way; we approve it.
            await ctl(net, 1, "handshake", str(n.address), "from a daemon")
            await wait_for(lambda: d1.node_id in n.pending_trust, 30.0, "the relayed request")
            assert n.pending_trust[d1.node_id] == "from a daemon"
            await n.approve(d1.node_id)
            await wait_for_trusted(net, 1, n.node_id)

            # Trusted both ways: the private endpoints now resolve and tunnels come up.
            assert await n.registry.resolve(d0.node_id) == ("127.0.0.1", d0.udp_port)
            assert await n.registry.resolve(d1.node_id) == ("127.0.0.1", d1.udp_port)
            await n.connect(d0.node_id, timeout=10.0)
            await n.connect(d1.node_id, timeout=10.0)
            assert await n.ping(d1.node_id, timeout=5.0) > 0


async def wait_for_pending(net: PilotNet, index: int, node_id: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = await ctl(net, index, "pending")
        if any(int(p["node_id"]) == node_id for p in pending.get("pending") or []):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"daemon {index} never listed node {node_id} as pending")


async def wait_for_trusted(net: PilotNet, index: int, node_id: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trusted = await ctl(net, index, "trust")
        if any(int(p["node_id"]) == node_id for p in trusted.get("trusted") or []):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"daemon {index} never trusted node {node_id}")


# -- 7: datagrams both ways -------------------------------------------------------------------


async def test_datagrams_both_ways(net: PilotNet, node: Node) -> None:
    d0 = net.daemons[0]
    got: list[Datagram] = []
    node.on_datagram(5000, got.append)
    raw = DaemonDatagrams(d0.socket)
    try:
        await node.connect(d0.node_id)
        raw.send_to(node.address, 5000, b"to-python")
        await wait_for(lambda: bool(got), 10.0, "the daemon's datagram")
        assert got[0].payload == b"to-python"
        assert got[0].src == Address(0, d0.node_id)

        await node.send_datagram(d0.address, 6000, b"to-go", src_port=6001)
        seen: list[tuple[int, int, bytes]] = []
        await wait_for(lambda: bool(seen.extend(raw.received()) or seen), 10.0, "our datagram")
        assert seen[0] == (node.node_id, 6000, b"to-go")
    finally:
        raw.close()


# -- 5: idle ----------------------------------------------------------------------------------


async def test_daemon_packet_counters_flat_when_idle(net: PilotNet, node: Node) -> None:
    d0 = net.daemons[0]
    for _ in range(20):
        await node.ping(d0.node_id)
    await node.send_datagram(d0.node_id, 6000, b"x")
    await asyncio.sleep(1.0)  # let the last exchange settle before sampling

    def counters(info: dict[str, Any]) -> tuple[int, int]:
        return int(info["pkts_sent"]), int(info["pkts_recv"])

    before = counters(await asyncio.to_thread(d0.info))
    await asyncio.sleep(1.0)
    after = counters(await asyncio.to_thread(d0.info))
    assert after == before, f"daemon packet counters moved while idle: {before} -> {after}"


# -- 6: restarts ------------------------------------------------------------------------------


async def test_redials_within_five_seconds_after_daemon_kill_and_restart(
    net: PilotNet, node: Node
) -> None:
    d0 = net.daemons[0]
    assert await node.ping(d0.node_id) > 0
    await asyncio.to_thread(net.kill, 0)
    await asyncio.to_thread(net.start_daemon, 0)
    started = time.monotonic()
    while True:
        try:
            await node.ping(d0.node_id, timeout=0.5)
            break
        except PilotTimeoutError:
            assert time.monotonic() - started < 5.0, "no redial within 5 s of the restart"
    assert time.monotonic() - started < 5.0


async def test_daemon_reaches_our_restarted_node_within_five_seconds(
    net: PilotNet, tmp_path: Path
) -> None:
    d0 = net.daemons[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    config = node_config(net, identity_path=tmp_path / "id.json", listen=f"127.0.0.1:{port}")
    raw = DaemonDatagrams(d0.socket)
    try:
        async with Node(config) as first:
            got: list[Datagram] = []
            first.on_datagram(5000, got.append)
            await first.connect(d0.node_id)
            raw.send_to(first.address, 5000, b"before")
            await wait_for(lambda: bool(got), 10.0, "a datagram before the restart")
            address = first.address
        async with Node(config) as second:
            assert second.address == address
            got2: list[Datagram] = []
            second.on_datagram(5000, got2.append)
            started = time.monotonic()
            while not got2:
                assert time.monotonic() - started < 5.0, "the daemon did not reach us in 5 s"
                raw.send_to(address, 5000, b"after")
                await asyncio.sleep(0.2)
            assert got2[0].payload == b"after"
    finally:
        raw.close()


# -- 8: spoofing ------------------------------------------------------------------------------


async def test_spoofed_packets_and_forged_handshakes_are_dropped(net: PilotNet, node: Node) -> None:
    d0 = net.daemons[0]
    got: list[Datagram] = []
    node.on_datagram(5000, got.append)
    await node.connect(d0.node_id)
    target = node.endpoint
    claim = Packet(
        protocol=Protocol.DATAGRAM,
        src=Address(0, d0.node_id),
        dst=node.address,
        dst_port=5000,
        payload=b"spoofed",
    ).encode()
    attacker = NodeIdentity.generate()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        # A plaintext packet claiming to come from the daemon.
        sock.sendto(b"PILT" + claim, target)
        # An "encrypted" packet with the daemon's node id and no valid key.
        sock.sendto(b"PILS" + struct.pack(">I", d0.node_id) + os.urandom(12 + 60), target)
        # A key announcement for the daemon's node id signed by someone else.
        fake = build_auth_frame(attacker, d0.node_id, KeyExchange().public)
        sock.sendto(fake, target)
        # The daemon's real public key with a signature that does not verify.
        real_key = (await node.lookup(d0.node_id)).public_key
        bad = fake[:40] + real_key + bytes(64)
        sock.sendto(bad, target)
        # An unsigned key exchange for the daemon's node id.
        sock.sendto(b"PILK" + struct.pack(">I", d0.node_id) + os.urandom(32), target)
    await wait_for(
        lambda: node.stats.get("handshakes_forged_dropped", 0) >= 2,
        10.0,
        "the forged handshakes to be rejected",
    )
    assert node.stats.get("unauthenticated_dropped", 0) >= 1
    assert node.stats.get("handshakes_unauthenticated_dropped", 0) >= 1
    assert node.stats.get("auth_failed_dropped", 0) >= 1
    assert node.stats.get("peer_rekeyed", 0) == 0
    assert got == []

    # The genuine tunnel survived all of it.
    raw = DaemonDatagrams(d0.socket)
    try:
        raw.send_to(node.address, 5000, b"genuine")
        await wait_for(lambda: bool(got), 10.0, "a genuine datagram after the attack")
        assert [d.payload for d in got] == [b"genuine"]
    finally:
        raw.close()


async def test_a_peer_cannot_claim_another_nodes_address_inside_its_tunnel(
    net: PilotNet, node: Node
) -> None:
    d0 = net.daemons[0]
    got: list[Datagram] = []
    node.on_datagram(5000, got.append)
    async with Node(node_config(net)) as mallory:
        await mallory.connect(node.node_id)
        mallory.send_packet(
            Packet(
                protocol=Protocol.DATAGRAM,
                src=Address(0, d0.node_id),
                dst=node.address,
                dst_port=5000,
                payload=b"i am the daemon",
            )
        )
        await wait_for(
            lambda: node.stats.get("spoofed_source_dropped", 0) >= 1, 10.0, "the spoof drop"
        )
        await mallory.send_datagram(node.node_id, 5000, b"honest")
        await wait_for(lambda: bool(got), 10.0, "the honest datagram")
    assert [(d.src.node, d.payload) for d in got] == [(mallory.node_id, b"honest")]


# -- CLI --------------------------------------------------------------------------------------


async def test_cli_run_lookup_and_ping(net: PilotNet, tmp_path: Path) -> None:
    import json
    import subprocess

    d0 = net.daemons[0]
    base = [
        sys.executable,
        "-m",
        "pilot_node._cli",
        "--registry",
        f"127.0.0.1:{net.registry_port}",
        "--beacon",
        f"127.0.0.1:{net.beacon_port}",
    ]
    identity = tmp_path / "cli-id.json"
    proc = subprocess.Popen(
        [*base, "--identity", str(identity), "run", "--hostname", "cli-node"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30.0)
        started = json.loads(line)
        assert started["fingerprint"] == NodeIdentity.load(identity).fingerprint
        found = await ctl(net, 0, "find", "cli-node")
        assert found["address"] == started["address"]

        other = [*base, "--identity", str(tmp_path / "other-id.json")]
        looked = await asyncio.to_thread(
            subprocess.run,
            [*other, "lookup", "cli-node"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(looked.stdout)["address"] == started["address"]
        pinged = await asyncio.to_thread(
            subprocess.run,
            [*other, "ping", d0.address, "--count", "2"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr
        rtts = [json.loads(row)["rtt_ms"] for row in pinged.stdout.splitlines()]
        assert len(rtts) == 2
        assert all(rtt > 0 for rtt in rtts)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0


# -- beacon relay -----------------------------------------------------------------------------


async def test_key_exchange_and_datagrams_through_the_beacon_relay(tmp_path: Path) -> None:
    with PilotNet(tmp_path / "net", count=1, trust=False) as net:
        await ctl(net, 0, "set-private")
        d0 = net.daemons[0]
        async with Node(node_config(net, public=False)) as n:
            # Neither side may resolve the other: the key exchange goes through the beacon.
            with pytest.raises(RegistryRefusedError):
                await n.registry.resolve(d0.node_id)
            await n.connect(d0.node_id, timeout=10.0)
            assert n.stats.get("tunnels_established") == 1
            assert n.peer_info(d0.node_id)["via_relay"] is True
            # (The private daemon refuses datagrams from an untrusted node; ours does not.)
            got: list[Datagram] = []
            n.on_datagram(5000, got.append)
            raw = DaemonDatagrams(d0.socket)
            try:
                raw.send_to(n.address, 5000, b"relayed")
                await wait_for(lambda: bool(got), 10.0, "the relayed datagram")
                assert got[0].payload == b"relayed"
                assert got[0].src == Address(0, d0.node_id)
            finally:
                raw.close()


async def test_a_replayed_key_exchange_from_before_a_restart_is_dropped(
    net: PilotNet, tmp_path: Path
) -> None:
    async with Node(node_config(net)) as alice:
        got: list[Datagram] = []
        alice.on_datagram(5000, got.append)
        config = node_config(net, identity_path=tmp_path / "bob.json")
        async with Node(config) as bob:
            await bob.send_datagram(alice.node_id, 5000, b"first")
            await wait_for(lambda: len(got) == 1, 10.0, "bob's first datagram")
            old_announcement = build_auth_frame(bob.identity, bob.node_id, bob._kx.public)  # pyright: ignore[reportPrivateUsage]
        async with Node(config) as bob_again:
            assert bob_again.node_id == bob.node_id
            await bob_again.send_datagram(alice.node_id, 5000, b"second")
            await wait_for(lambda: len(got) == 2, 10.0, "the restarted bob's datagram")
            assert alice.stats.get("peer_rekeyed") == 1
            # Someone replays bob's announcement from before the restart.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(old_announcement, alice.endpoint)
            await wait_for(
                lambda: alice.stats.get("handshakes_replayed_dropped", 0) >= 1,
                10.0,
                "the replay to be dropped",
            )
            await bob_again.send_datagram(alice.node_id, 5000, b"third")
            await wait_for(lambda: len(got) == 3, 10.0, "a datagram after the replay")
            assert [d.payload for d in got] == [b"first", b"second", b"third"]
            assert alice.stats.get("peer_rekeyed") == 1


async def test_require_trust_drops_strangers_and_the_trust_file_survives_a_restart(
    net: PilotNet, tmp_path: Path
) -> None:
    d0 = net.daemons[0]
    config = node_config(
        net,
        require_trust=True,
        trust_path=tmp_path / "trust.json",
        identity_path=tmp_path / "id.json",
    )
    raw = DaemonDatagrams(d0.socket)
    try:
        async with Node(config) as n:
            got: list[Datagram] = []
            n.on_datagram(5000, got.append)
            await n.connect(d0.node_id)
            raw.send_to(n.address, 5000, b"stranger")
            await wait_for(
                lambda: n.stats.get("untrusted_dropped", 0) >= 1, 10.0, "the stranger's drop"
            )
            assert got == []
            await n.trust(d0.node_id, "please")
            await wait_for_pending(net, 0, n.node_id)
            await ctl(net, 0, "approve", str(n.node_id))
            await wait_for(lambda: d0.node_id in n.trusted, 30.0, "the approval")
            raw.send_to(n.address, 5000, b"friend")
            await wait_for(lambda: bool(got), 10.0, "the trusted datagram")
            assert [d.payload for d in got] == [b"friend"]
        assert (tmp_path / "trust.json").stat().st_mode & 0o077 == 0
        async with Node(config) as again:
            assert d0.node_id in again.trusted
            got2: list[Datagram] = []
            again.on_datagram(5000, got2.append)
            await again.connect(d0.node_id)
            deadline = time.monotonic() + 10.0
            while not got2 and time.monotonic() < deadline:
                raw.send_to(again.address, 5000, b"still a friend")
                await asyncio.sleep(0.2)
            assert got2
            assert got2[0].payload == b"still a friend"
    finally:
        raw.close()


async def test_trust_requests_to_unknown_nodes_fail_typed_and_repeats_are_fine(
    net: PilotNet, node: Node
) -> None:
    with pytest.raises(RegistryRefusedError, match="not found"):
        await node.trust(424242, "nobody")
    d0 = net.daemons[0]
    assert await node.trust(d0.node_id, "once") is False
    assert await node.trust(d0.node_id, "twice") is False  # still pending: not an error


async def test_pilotctl_ping_reaches_our_node(net: PilotNet, node: Node) -> None:
    # The daemon dials us: its key exchange, our answer, then its echo probe.
    reply = await ctl(net, 0, "ping", str(node.address), "--count", "2")
    results = reply["results"]
    assert len(results) == 2
    assert all(r["rtt_ms"] > 0 for r in results)
