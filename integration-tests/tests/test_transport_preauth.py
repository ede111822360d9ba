"""A tcp:// listener process under a pre-authentication attack keeps serving real peers.

The listener is a separate process (``_transport_peer.py serve``). This process
plays the attacker, holding hundreds of sockets that never authenticate (idle
ones, and ones that send only the 7-byte port header), then connects as a
trusted client: every connect must succeed, each within a few seconds.
Before the per-source limits and non-blocking acceptance, 260 idle sockets let
0 of 5 connects through and 64 header-only ones delayed the first by 9.7 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pilot_transport import open_transport
from pilot_transport.testing import TestPeers, create_test_peers

PEER_SCRIPT = Path(__file__).with_name("_transport_peer.py")
HEADER = b"PLTP\x01\x00\x01"
CONNECT_BOUND_SECS = 5.0
"""Failure bound per legitimate connect (the old behaviour took 9.7 s or never)."""
LEGITIMATE_CONNECTS = 20


@contextlib.asynccontextmanager
async def listener_process(peers: TestPeers, log: Path) -> AsyncIterator[str]:
    server = peers["server"]
    with open(log, "wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PEER_SCRIPT),
            "serve",
            "--identity",
            str(server.identity_path),
            "--trust",
            str(server.trust_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line, log.read_text()
        endpoint = json.loads(line)["endpoint"]
        peers.set_endpoint("server", endpoint)
        yield endpoint
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _hold(endpoint: str, sources: list[str], count: int) -> list[asyncio.StreamWriter]:
    """Open ``count`` sockets round-robin over ``sources``; every other one sends the header."""
    host, port = endpoint.rsplit(":", 1)
    writers: list[asyncio.StreamWriter] = []
    for index in range(count):
        _, writer = await asyncio.open_connection(
            host, int(port), local_addr=(sources[index % len(sources)], 0)
        )
        if index % 2:
            writer.write(HEADER)
        writers.append(writer)
    return writers


@pytest.mark.parametrize(
    ("sources", "count"),
    [
        pytest.param(["127.0.0.2"], 600, id="one-address"),
        pytest.param([f"127.0.0.{2 + i}" for i in range(60)], 600, id="sixty-addresses"),
    ],
)
async def test_legitimate_connects_get_through_idle_and_header_only_sockets(
    tmp_path: Path, sources: list[str], count: int
) -> None:
    peers = create_test_peers(tmp_path / "peers", ["client", "server"])
    async with listener_process(peers, tmp_path / "listener.log") as endpoint:
        held = await _hold(endpoint, sources, count)
        try:
            client = peers["client"]
            async with open_transport(
                "tcp://127.0.0.1:0", identity=client.identity, trust=client.trust
            ) as transport:
                for _ in range(LEGITIMATE_CONNECTS):
                    stream = await transport.connect("server", 1, timeout=CONNECT_BOUND_SECS)
                    await stream.write(b"ping")
                    assert await asyncio.wait_for(stream.read(), 30) == b"ping"
                    await stream.aclose()
        finally:
            for writer in held:
                writer.close()
