"""Trust revocation between real processes: removing a peer from a worker's trust
file cuts that peer's open connection within about a second, and new ones are refused.

A pilot-worker process serves ``echo``; a client process calls it in a loop over
one connection; the test removes the client from the worker's trust file.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pilot_transport import TrustStore, open_transport
from pilot_transport.errors import RejectedByPeerError
from pilot_transport.testing import create_test_peers
from pilot_worker.testing import run_worker_process

CLIENT_SCRIPT = Path(__file__).with_name("_revocation_client.py")
HANDLERS = """
from pilot_worker import pilot_handler


@pilot_handler("echo")
def echo(payload):
    return payload
"""
REVOCATION_BOUND_SECS = 3.0
"""Failure bound; the transport checks the trust file every 0.25 s and cuts at once."""


async def _event(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    assert line, "the client process exited early"
    return json.loads(line)


async def test_removed_peer_loses_its_open_connection_within_a_second(tmp_path: Path) -> None:
    peers = create_test_peers(tmp_path / "peers", ["client", "worker"])
    handlers = tmp_path / "revocation_handlers.py"
    handlers.write_text(HANDLERS)
    worker_args = [
        "--transport",
        "tcp://127.0.0.1:0",
        "--identity",
        str(peers["worker"].identity_path),
        "--trust",
        str(peers["worker"].trust_path),
        "--handlers",
        str(handlers),
    ]
    async with run_worker_process(
        worker_args, ready_file=tmp_path / "ready.json", cwd=tmp_path
    ) as worker:
        peers.set_endpoint("worker", worker.info["endpoint"])
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CLIENT_SCRIPT),
            "--identity",
            str(peers["client"].identity_path),
            "--trust",
            str(peers["client"].trust_path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert (await _event(client))["event"] == "ready"
            for _ in range(20):  # the loop runs: calls succeed on its connection
                event = await _event(client)
                assert event["event"] == "ok", event
            TrustStore.open(peers["worker"].trust_path).remove("client")
            removed_at = time.monotonic()
            async with asyncio.timeout(30):  # old behaviour: calls kept working for 60 s
                while (event := await _event(client))["event"] == "ok":
                    pass
            latency = event["time"] - removed_at
            assert latency < REVOCATION_BOUND_SECS, f"calls kept working for {latency:.2f}s"
            # Every later call fails too: reconnecting is refused.
            for _ in range(3):
                later = await _event(client)
                assert later["event"] == "error", later
            await worker.wait_for_log("no longer in the trust store")
        finally:
            if client.returncode is None:
                assert client.stdin is not None
                client.stdin.close()
                try:
                    await asyncio.wait_for(client.wait(), 30)
                except TimeoutError:
                    client.kill()
                    await client.wait()
        client_peer = peers["client"]
        async with open_transport(
            "tcp://127.0.0.1:0", identity=client_peer.identity, trust=client_peer.trust
        ) as transport:
            with pytest.raises(RejectedByPeerError):
                await transport.connect("worker", 5000, timeout=30)
    print(f"revocation cut the open connection {latency:.3f}s after the trust file changed")
