"""A store tier: two store workers on one PostgreSQL database behind one saver.

Real processes only: two ``pilot-worker --plugin checkpoint-sqlite`` processes
on the same PostgreSQL schema, and a graph process
(``_checkpoint_tier_app.py``) running ``PilotCheckpointSaver(peer=[a, b])``
over several threads of a many-step graph. The test kills (SIGKILL, by the PID
it started) the store worker the graph is using while the graph runs; the
graph must finish on the other worker, and the database must hold exactly the
checkpoints and writes the graph process saw acknowledged: none lost, none
extra. Needs ``PILOT_TEST_POSTGRES_URL`` (``scripts/_postgres.sh`` in CI).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pilot_checkpoint_sqlite.testing import (
    StoreWorker,
    scratch_postgres_schema,
    start_store_worker,
)
from pilot_transport.testing import TestPeers, create_test_peers
from sqlalchemy import create_engine, text

APP = Path(__file__).with_name("_checkpoint_tier_app.py")
WAIT = 240.0
POSTGRES_ENV = "PILOT_TEST_POSTGRES_URL"
THREADS = 4
STEPS = 120

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not os.environ.get(POSTGRES_ENV), reason=f"needs ${POSTGRES_ENV}"),
]


@pytest.fixture
def db_url() -> Iterator[str]:
    with scratch_postgres_schema(os.environ[POSTGRES_ENV], prefix="tier") as url:
        yield url


@pytest.fixture
def peers(tmp_path: Path) -> TestPeers:
    return create_test_peers(tmp_path / "peers", ["graph", "store-a", "store-b"])


@pytest.fixture
def tier(peers: TestPeers, tmp_path: Path, db_url: str) -> Iterator[dict[str, StoreWorker]]:
    started: dict[str, StoreWorker] = {}
    try:
        for name in ("store-a", "store-b"):
            worker = start_store_worker(
                identity=peers[name].identity_path,
                trust=peers[name].trust_path,
                db_url=db_url,
                log_dir=tmp_path,
            )
            started[name] = worker
            peers.set_endpoint(name, worker.endpoint)
        yield started
    finally:
        for worker in started.values():
            worker.kill()


class _Lines:
    """The graph process's stdout, line by line, read on a thread into a bounded queue."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.records: list[dict[str, Any]] = []
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=100_000)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def until(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not done(self.records):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for {what}"
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"the graph process ended before {what}")
            self.records.append(json.loads(line))

    def rest(self) -> None:
        while (line := self._queue.get(timeout=WAIT)) is not None:
            self.records.append(json.loads(line))


def _acks(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("ack") == kind]


def test_kill_9_of_the_store_worker_in_use_loses_and_duplicates_nothing(
    peers: TestPeers, tier: dict[str, StoreWorker], db_url: str, tmp_path: Path
) -> None:
    port = tier["store-a"].port
    assert tier["store-b"].port == port
    err_path = tmp_path / "graph.err"
    with err_path.open("w") as err:
        process = subprocess.Popen(
            [
                sys.executable,
                str(APP),
                "--peer",
                "store-a",
                "--peer",
                "store-b",
                "--port",
                str(port),
                "--identity",
                str(peers["graph"].identity_path),
                "--trust",
                str(peers["graph"].trust_path),
                "--prefix",
                "tier",
                "--threads",
                str(THREADS),
                "--steps",
                str(STEPS),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        lines = _Lines(process)
        # Well into the run (a quarter of the checkpoints), kill the worker in use.
        lines.until(
            lambda rs: len(_acks(rs, "checkpoint")) >= THREADS * STEPS // 4,
            "a quarter of the checkpoints",
        )
        in_use = _acks(lines.records, "checkpoint")[-1]["peer"]
        assert in_use == "store-a", "the first peer of the list is used first"
        killed_at = len(lines.records)
        tier[in_use].kill()
        lines.rest()
        assert process.wait(WAIT) == 0, err_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT)
        assert process.stdout is not None
        process.stdout.close()

    final = lines.records[-1]["final"]
    # Every step ran exactly once, in order, in every thread.
    assert final == {
        f"tier-{i}": {"seen": list(range(STEPS)), "count": STEPS} for i in range(THREADS)
    }
    after = [r for r in lines.records[killed_at:] if "ack" in r]
    assert after, "the graph wrote nothing after the kill"
    assert {r["peer"] for r in after[-10:]} == {"store-b"}, "the tier did not stick to store-b"

    checkpoint_acks = _acks(lines.records, "checkpoint")
    acked = {(r["thread"], r["id"]) for r in checkpoint_acks}
    assert len(acked) == len(checkpoint_acks), "a checkpoint was acknowledged twice"
    write_acks: dict[tuple[str, str, str], int] = {}
    for r in _acks(lines.records, "writes"):
        key = (r["thread"], r["id"], r["task"])
        write_acks[key] = max(write_acks.get(key, 0), r["n"])

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = {
                (row.thread_id, row.checkpoint_id)
                for row in conn.execute(
                    text(
                        "SELECT thread_id, checkpoint_id FROM pilot_checkpoints"
                        " WHERE checkpoint_ns = ''"
                    )
                )
            }
            rows = conn.execute(
                text(
                    "SELECT thread_id, checkpoint_id, task_id, count(*) AS n"
                    " FROM pilot_checkpoint_writes WHERE checkpoint_ns = ''"
                    " GROUP BY thread_id, checkpoint_id, task_id"
                )
            )
            stored_writes = {(r.thread_id, r.checkpoint_id, r.task_id): r.n for r in rows}
    finally:
        engine.dispose()
    # No acknowledged checkpoint lost, and no checkpoint the graph did not see acknowledged.
    assert acked - stored == set(), "acknowledged checkpoints lost"
    assert stored - acked == set(), "checkpoints stored that were never acknowledged"
    assert len(stored) == THREADS * (STEPS + 2)
    assert stored_writes == write_acks
