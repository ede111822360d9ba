"""Durability and the wire: kill -9 of the store worker loses no acknowledged write.

Real processes only: the store worker is ``pilot-worker --plugin
checkpoint-sqlite`` started with ``sys.executable``; the test kills exactly
the PID it started.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from pilot_checkpoint_sqlite import PilotCheckpointSaver, SaverOptions
from pilot_checkpoint_sqlite.errors import CheckpointAccessDenied, StoreUnavailableError
from pilot_checkpoint_sqlite.testing import StoreWorker, start_store_worker
from pilot_rpc import RetryPolicy
from pilot_transport.testing import TestPeers, create_test_peers

WAIT = 60.0


def _config(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


def _checkpoint(values: dict[str, Any]) -> Checkpoint:
    cp = empty_checkpoint()
    cp["channel_values"] = dict(values)
    cp["channel_versions"] = {k: 1 for k in values}
    return cp


@pytest.fixture
def peers(tmp_path: Path) -> TestPeers:
    return create_test_peers(tmp_path / "peers", ["graph", "store", "intruder"])


def _start(peers: TestPeers, tmp_path: Path, db: Path, *extra: str) -> StoreWorker:
    worker = start_store_worker(
        identity=peers["store"].identity_path,
        trust=peers["store"].trust_path,
        db_url=f"sqlite:///{db}",
        extra_args=extra,
        log_dir=tmp_path,
    )
    peers.set_endpoint("store", worker.endpoint)
    return worker


def _saver(peers: TestPeers, name: str, port: int, **kw: Any) -> PilotCheckpointSaver:
    return PilotCheckpointSaver(
        peer="store",
        port=port,
        transport="tcp://127.0.0.1:0",
        identity=peers[name].identity_path,
        trust=peers[name].trust_path,
        **kw,
    )


@pytest.fixture
def workers() -> Iterator[list[StoreWorker]]:
    started: list[StoreWorker] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.kill()


async def test_kill_9_after_acknowledged_writes_loses_nothing(
    peers: TestPeers, tmp_path: Path, workers: list[StoreWorker]
) -> None:
    db = tmp_path / "durable.db"
    worker = _start(peers, tmp_path, db)
    workers.append(worker)
    saver = _saver(
        peers, "graph", worker.port, options=SaverOptions(retry=RetryPolicy(max_attempts=1))
    )
    acknowledged: dict[str, RunnableConfig] = {}
    writes_acknowledged: set[str] = set()
    stop = asyncio.Event()

    async def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            thread = f"w{n}-{i}"
            try:
                config = await saver.aput(
                    _config(thread),
                    _checkpoint({"n": n, "i": i, "pad": "p" * 512}),
                    {"source": "loop", "step": i},
                    {"n": 1, "i": 1, "pad": 1},
                )
                acknowledged[thread] = config
                await saver.aput_writes(config, [("out", {"n": n, "i": i}), ("more", i)], "task")
                writes_acknowledged.add(thread)
            except StoreUnavailableError:
                return
            i += 1

    tasks = [asyncio.create_task(writer(n)) for n in range(16)]
    async with asyncio.timeout(WAIT):
        while len(writes_acknowledged) < 200:
            await asyncio.sleep(0.01)
    # SIGKILL while 16 writers are still in flight: no drain, no flush.
    worker.kill()
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    await saver.aclose()

    restarted = _start(peers, tmp_path, db)
    workers.append(restarted)
    reader = _saver(peers, "graph", restarted.port)
    try:
        for thread, config in acknowledged.items():
            tup = await reader.aget_tuple(config)
            assert tup is not None, f"acknowledged checkpoint of {thread} lost"
            n, i = (int(x) for x in thread[1:].split("-"))
            assert tup.checkpoint["channel_values"] == {"n": n, "i": i, "pad": "p" * 512}
            if thread in writes_acknowledged:
                assert tup.pending_writes == [
                    ("task", "out", {"n": n, "i": i}),
                    ("task", "more", i),
                ]
    finally:
        await reader.aclose()
    assert len(acknowledged) >= 200


async def test_a_saver_rides_out_a_store_restart(
    peers: TestPeers, tmp_path: Path, workers: list[StoreWorker]
) -> None:
    db = tmp_path / "restart.db"
    worker = _start(peers, tmp_path, db)
    workers.append(worker)
    saver = _saver(
        peers,
        "graph",
        worker.port,
        options=SaverOptions(
            retry=RetryPolicy(max_attempts=40, initial_backoff=0.05, max_backoff=0.5)
        ),
    )
    try:
        first = await saver.aput(_config("t"), _checkpoint({"a": 1}), {"step": 0}, {"a": 1})
        worker.kill()

        async def restart() -> None:
            # The store is down until the new process is ready (about a second).
            workers.append(await asyncio.to_thread(_start, peers, tmp_path, db))

        restarting = asyncio.create_task(restart())
        # Retries (same idempotency key) carry the put across the outage.
        second = await asyncio.wait_for(
            saver.aput(first, _checkpoint({"a": 2}), {"step": 1}, {"a": 2}), WAIT
        )
        await restarting
        listed = [t.config async for t in saver.alist(_config("t"))]
        assert listed == [second, first]
    finally:
        await saver.aclose()


async def test_large_checkpoint_over_the_wire(
    peers: TestPeers, tmp_path: Path, workers: list[StoreWorker]
) -> None:
    worker = _start(peers, tmp_path, tmp_path / "large.db")
    workers.append(worker)
    saver = _saver(peers, "graph", worker.port)
    try:
        big = bytes(range(256)) * (10 * 1024 * 1024 // 256)
        config = await saver.aput(
            _config("big"), _checkpoint({"state": big}), {"source": "loop", "step": 0}, {"state": 1}
        )
        await saver.aput_writes(config, [("state", big[: 1024 * 1024])], "task")
        tup = await saver.aget_tuple(config)
        assert tup is not None
        assert tup.checkpoint["channel_values"]["state"] == big
        assert tup.pending_writes == [("task", "state", big[: 1024 * 1024])]
    finally:
        await saver.aclose()


async def test_two_identities_cannot_touch_each_others_threads(
    peers: TestPeers, tmp_path: Path, workers: list[StoreWorker]
) -> None:
    worker = _start(peers, tmp_path, tmp_path / "scoped.db")
    workers.append(worker)
    owner = _saver(peers, "graph", worker.port)
    intruder = _saver(peers, "intruder", worker.port)
    try:
        run = str(uuid.uuid4())
        config = await owner.aput(
            _config("secret"), _checkpoint({"k": "v"}), {"step": 0, "run_id": run}, {"k": 1}
        )
        await owner.aput_writes(config, [("k", "w")], "task")
        assert await intruder.aget_tuple(_config("secret")) is None
        assert await intruder.aget_tuple(config) is None
        assert [t async for t in intruder.alist(None)] == []
        assert [t async for t in intruder.alist(_config("secret"))] == []
        await intruder.acopy_thread("secret", "loot")
        assert [t async for t in intruder.alist(_config("loot"))] == []
        await intruder.adelete_thread("secret")
        await intruder.aprune(["secret"], strategy="delete")
        await intruder.adelete_for_runs([run])
        tup = await owner.aget_tuple(_config("secret"))
        assert tup is not None
        assert tup.checkpoint["channel_values"] == {"k": "v"}
        assert tup.pending_writes == [("task", "k", "w")]
        assert [t.config async for t in owner.alist(None)] == [config]
    finally:
        await owner.aclose()
        await intruder.aclose()


async def test_a_shared_store_is_visible_to_every_trusted_caller(
    peers: TestPeers, tmp_path: Path, workers: list[StoreWorker]
) -> None:
    worker = _start(peers, tmp_path, tmp_path / "shared.db", "--checkpoint-shared", "true")
    workers.append(worker)
    first = _saver(peers, "graph", worker.port)
    second = _saver(peers, "intruder", worker.port)
    try:
        config = await first.aput(_config("team"), _checkpoint({"k": 1}), {}, {"k": 1})
        tup = await second.aget_tuple(_config("team"))
        assert tup is not None
        assert tup.config == config
    finally:
        await first.aclose()
        await second.aclose()


async def test_an_untrusted_caller_is_refused(tmp_path: Path, workers: list[StoreWorker]) -> None:
    peers = create_test_peers(tmp_path / "peers", ["graph", "store"])
    stranger = create_test_peers(tmp_path / "stranger", ["outsider", "store"])
    worker = _start(peers, tmp_path, tmp_path / "closed.db")
    workers.append(worker)
    stranger.set_endpoint("store", worker.endpoint)
    # The stranger trusts a different "store" key and the worker does not know it.
    saver = PilotCheckpointSaver(
        peer="store",
        port=worker.port,
        transport="tcp://127.0.0.1:0",
        identity=stranger["outsider"].identity_path,
        trust=stranger["outsider"].trust_path,
        options=SaverOptions(retry=RetryPolicy(max_attempts=1), connect_timeout=5, timeout=10),
    )
    try:
        with pytest.raises((CheckpointAccessDenied, StoreUnavailableError)):
            await saver.aget_tuple(_config("t"))
    finally:
        await saver.aclose()
