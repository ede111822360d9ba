"""Issue 11 finding 3 against a real ``pilot-worker`` process: a trusted peer that sends
CALLs split into pieces and never finishes them cannot pin the worker's memory.

* A peer the handler ACL refuses (``--default-policy closed``) gets PERMISSION_DENIED on
  each call's first piece; the hundreds of MiB it keeps sending are dropped unread.
* A peer the ACL allows is held to pilot-rpc's unfinished-message budgets (128 MiB per
  worker by default) and its calls fail with UNFINISHED_MESSAGE_IDLE once idle for
  ``unfinished_message_timeout`` (30 s by default), which frees their pieces.

Meanwhile an allowed client's calls keep working. The worker's RSS is read with psutil;
the bounds asserted are the ones the pilot-worker README documents. Each test starts
its own worker on ``tcp://127.0.0.1:0`` and ends only that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pilot_rpc import RpcClient
from pilot_transport import Transport, open_transport
from pilot_transport.testing import TestPeers, create_test_peers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _raw_rpc_peer import SERVER_FRAME, MiB, RawPeer
from pilot_worker.testing import WorkerProcess, run_worker_process

PORT = 5000
TIMEOUT = 120.0

pytestmark = pytest.mark.timeout(300)

HANDLERS = """
from pilot_worker import pilot_handler


@pilot_handler("echo", allow={allow!r})
def echo(payload):
    return payload
"""

PERMISSION_DENIED = 7
DEADLINE_EXCEEDED = 4
RESOURCE_EXHAUSTED = 8


@pytest.fixture
def peers(tmp_path: Path) -> TestPeers:
    return create_test_peers(tmp_path / "peers", ["client", "worker", "attacker"])


@contextlib.asynccontextmanager
async def worker(
    tmp_path: Path, peers: TestPeers, allow: list[str]
) -> AsyncIterator[WorkerProcess]:
    handlers = tmp_path / "partial_handlers.py"
    handlers.write_text(textwrap.dedent(HANDLERS.format(allow=allow)))
    args = [
        "--transport",
        "tcp://127.0.0.1:0",
        "--identity",
        str(peers["worker"].identity_path),
        "--trust",
        str(peers["worker"].trust_path),
        "--handlers",
        str(handlers),
        "--default-policy",
        "closed",
        "--metrics-port",
        "0",
        "--no-call-log",
    ]
    async with run_worker_process(args, ready_file=tmp_path / "ready.json") as proc:
        peers.set_endpoint("worker", proc.info["endpoint"])
        yield proc


@contextlib.asynccontextmanager
async def transport_of(peers: TestPeers, name: str) -> AsyncIterator[Transport]:
    peer = peers[name]
    async with open_transport(
        "tcp://127.0.0.1:0", identity=peer.identity, trust=peer.trust
    ) as transport:
        yield transport


async def echo(client: RpcClient, payload: Any) -> Any:
    return await client.call("worker", PORT, "echo", payload, timeout=60)


async def attack(raws: list[RawPeer], calls: int, pieces: int, fill: bytes) -> None:
    """``calls`` split 64 MiB echo calls per connection, each sent ``pieces`` more
    frames and never finished."""
    piece = fill * SERVER_FRAME
    for raw in raws:
        for n in range(calls):
            call_id = 2 * n + 1
            await raw.start_split_call(call_id, "echo", 64 * MiB)
            for _ in range(pieces):
                await raw.send(0x0D, call_id, piece, 0x01)  # CONTINUATION, MORE


async def test_a_peer_outside_the_acl_cannot_pin_worker_memory(
    tmp_path: Path, peers: TestPeers
) -> None:
    """8 split calls of 32 MiB each (256 MiB sent) by a trusted peer the ACL refuses:
    PERMISSION_DENIED on every first piece, worker RSS grows < 32 MiB."""
    async with (
        worker(tmp_path, peers, [peers["client"].node_id]) as proc,
        transport_of(peers, "attacker") as attacker,
        transport_of(peers, "client") as client_t,
        RpcClient(client_t) as client,
    ):
        assert await echo(client, "warm") == "warm"
        process = psutil.Process(proc.pid)
        rss_before = process.memory_info().rss
        raw = await RawPeer.open(attacker, "worker", PORT)
        try:
            await attack([raw], calls=8, pieces=127, fill=b"r")
            await raw.ping_pong()
            errors = raw.errors()
            assert sorted(errors) == [1, 3, 5, 7, 9, 11, 13, 15]
            assert {e[0] for e in errors.values()} == {PERMISSION_DENIED}
            growth = process.memory_info().rss - rss_before
            print(
                f"worker, refused split calls (256 MiB sent): RSS {rss_before / MiB:.0f}"
                f" -> {(rss_before + growth) / MiB:.0f} MiB"
            )
            assert growth < 32 * MiB, f"worker RSS grew by {growth / MiB:.0f} MiB"
            # The allowed client is served meanwhile, small and large calls alike.
            assert await echo(client, "still here") == "still here"
            payload = os.urandom(8 * MiB)
            assert await echo(client, payload) == payload
        finally:
            await raw.aclose()


async def test_an_allowed_peer_is_held_to_the_unfinished_budget(
    tmp_path: Path, peers: TestPeers
) -> None:
    """8 connections x 8 split calls of 4 MiB each (256 MiB sent, 4 GiB announced) by a
    peer the ACL allows: at most the 128 MiB per-worker budget is held (RSS growth
    < 200 MiB), the rest is refused with RESOURCE_EXHAUSTED, and the idle deadline
    (30 s by default) fails the held calls with UNFINISHED_MESSAGE_IDLE."""
    allow = [peers["client"].node_id, peers["attacker"].node_id]
    async with (
        worker(tmp_path, peers, allow) as proc,
        transport_of(peers, "attacker") as attacker,
        transport_of(peers, "client") as client_t,
        RpcClient(client_t) as client,
    ):
        assert await echo(client, "warm") == "warm"
        process = psutil.Process(proc.pid)
        rss_before = process.memory_info().rss
        raws = [await RawPeer.open(attacker, "worker", PORT) for _ in range(8)]
        try:
            await attack(raws, calls=8, pieces=15, fill=b"u")
            for raw in raws:
                await raw.ping_pong()
            rss_attacked = process.memory_info().rss
            failed = [e for raw in raws for e in raw.errors().values()]
            refused = [e for e in failed if e[0] == RESOURCE_EXHAUSTED]
            assert refused, "no call was refused: the budget did not hold"
            assert {e[3][0] for e in refused} <= {
                "UNFINISHED_BYTES_PER_SERVER",
                "UNFINISHED_BYTES_PER_CONNECTION",
            }
            assert all(e[0] in (DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) for e in failed)
            growth = rss_attacked - rss_before
            print(
                f"worker, allowed unfinished calls (256 MiB sent): RSS {rss_before / MiB:.0f}"
                f" -> {rss_attacked / MiB:.0f} MiB"
            )
            assert growth < 200 * MiB, f"worker RSS grew by {growth / MiB:.0f} MiB"
            assert await echo(client, "still here") == "still here"
            # The idle deadline fails every held call and frees its pieces.
            async with asyncio.timeout(TIMEOUT):
                for raw in raws:
                    while len(raw.errors()) < 8:
                        await raw.read_some()
            idle = [e for raw in raws for e in raw.errors().values() if e[0] == DEADLINE_EXCEEDED]
            assert idle
            assert {e[3][0] for e in idle} == {"UNFINISHED_MESSAGE_IDLE"}
            # With the budget free again, a large call fits.
            payload = os.urandom(48 * MiB)
            assert await echo(client, payload) == payload
        finally:
            for raw in raws:
                await raw.aclose()
