"""A graph whose process dies resumes from the remote store in a new process.

Real processes: the store worker; a graph process killed (SIGKILL) inside a
node; a fresh process that resumes the thread from the store and stops on
``interrupt()``; a third that answers with ``Command(resume=...)``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pilot_checkpoint_sqlite.testing import StoreWorker, start_store_worker
from pilot_transport.testing import TestPeers, create_test_peers

APP = Path(__file__).with_name("_checkpoint_graph_app.py")


@pytest.fixture
def peers(tmp_path: Path) -> TestPeers:
    return create_test_peers(tmp_path / "peers", ["graph", "store"])


@pytest.fixture
def store(peers: TestPeers, tmp_path: Path) -> Iterator[StoreWorker]:
    worker = start_store_worker(
        identity=peers["store"].identity_path,
        trust=peers["store"].trust_path,
        db_url=f"sqlite:///{tmp_path / 'graph-state.db'}",
        log_dir=tmp_path,
    )
    try:
        peers.set_endpoint("store", worker.endpoint)
        yield worker
    finally:
        worker.stop()


def _app(
    peers: TestPeers, store: StoreWorker, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(APP),
            *args,
            "--peer",
            "store",
            "--port",
            str(store.port),
            "--identity",
            str(peers["graph"].identity_path),
            "--trust",
            str(peers["graph"].trust_path),
            "--marker",
            str(tmp_path / "killed.marker"),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _result(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_graph_killed_mid_run_resumes_in_new_processes(
    peers: TestPeers, store: StoreWorker, tmp_path: Path
) -> None:
    # 1. The graph process dies (SIGKILL) inside the second node.
    killed = _app(peers, store, tmp_path, "start", "--thread", "t")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert (tmp_path / "killed.marker").exists()

    # 2. A new process (async API) resumes after "first", which is not run
    #    again, and stops on the interrupt in "second".
    paused = _result(_app(peers, store, tmp_path, "resume", "--thread", "t"))
    assert paused["visits"] == ["first"]
    assert paused["interrupts"] == [{"question": "go on?"}]

    # 3. A third process (sync API, LangGraph's worker threads) answers the
    #    interrupt with Command(resume=...) and finishes the run.
    done = _result(
        _app(peers, store, tmp_path, "resume", "--thread", "t", "--answer", "yes", "--sync")
    )
    assert done["visits"] == ["first", "second", "third"]
    assert done["answer"] == "yes"
    assert done["messages"] == [
        {"type": "human", "content": "hello"},
        {"type": "ai", "content": "first done"},
        {"type": "ai", "content": "all done"},
    ]
