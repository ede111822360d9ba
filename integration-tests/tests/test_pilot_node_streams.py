"""Streams of our pure-Python Pilot node against real 1.18.0 Go daemons and between our nodes.

Each test brings its own network (our registry/beacon stand-in and Go daemons from the
``pilotprotocol`` wheel on loopback, ``_pilot_daemons.PilotNet``) and our nodes in this
process. The daemon gates streams on its own trust list, so the daemon asks our node for
trust first (our node auto-approves).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pilot_node import (
    Address,
    Node,
    PilotStream,
    StreamConfig,
    StreamResetError,
    StreamTruncatedError,
    open_stream,
)
from pilot_node.carrier import PilotNodeCarrier, parse_url
from pilot_transport import Identity, TrustedPeer, TrustStore, open_transport
from pilot_transport._carrier import DialTarget
from pilot_transport._carriers.pilot import PilotCarrier
from pilot_transport.testing import check_stream_conformance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pilot_daemons import PilotNet, pilot_binaries
from _pilot_node_fixtures import ctl, node_config, wait_for

pytestmark = [
    pytest.mark.skipif(pilot_binaries() is None, reason="pilotprotocol wheel not installed"),
    pytest.mark.timeout(300),
]


async def daemon_trusts(net: PilotNet, index: int, node: Node, timeout: float = 30.0) -> None:
    """Have daemon ``index`` ask our node for trust (auto-approved) and wait for it."""
    await ctl(net, index, "handshake", str(node.address), "stream tests")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trusted = await ctl(net, index, "trust")
        if any(int(p["node_id"]) == node.node_id for p in trusted.get("trusted") or []):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"daemon {index} never trusted node {node.node_id}")


@pytest.fixture
def net(tmp_path: Path) -> Iterator[PilotNet]:
    with PilotNet(tmp_path / "net", count=1, trust=False) as n:
        yield n


@pytest.fixture
async def node(net: PilotNet) -> AsyncIterator[Node]:
    async with Node(node_config(net, auto_approve=True)) as n:
        await daemon_trusts(net, 0, n)
        yield n


def _pattern(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def _echo_round(stream: PilotStream, data: bytes) -> bytes:
    writer = asyncio.create_task(stream.write(data))
    try:
        return await stream.readexactly(len(data))
    finally:
        await writer


# -- 2: our node dials a daemon's echo; the daemon dials ours ---------------------------------


@pytest.mark.parametrize("size", [1, 4096, 1 << 20, 16 << 20])
async def test_our_node_dials_the_daemons_echo_byte_exact(
    net: PilotNet, node: Node, size: int
) -> None:
    daemon = Address.parse(net.daemons[0].address)
    stream = await open_stream(node, daemon, 7, timeout=30)
    data = _pattern(size)
    async with asyncio.timeout(240):
        echoed = await _echo_round(stream, data)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
    await stream.aclose()
    assert stream.connection.all_acked


async def test_the_daemon_pings_and_benches_our_node(net: PilotNet, node: Node) -> None:
    pinged = await ctl(net, 0, "ping", str(node.address), "--count", "3")
    assert pinged, pinged
    bench = await ctl(net, 0, "bench", str(node.address), "1", "--timeout", "60s")
    assert bench, bench


# -- 4: written then closed arrives whole, both directions -----------------------------------


async def test_four_mib_then_close_arrives_whole_both_ways(net: PilotNet, node: Node) -> None:
    daemon = Address.parse(net.daemons[0].address)
    data = _pattern(4 << 20)
    carrier = PilotCarrier(socket_path=net.daemons[0].socket)
    try:
        listener = await carrier.bind_raw(5000)
        # Ours -> a daemon application: aclose() returns once every byte is acknowledged,
        # and only then sends our FIN (the daemon drops its receive buffer on a FIN).
        stream = await open_stream(node, daemon, 5000, timeout=30)
        accepted = asyncio.create_task(listener.accept())
        await stream.write(data)
        await stream.aclose()
        assert stream.connection.all_acked
        inbound = await asyncio.wait_for(accepted, 30)
        received = bytearray()
        async with asyncio.timeout(120):
            while chunk := await inbound.read(65536):
                received += chunk
        assert bytes(received) == data
        await inbound.aclose()

        # A daemon application -> ours, closing at once after its write (the daemon's
        # close does not wait for acknowledgements): all of it, or a typed truncation.
        layer = node.stream_layer
        assert layer is not None
        ours = layer.listen(5001)  # type: ignore[attr-defined]
        outbound = await carrier.open_raw_stream(str(node.address), 5001)
        mine = await asyncio.wait_for(ours.accept(), 30)
        reading = asyncio.create_task(_read_all(mine))
        await outbound.write(data)
        await outbound.aclose()
        try:
            async with asyncio.timeout(120):
                got = await reading
        except StreamTruncatedError:
            got = None
        if got is not None:
            assert got == data, f"silent loss: {len(got)} of {len(data)} bytes"
        await mine.aclose()
    finally:
        await carrier.aclose()


async def _read_all(stream: PilotStream) -> bytes:
    out = bytearray()
    while chunk := await stream.read(65536):
        out += chunk
    return bytes(out)


# -- 7: dial pacing, and an idle stream --------------------------------------------------------


async def test_fifty_dials_within_ten_seconds_all_succeed(net: PilotNet, node: Node) -> None:
    daemon = Address.parse(net.daemons[0].address)
    started = time.monotonic()

    async def one(i: int) -> bytes:
        stream = await open_stream(node, daemon, 7, timeout=30)
        try:
            return await _echo_round(stream, f"dial {i}".encode())
        finally:
            await stream.aclose()

    results = await asyncio.gather(*(one(i) for i in range(50)))
    elapsed = time.monotonic() - started
    assert results == [f"dial {i}".encode() for i in range(50)]
    assert elapsed < 10.0, f"50 dials took {elapsed:.1f} s"


async def test_an_idle_stream_to_a_killed_daemon_is_reset_by_unanswered_keepalives(
    net: PilotNet,
) -> None:
    interval, probes = 0.5, 3
    streams = StreamConfig(keepalive_interval=interval, keepalive_probes=probes)
    async with Node(node_config(net, auto_approve=True, streams=streams)) as node:
        await daemon_trusts(net, 0, node)
        daemon = Address.parse(net.daemons[0].address)
        stream = await open_stream(node, daemon, 7, timeout=30)
        assert await _echo_round(stream, b"before") == b"before"
        conn = stream.connection
        # Alive: the daemon answers every probe, so many intervals pass without a reset
        # (a probe left unanswered would reset the stream after ``probes`` of them).
        await wait_for(lambda: conn.stats["keepalives"] >= 4 * probes, 60, "keepalive probes")
        assert conn.error is None
        assert await _echo_round(stream, b"still here") == b"still here"

        pending = asyncio.create_task(stream.read())
        await asyncio.sleep(0)
        net.kill(0)  # SIGKILL: the daemon sends nothing more, not even a reset
        killed_at = time.monotonic()
        bound = interval * (probes + 1) + 30.0  # generous: a loaded machine is slow
        with pytest.raises(StreamResetError, match="keepalives"):
            await asyncio.wait_for(pending, bound)
        detected = time.monotonic() - killed_at
        print(f"dead peer detected after {detected:.2f} s (interval {interval} s x {probes})")
        assert conn.error is not None
        with pytest.raises(StreamResetError):
            await stream.write(b"after")


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_five_idle_minutes_keep_the_node_registered_and_its_stream_open(
    tmp_path: Path,
) -> None:
    # One five-minute wait checks both long-lived promises: the registration (the
    # stand-in forgets nodes silent for 30 s, so only heartbeats keep ours listed)
    # and an idle stream (the daemon reaps idle connections after 120 s unless
    # keepalives say otherwise). Only the registry lookups run during the wait;
    # the stream itself stays idle.
    with PilotNet(tmp_path / "net", count=1, trust=False, registry_ttl=30.0) as net:
        config = node_config(net, auto_approve=True, hostname="long-lived", heartbeat_interval=8.0)
        async with Node(config) as node:
            await daemon_trusts(net, 0, node)
            daemon = Address.parse(net.daemons[0].address)
            stream = await open_stream(node, daemon, 7, timeout=30)
            assert await _echo_round(stream, b"before") == b"before"
            deadline = time.monotonic() + 305
            while (left := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(30.0, left))
                found = await ctl(net, 0, "find", "long-lived")
                assert found["node_id"] == node.node_id
            assert await _echo_round(stream, b"after five minutes") == b"after five minutes"
            await stream.aclose()


# -- our nodes between themselves, no Go daemon -------------------------------------------------


@pytest.fixture
def rendezvous(tmp_path: Path) -> Iterator[PilotNet]:
    with PilotNet(tmp_path / "net", count=0, trust=False) as n:
        yield n


async def test_carrier_streams_between_our_nodes_pass_the_conformance_check(
    rendezvous: PilotNet,
) -> None:
    url = f"pilotnode://127.0.0.1:{rendezvous.registry_port}"
    a = PilotNodeCarrier(parse_url(url))
    b = PilotNodeCarrier(parse_url(url))
    try:
        listener = await b.bind(4000)
        b_address = (await b.info())["address"]

        async def make_pair() -> tuple[Any, Any]:
            dialled, accepted = await asyncio.gather(
                a.dial(DialTarget(address=b_address), 4000), listener.accept()
            )
            return dialled, accepted

        await check_stream_conformance(make_pair, large_size=2 << 20, timeout=120)
    finally:
        await a.aclose()
        await b.aclose()


async def test_tls_transport_over_pilotnode_between_our_nodes(
    rendezvous: PilotNet, tmp_path: Path
) -> None:
    url = f"pilotnode://127.0.0.1:{rendezvous.registry_port}"
    server_id, client_id = Identity.generate(), Identity.generate()
    server_trust, client_trust = TrustStore.in_memory(), TrustStore.in_memory()
    async with open_transport(url, identity=server_id, trust=server_trust) as server:
        info = await server.info()
        assert info.carrier == "pilotnode"
        assert info.address is not None
        client_trust.add(TrustedPeer("server", server_id.public_key, address=info.address))
        server_trust.add(TrustedPeer("client", client_id.public_key))
        async with open_transport(url, identity=client_id, trust=client_trust) as client:
            listener = await server.listen(80)
            stream, accepted = await asyncio.gather(client.connect("server", 80), listener.accept())
            async with stream, accepted:
                assert accepted.peer.name == "client"
                payload = _pattern(300_000)
                writer = asyncio.create_task(stream.write(payload))
                got = bytearray()
                while len(got) < len(payload):
                    got += await accepted.read(65536)
                await writer
                assert bytes(got) == payload


async def test_a_stranger_key_is_refused_over_pilotnode(rendezvous: PilotNet) -> None:
    url = f"pilotnode://127.0.0.1:{rendezvous.registry_port}"
    server_id = Identity.generate()
    async with open_transport(url, identity=server_id, trust=TrustStore.in_memory()) as server:
        info = await server.info()
        assert info.address is not None
        client_trust = TrustStore.in_memory()
        client_trust.add(TrustedPeer("server", server_id.public_key, address=info.address))
        async with open_transport(url, identity=Identity.generate(), trust=client_trust) as client:
            listener = await server.listen(81)
            accept = asyncio.create_task(listener.accept())
            with pytest.raises(Exception, match=r"(?i)trust|reject|handshake|reset|closed"):
                await client.connect("server", 81)
            accept.cancel()
