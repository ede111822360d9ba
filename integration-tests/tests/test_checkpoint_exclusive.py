"""Per-thread run exclusion across real processes (``exclusive_runs``, leases in the store).

A shared store worker (``--checkpoint-shared true``; SQLite, and PostgreSQL
when ``PILOT_TEST_POSTGRES_URL`` is set) and two graph processes
with separate identities, each doing 10 runs on one thread over ``tcp://``.
Without exclusion concurrent runs read the same checkpoint and some updates
are lost; with ``reject`` every accepted run's update is kept and the others
are refused clearly; with ``enqueue`` all 20 are kept. A holder killed with
SIGKILL leaves a lease that expires, and the next run then proceeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pilot_checkpoint_sqlite import PilotCheckpointSaver
from pilot_checkpoint_sqlite.testing import (
    StoreWorker,
    scratch_postgres_schema,
    start_store_worker,
)
from pilot_transport.testing import TestPeers, create_test_peers

APP = Path(__file__).with_name("_checkpoint_exclusive_app.py")
WAIT = 180.0
POSTGRES_ENV = "PILOT_TEST_POSTGRES_URL"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_kind" in metafunc.fixturenames:
        params = [pytest.param("sqlite", id="sqlite")]
        if os.environ.get(POSTGRES_ENV):
            params.append(pytest.param("postgres", id="postgres", marks=pytest.mark.postgres))
        metafunc.parametrize("db_kind", params)


@pytest.fixture
def db_url(db_kind: str, tmp_path: Path) -> Iterator[str]:
    if db_kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    with scratch_postgres_schema(os.environ[POSTGRES_ENV], prefix="ex") as url:
        yield url


@pytest.fixture
def peers(tmp_path: Path) -> TestPeers:
    return create_test_peers(tmp_path / "peers", ["p1", "p2", "check", "store"])


@pytest.fixture
def store(peers: TestPeers, tmp_path: Path, db_url: str) -> Iterator[StoreWorker]:
    worker = start_store_worker(
        identity=peers["store"].identity_path,
        trust=peers["store"].trust_path,
        db_url=db_url,
        extra_args=["--checkpoint-shared", "true"],
        log_dir=tmp_path,
    )
    try:
        peers.set_endpoint("store", worker.endpoint)
        yield worker
    finally:
        worker.stop()


def _start(peers: TestPeers, store: StoreWorker, who: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(APP),
            "--peer",
            "store",
            "--port",
            str(store.port),
            "--identity",
            str(peers[who].identity_path),
            "--trust",
            str(peers[who].trust_path),
            "--name",
            who,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=WAIT)
    assert process.returncode == 0, out + err
    return json.loads(out.strip().splitlines()[-1])


def _saver(peers: TestPeers, store: StoreWorker) -> PilotCheckpointSaver:
    return PilotCheckpointSaver(
        peer="store",
        port=store.port,
        transport="tcp://127.0.0.1:0",
        identity=peers["check"].identity_path,
        trust=peers["check"].trust_path,
    )


def _log(peers: TestPeers, store: StoreWorker, thread: str) -> list[str]:
    with _saver(peers, store) as saver:
        tup = saver.get_tuple({"configurable": {"thread_id": thread}})
    assert tup is not None
    return list(tup.checkpoint["channel_values"]["log"])


def _wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)  # the other process creates the file; nothing to be told by


def test_reject_keeps_every_accepted_run_and_refuses_the_rest_clearly(
    peers: TestPeers, store: StoreWorker, tmp_path: Path
) -> None:
    in_run, rejected_once = tmp_path / "p1-in-run", tmp_path / "p2-rejected"
    common = ("--thread", "t", "--strategy", "reject", "--runs", "10")
    # p1's first run holds the thread until p2 has been refused once, so the
    # overlap is certain; after that both loop freely (sync API in p1, async in p2).
    first = _start(
        peers, store, "p1", *common, "--in-run", str(in_run), "--hold-until", str(rejected_once)
    )
    second = _start(
        peers,
        store,
        "p2",
        *common,
        "--async",
        "--wait-for",
        str(in_run),
        "--touch-on-reject",
        str(rejected_once),
    )
    a, b = _result(first), _result(second)
    accepted = a["accepted"] + b["accepted"]
    rejected = a["rejected"] + b["rejected"]
    assert len(accepted) + len(rejected) == 20
    assert "p1-0" in accepted
    assert len(b["rejected"]) >= 1
    for refusal in rejected:
        assert refusal["kind"] == "ThreadBusyError"
        assert "thread 't' is busy" in refusal["message"]
        assert "multitask_strategy='reject'" in refusal["message"]
    # Every accepted run's update is in the thread, once; nothing else is.
    log = _log(peers, store, "t")
    assert sorted(log) == sorted(accepted)


def test_enqueue_keeps_all_twenty_runs(
    peers: TestPeers, store: StoreWorker, tmp_path: Path
) -> None:
    in_run, waiting = tmp_path / "p1-in-run", tmp_path / "p2-waiting"
    common = ("--thread", "q", "--strategy", "enqueue", "--runs", "10")
    first = _start(
        peers,
        store,
        "p1",
        *common,
        "--async",
        "--in-run",
        str(in_run),
        "--hold-until",
        str(waiting),
    )
    second = _start(
        peers,
        store,
        "p2",
        *common,
        "--wait-for",
        str(in_run),
        "--touch-before-first",
        str(waiting),
    )
    a, b = _result(first), _result(second)
    assert a["rejected"] == []
    assert b["rejected"] == []
    assert len(a["accepted"]) == len(b["accepted"]) == 10
    log = _log(peers, store, "q")
    assert sorted(log) == sorted(a["accepted"] + b["accepted"])
    assert len(log) == 20


def test_a_killed_holders_lease_expires_and_the_next_run_proceeds(
    peers: TestPeers, store: StoreWorker, tmp_path: Path
) -> None:
    in_run = tmp_path / "p1-in-run"
    holder = _start(
        peers,
        store,
        "p1",
        "--thread",
        "k",
        "--runs",
        "1",
        "--ttl",
        "10",
        "--in-run",
        str(in_run),
        "--hold-until",
        str(tmp_path / "never"),
    )
    try:
        _wait_for(in_run, holder)
    finally:
        holder.kill()  # SIGKILL: no release, no cleanup
        holder.communicate(timeout=WAIT)
    # The dead process still holds the thread (until its lease runs out)...
    with _saver(peers, store) as saver:
        lease = saver.acquire_thread_lease("k", "probe", 10)
    assert not lease.granted
    assert f":{holder.pid}:" in lease.holder
    # ...and a run that queues for it gets it once the lease expires.
    follower = _start(
        peers,
        store,
        "p2",
        "--thread",
        "k",
        "--runs",
        "1",
        "--strategy",
        "enqueue",
        "--enqueue-timeout",
        "120",
    )
    result = _result(follower)
    assert result["accepted"] == ["p2-0"]
    assert result["rejected"] == []
    assert _log(peers, store, "k") == ["p2-0"]
