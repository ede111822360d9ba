"""PilotRemoteRunnable and PilotCheckpointSaver over ``pilotnode://`` between processes,
no Go daemon.

The worker process and this test each run our pure-Python Pilot node in-process (the
``pilotnode://`` carrier, found through pilot-transport's entry points); the only other
process is our loopback registry/beacon stand-in. TLS 1.3 with pinned keys runs on top.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pilot_checkpoint_sqlite.testing import start_store_worker
from pilot_node import Address, Node, NodeConfig
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


APP = Path(__file__).with_name("_checkpoint_graph_app.py")


def _graph(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    keys = tmp_path / "keys" / "graph"
    return subprocess.run(
        [
            sys.executable,
            str(APP),
            *args,
            "--peer",
            "store",
            "--port",
            "5000",
            "--identity",
            str(keys / "identity.key"),
            "--trust",
            str(keys / "trust.json"),
            "--marker",
            str(tmp_path / "killed.marker"),
            "--transport",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _result(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def test_checkpoint_saver_graph_over_pilotnode_across_processes(
    rendezvous: PilotNet, tmp_path: Path
) -> None:
    peers = create_test_peers(tmp_path / "keys", ["graph", "store"])
    url = f"pilotnode://127.0.0.1:{rendezvous.registry_port}"
    store = await asyncio.to_thread(
        start_store_worker,
        identity=peers["store"].identity_path,
        trust=peers["store"].trust_path,
        db_url=f"sqlite:///{tmp_path / 'graph-state.db'}",
        listen=f"{url}?hostname=node-store",
        log_dir=tmp_path,
        ready_timeout=120.0,
    )
    try:
        peers.set_address("store", await _address_of(rendezvous.registry_port, "node-store"))
        # The graph process dies (SIGKILL) inside its second node...
        killed = await asyncio.to_thread(_graph, tmp_path, url, "start", "--thread", "t")
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        # ...a new process resumes from the store over pilotnode:// and pauses...
        paused = _result(await asyncio.to_thread(_graph, tmp_path, url, "resume", "--thread", "t"))
        assert paused["visits"] == ["first"]
        assert paused["interrupts"] == [{"question": "go on?"}]
        # ...and a third answers the interrupt and finishes the run.
        done = _result(
            await asyncio.to_thread(
                _graph, tmp_path, url, "resume", "--thread", "t", "--answer", "yes"
            )
        )
        assert done["visits"] == ["first", "second", "third"]
        assert done["answer"] == "yes"
    finally:
        await asyncio.to_thread(store.stop)
