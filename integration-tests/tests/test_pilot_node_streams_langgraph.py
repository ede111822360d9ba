"""A PilotRemoteRunnable call over ``pilotnode://`` between two processes, no Go daemon.

The worker process and this test each run our pure-Python Pilot node in-process (the
``pilotnode://`` carrier, found through pilot-transport's entry points); the only other
process is our loopback registry/beacon stand-in. TLS 1.3 with pinned keys runs on top.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pilot_node._node import Node, NodeConfig
from pilot_node._packet import Address
from pilot_transport import open_transport
from pilot_transport.testing import create_test_peers
from pilot_worker.testing import WorkerProcess, start_worker_process

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pilot_daemons import PilotNet

pytestmark = pytest.mark.timeout(300)

HANDLERS = str(Path(__file__).with_name("_langgraph_handlers.py"))


@pytest.fixture
def rendezvous(tmp_path: Path) -> Iterator[PilotNet]:
    # The wheel's binaries are not needed: count=0 starts only the registry/beacon.
    with PilotNet(tmp_path / "net", count=0, trust=False) as n:
        yield n


async def _address_of(registry_port: int, hostname: str) -> str:
    async with Node(NodeConfig(registry=f"127.0.0.1:{registry_port}")) as probe:
        return str(Address(0, await probe.resolve_node(hostname)))


async def test_remote_runnable_over_pilotnode_between_two_processes(
    rendezvous: PilotNet, tmp_path: Path
) -> None:
    from pilot_langgraph import PilotRemoteRunnable

    peers = create_test_peers(tmp_path / "keys", ["client", "worker"])
    url = f"pilotnode://127.0.0.1:{rendezvous.registry_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
    env.update({"LG_WORKER": "node-worker", "LG_TEST_DIR": str(tmp_path)})
    worker: WorkerProcess = start_worker_process(
        [
            "--transport",
            f"{url}?hostname=node-worker",
            "--identity",
            str(tmp_path / "keys" / "worker" / "identity.key"),
            "--trust",
            str(tmp_path / "keys" / "worker" / "trust.json"),
            "--port",
            "5000",
            "--handlers",
            HANDLERS,
        ],
        ready_file=tmp_path / "worker.ready",
        module="pilot_langgraph._worker_cli",
        env=env,
        log_file=tmp_path / "worker.log",
        name="node-worker",
        capture=False,
    )
    try:
        await asyncio.to_thread(worker.wait_ready_blocking, 120)
        peers.set_address("worker", await _address_of(rendezvous.registry_port, "node-worker"))
        client = peers["client"]
        async with open_transport(url, identity=client.identity, trust=client.trust_path) as t:
            assert t.carrier == "pilotnode"
            square = PilotRemoteRunnable(node="square", peer="worker", transport=t)
            assert await square.ainvoke({"n": 7}) == {"squares": [49], "workers": ["node-worker"]}
            whoami = PilotRemoteRunnable(node="whoami", peer="worker", transport=t)
            assert await whoami.ainvoke(None) == "node-worker"
    finally:
        await asyncio.to_thread(worker.stop_blocking, 15)
