"""The store: idempotency, group commit, read/write independence, scoping, retention, schema."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any, cast

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, Checkpoint, empty_checkpoint
from langgraph.checkpoint.serde.types import ERROR, INTERRUPT
from pilot_checkpoint_sqlite import (
    CheckpointService,
    CheckpointStore,
    LocalStoreBackend,
    PilotCheckpointSaver,
    RetentionPolicy,
    SaverOptions,
    StoreOptions,
    open_store,
)
from pilot_checkpoint_sqlite._schema import SCHEMA_VERSION, migrations_table
from pilot_checkpoint_sqlite._store import WritesRecord
from pilot_checkpoint_sqlite.errors import (
    CheckpointConfigError,
    CheckpointProtocolError,
    CheckpointStoreError,
    CheckpointUsageError,
    StoreClosedError,
    StoreOverloadedError,
    StoreSchemaError,
)
from sqlalchemy import insert, select

WAIT = 30.0


def _config(thread_id: str, checkpoint_id: str | None = None, ns: str = "") -> RunnableConfig:
    configurable: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": ns}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


def _checkpoint(values: dict[str, Any] | None = None) -> Checkpoint:
    cp = empty_checkpoint()
    values = values or {}
    cp["channel_values"] = dict(values)
    cp["channel_versions"] = {k: 1 for k in values}
    return cp


async def _put_chain(
    saver: PilotCheckpointSaver, thread_id: str, n: int, *, run_id: str | None = None
) -> list[RunnableConfig]:
    configs: list[RunnableConfig] = []
    parent: RunnableConfig = _config(thread_id)
    for step in range(n):
        cp = _checkpoint({"step": step})
        cp["channel_versions"] = {"step": step + 1}
        md: dict[str, Any] = {"source": "loop", "step": step}
        if run_id is not None:
            md["run_id"] = run_id
        parent = await saver.aput(parent, cp, md, {"step": step + 1})  # pyright: ignore[reportArgumentType]
        configs.append(parent)
    return configs


class _Gate:
    """Holds the store's writer inside an open write transaction until released."""

    def __init__(self, store: CheckpointStore) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

        def _hold(db: Any) -> None:
            # Inside the writer's open transaction (it holds the write lock).
            db.execute("SELECT 1")
            self.entered.set()
            self.release.wait(WAIT)

        self.future = store._writer.submit(_hold)
        assert self.entered.wait(WAIT), "the writer never picked up the gate"


async def test_put_same_checkpoint_twice_is_a_no_op_re_ack(
    saver: PilotCheckpointSaver, store: CheckpointStore
) -> None:
    thread = str(uuid.uuid4())
    cp = _checkpoint({"a": "first"})
    config = await saver.aput(_config(thread), cp, {"source": "input", "step": -1}, {"a": 1})
    changed = dict(cp)
    changed["channel_values"] = {"a": "second"}
    again = await saver.aput(_config(thread), changed, {"source": "input", "step": -1}, {"a": 1})  # pyright: ignore[reportArgumentType]
    assert again == config
    listed = [t async for t in saver.alist(_config(thread))]
    assert len(listed) == 1
    assert listed[0].checkpoint["channel_values"] == {"a": "first"}


async def test_pending_writes_keep_channel_value_and_order(saver: PilotCheckpointSaver) -> None:
    thread = str(uuid.uuid4())
    config = await saver.aput(_config(thread), _checkpoint(), {"source": "loop", "step": 0}, {})
    writes = [("messages", {"n": 1}), ("branch:to:x", None), ("messages", [1, 2]), ("z", "last")]
    await saver.aput_writes(config, writes, "task-b", "path/1")
    await saver.aput_writes(config, [("early", 0)], "task-a", "path/0")
    # A retry of the same task's writes does not duplicate them.
    await saver.aput_writes(config, writes, "task-b", "path/1")
    tup = await saver.aget_tuple(config)
    assert tup is not None
    assert tup.pending_writes == [
        ("task-a", "early", 0),
        ("task-b", "messages", {"n": 1}),
        ("task-b", "branch:to:x", None),
        ("task-b", "messages", [1, 2]),
        ("task-b", "z", "last"),
    ]


async def test_special_channel_writes_are_replaced(saver: PilotCheckpointSaver) -> None:
    thread = str(uuid.uuid4())
    config = await saver.aput(_config(thread), _checkpoint(), {"source": "loop", "step": 0}, {})
    await saver.aput_writes(config, [(ERROR, "first failure")], "task")
    await saver.aput_writes(config, [(ERROR, "second failure")], "task")
    await saver.aput_writes(config, [(INTERRUPT, {"question": "?"})], "task")
    tup = await saver.aget_tuple(config)
    assert tup is not None
    assert sorted(tup.pending_writes or [], key=lambda w: w[1]) == [
        ("task", ERROR, "second failure"),
        ("task", INTERRUPT, {"question": "?"}),
    ]


async def test_concurrent_writes_are_grouped_into_one_transaction(
    saver: PilotCheckpointSaver, store: CheckpointStore
) -> None:
    before = store.stats
    gate = _Gate(store)
    thread = str(uuid.uuid4())
    puts = [
        asyncio.create_task(
            saver.aput(
                _config(f"{thread}-{i}"),
                _checkpoint({"i": i}),
                {"source": "loop", "step": 0},
                {"i": 1},
            )
        )
        for i in range(64)
    ]

    def _queued() -> int:
        return store._writer._queue.qsize()

    async with asyncio.timeout(WAIT):
        while _queued() < 64:
            await asyncio.sleep(0.005)
    gate.release.set()
    await asyncio.wait_for(asyncio.gather(*puts), WAIT)
    after = store.stats
    assert after["write_requests"] - before["write_requests"] == 65
    # The gate's transaction, then one transaction for the 64 queued puts.
    assert after["write_transactions"] - before["write_transactions"] == 2
    for i in (0, 31, 63):
        tup = await saver.aget_tuple(_config(f"{thread}-{i}"))
        assert tup is not None
        assert tup.checkpoint["channel_values"] == {"i": i}


async def test_a_failing_write_in_a_grouped_batch_fails_alone(
    saver: PilotCheckpointSaver, store: CheckpointStore
) -> None:
    # On PostgreSQL a batch of puts and pending writes is sent as one pipeline;
    # a statement the database refuses must fail only its own request, with a
    # store error, and every other request of the batch must still commit.
    before = store.stats
    gate = _Gate(store)
    thread = str(uuid.uuid4())
    good = [
        asyncio.create_task(
            saver.aput(
                _config(f"{thread}-{i}"),
                _checkpoint({"i": i}),
                {"source": "loop", "step": 0},
                {"i": 1},
            )
        )
        for i in range(3)
    ]
    bad_record = WritesRecord(
        thread_id=thread,
        checkpoint_ns="",
        checkpoint_id="cp",
        task_id="task",
        task_path="",
        writes=[(0, cast(str, None), "json", b"{}")],  # channel is NOT NULL
    )
    bad = asyncio.create_task(store.put_writes("local", bad_record))
    async with asyncio.timeout(WAIT):
        while store._writer._queue.qsize() < 4:
            await asyncio.sleep(0.005)
    gate.release.set()
    await asyncio.wait_for(asyncio.gather(*good), WAIT)
    with pytest.raises(CheckpointStoreError):
        await asyncio.wait_for(bad, WAIT)
    after = store.stats
    assert after["write_requests"] - before["write_requests"] == 5
    for i in range(3):
        tup = await saver.aget_tuple(_config(f"{thread}-{i}"))
        assert tup is not None
        assert tup.checkpoint["channel_values"] == {"i": i}
    # The writer is healthy after the failure: the next write commits.
    config = await saver.aput(
        _config(thread), _checkpoint({"k": 1}), {"source": "loop", "step": 0}, {"k": 1}
    )
    await saver.aput_writes(config, [("k", 2)], "task")
    tup = await saver.aget_tuple(config)
    assert tup is not None
    assert tup.pending_writes == [("task", "k", 2)]


async def test_reads_are_not_blocked_by_an_open_write_transaction(
    saver: PilotCheckpointSaver, store: CheckpointStore
) -> None:
    thread = str(uuid.uuid4())
    config = await saver.aput(
        _config(thread), _checkpoint({"k": "v"}), {"source": "loop", "step": 0}, {"k": 1}
    )
    gate = _Gate(store)
    try:
        pending_put = asyncio.create_task(
            saver.aput(
                _config(thread, config["configurable"]["checkpoint_id"]),
                _checkpoint({"k": "w"}),
                {"source": "loop", "step": 1},
                {"k": 2},
            )
        )
        tup = await asyncio.wait_for(saver.aget_tuple(config), WAIT)
        assert tup is not None
        assert tup.checkpoint["channel_values"] == {"k": "v"}
        listed = await asyncio.wait_for(_collect(saver, _config(thread)), WAIT)
        assert len(listed) == 1
        assert not pending_put.done()
    finally:
        gate.release.set()
    await asyncio.wait_for(pending_put, WAIT)
    assert len(await _collect(saver, _config(thread))) == 2


async def _collect(
    saver: PilotCheckpointSaver, config: RunnableConfig | None, **kw: Any
) -> list[Any]:
    return [t async for t in saver.alist(config, **kw)]


async def test_a_full_write_queue_refuses_with_overloaded(db_url: str) -> None:
    store = await open_store(db_url, StoreOptions(max_queue=1))
    try:
        gate = _Gate(store)
        service = CheckpointService(store)
        saver = PilotCheckpointSaver(
            backend=LocalStoreBackend(service),
        )
        first = asyncio.create_task(saver.aput(_config("a"), _checkpoint(), {}, {}))
        async with asyncio.timeout(WAIT):
            while store._writer._queue.qsize() < 1:
                await asyncio.sleep(0.005)
        with pytest.raises(StoreOverloadedError):
            await saver.aput(_config("b"), _checkpoint(), {}, {})
        gate.release.set()
        await asyncio.wait_for(first, WAIT)
        await saver.aclose()
    finally:
        await store.aclose()


async def test_scoping_two_callers_cannot_see_each_others_threads(store: CheckpointStore) -> None:
    service = CheckpointService(store)
    alice = PilotCheckpointSaver(backend=LocalStoreBackend(service, caller_node_id="alice-node"))
    bob = PilotCheckpointSaver(backend=LocalStoreBackend(service, caller_node_id="bob-node"))
    try:
        thread = "shared-name"
        run = str(uuid.uuid4())
        configs = await _put_chain(alice, thread, 3, run_id=run)
        await alice.aput_writes(configs[-1], [("ch", "alice's")], "t1")

        assert await bob.aget_tuple(_config(thread)) is None
        assert await _collect(bob, _config(thread)) == []
        assert await _collect(bob, None) == []
        await bob.acopy_thread(thread, "stolen")
        assert await _collect(bob, _config("stolen")) == []
        assert await _collect(alice, _config("stolen")) == []
        await bob.adelete_thread(thread)
        await bob.aprune([thread], strategy="delete")
        await bob.adelete_for_runs([run])
        assert len(await _collect(alice, _config(thread))) == 3

        # Bob's own thread of the same name is independent.
        await _put_chain(bob, thread, 1)
        assert len(await _collect(bob, _config(thread))) == 1
        assert len(await _collect(alice, _config(thread))) == 3
        latest = await alice.aget_tuple(_config(thread))
        assert latest is not None
        assert latest.pending_writes == [("t1", "ch", "alice's")]
    finally:
        await alice.aclose()
        await bob.aclose()


async def test_shared_store_lets_every_caller_see_every_thread(db_url: str) -> None:
    store = await open_store(db_url, StoreOptions(shared=True))
    service = CheckpointService(store)
    alice = PilotCheckpointSaver(backend=LocalStoreBackend(service, caller_node_id="alice-node"))
    bob = PilotCheckpointSaver(backend=LocalStoreBackend(service, caller_node_id="bob-node"))
    try:
        await _put_chain(alice, "t", 2)
        assert len(await _collect(bob, _config("t"))) == 2
    finally:
        await alice.aclose()
        await bob.aclose()
        await store.aclose()


async def test_large_checkpoint_round_trips(saver: PilotCheckpointSaver) -> None:
    big = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    text_value = "x" * (1024 * 1024)
    thread = str(uuid.uuid4())
    config = await saver.aput(
        _config(thread),
        _checkpoint({"big": big, "text": text_value}),
        {"source": "loop", "step": 0},
        {"big": 1, "text": 1},
    )
    tup = await saver.aget_tuple(config)
    assert tup is not None
    assert tup.checkpoint["channel_values"]["big"] == big
    assert tup.checkpoint["channel_values"]["text"] == text_value


async def test_list_pages_through_many_checkpoints(store: CheckpointStore) -> None:
    saver = PilotCheckpointSaver(
        backend=LocalStoreBackend(CheckpointService(store)), options=SaverOptions(list_page_size=3)
    )
    try:
        thread = str(uuid.uuid4())
        configs = await _put_chain(saver, thread, 10)
        ids = [c["configurable"]["checkpoint_id"] for c in configs]
        listed = await _collect(saver, _config(thread))
        assert [t.checkpoint["id"] for t in listed] == list(reversed(ids))
        assert len(await _collect(saver, _config(thread), limit=7)) == 7
        odd = await _collect(saver, _config(thread), filter={"step": 7})
        assert [t.metadata["step"] for t in odd] == [7]
        older = await _collect(saver, _config(thread), before=configs[4], limit=2)
        assert [t.checkpoint["id"] for t in older] == [ids[3], ids[2]]
    finally:
        await saver.aclose()


async def test_delta_history_matches_the_base_class_walk(saver: PilotCheckpointSaver) -> None:
    thread = str(uuid.uuid4())
    parent: RunnableConfig = _config(thread)
    configs: list[RunnableConfig] = []
    for step in range(5):
        values: dict[str, Any] = {"other": step}
        versions: dict[str, Any] = {"other": step + 1}
        if step in (0, 3):  # "acc" has a stored value only at steps 0 and 3
            values["acc"] = f"seed-{step}"
        cp = _checkpoint(values)
        cp["channel_versions"] = {**versions, **({"acc": step + 1} if "acc" in values else {})}
        parent = await saver.aput(
            parent, cp, {"source": "loop", "step": step}, cp["channel_versions"]
        )
        await saver.aput_writes(
            parent,
            [("acc", f"w{step}a"), ("other", step), ("acc", f"w{step}b")],
            f"task{step}",
            f"p{step}",
        )
        await saver.aput_writes(parent, [("acc", f"v{step}")], f"atask{step}", f"a{step}")
        configs.append(parent)
    channels = ["acc", "other", "missing"]
    for target in (configs[-1], configs[2], _config(thread)):
        ours = await saver.aget_delta_channel_history(config=target, channels=channels)
        reference = await BaseCheckpointSaver.aget_delta_channel_history(
            saver, config=target, channels=channels
        )
        assert ours == reference
        assert saver.get_delta_channel_history(config=target, channels=channels) == reference
    assert await saver.aget_delta_channel_history(config=configs[-1], channels=[]) == {}


async def test_retention_policy_keeps_the_newest(db_url: str) -> None:
    store = await open_store(
        db_url, StoreOptions(retention=RetentionPolicy(max_checkpoints_per_thread=2))
    )
    saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(store)))
    try:
        configs = await _put_chain(saver, "t", 5)
        await _put_chain(saver, "u", 1)
        assert await store.apply_retention() == 3
        kept = await _collect(saver, _config("t"))
        assert [t.config for t in kept] == [configs[4], configs[3]]
        assert len(await _collect(saver, _config("u"))) == 1
        tup = await saver.aget_tuple(configs[3])
        assert tup is not None
        assert tup.checkpoint["channel_values"] == {"step": 3}
    finally:
        await saver.aclose()
        await store.aclose()


async def test_age_retention_never_removes_the_latest(db_url: str) -> None:
    store = await open_store(db_url, StoreOptions(retention=RetentionPolicy(max_age_secs=60)))
    saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(store)))
    try:
        configs = await _put_chain(saver, "t", 4)
        assert await store.apply_retention() == 0
        assert await store.apply_retention(now=time.time() + 3600) == 3
        assert [t.config for t in await _collect(saver, _config("t"))] == [configs[-1]]
    finally:
        await saver.aclose()
        await store.aclose()


async def test_schema_is_versioned_and_newer_schemas_are_refused(db_url: str) -> None:
    store = await open_store(db_url)
    assert store.schema_version == SCHEMA_VERSION

    with store._engine.connect() as conn:
        versions = [r[0] for r in conn.execute(select(migrations_table.c.version))]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    await store.aclose()

    reopened = await open_store(db_url)  # already migrated: nothing to do
    assert reopened.schema_version == SCHEMA_VERSION

    await reopened.aclose()
    with reopened._engine.begin() as conn:
        conn.execute(
            insert(migrations_table).values(
                version=SCHEMA_VERSION + 1, description="future", applied_at=0.0
            )
        )
    reopened._engine.dispose()
    with pytest.raises(StoreSchemaError, match="newer"):
        await open_store(db_url)


async def test_close_commits_accepted_writes_then_refuses(db_url: str) -> None:
    store = await open_store(db_url)
    saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(store)))
    gate = _Gate(store)
    puts = [
        asyncio.create_task(saver.aput(_config(f"t{i}"), _checkpoint(), {}, {})) for i in range(5)
    ]
    async with asyncio.timeout(WAIT):
        while store._writer._queue.qsize() < 5:
            await asyncio.sleep(0.005)
    closing = asyncio.create_task(store.aclose())
    gate.release.set()
    await asyncio.wait_for(closing, WAIT)
    await asyncio.wait_for(asyncio.gather(*puts), WAIT)
    with pytest.raises(StoreClosedError):
        await saver.aget_tuple(_config("t0"))
    await saver.aclose()
    again = await open_store(db_url)
    saver2 = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(again)))
    try:
        for i in range(5):
            assert await saver2.aget_tuple(_config(f"t{i}")) is not None
    finally:
        await saver2.aclose()
        await again.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u@h/db",
        "sqlite://",
        "sqlite:///:memory:",
        "not a url",
        "postgresql+psycopg2://h/db",
    ],
)
async def test_unsupported_urls_are_config_errors(url: str) -> None:
    with pytest.raises(CheckpointConfigError):
        await open_store(url)


async def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Any) -> None:
    path = tmp_path / "private.db"
    store = await open_store(f"sqlite:///{path}")
    try:
        assert path.stat().st_mode & 0o777 == 0o600

        def _pragmas(db: Any) -> tuple[str, int]:
            db.execute("PRAGMA journal_mode")
            mode = db._cursor.fetchall()[0][0]
            db.execute("PRAGMA synchronous")
            sync = db._cursor.fetchall()[0][0]
            return mode, sync

        mode, sync = await store._read(_pragmas)
        assert mode == "wal"
        assert sync == 2  # FULL
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("method", "payload"),
    [
        ("nope", {}),
        ("put", []),
        ("put", {"thread_id": 1}),
        ("get_tuple", {"thread_id": "", "checkpoint_ns": ""}),
        (
            "put_writes",
            {
                "thread_id": "t",
                "checkpoint_ns": "",
                "checkpoint_id": "c",
                "task_id": "x",
                "task_path": "",
                "writes": [["0", "ch", "t", b""]],
            },
        ),
        ("list", {"limit": 100000}),
        ("prune", {"thread_ids": ["t"], "strategy": "everything"}),
        ("get_tuple", {"thread_id": "t" * 5000, "checkpoint_ns": ""}),
    ],
)
async def test_malformed_requests_are_refused(
    store: CheckpointStore, method: str, payload: Any
) -> None:
    service = CheckpointService(store)
    with pytest.raises((CheckpointProtocolError, CheckpointUsageError)):
        await service.handle(method, payload, caller_node_id="someone")


async def test_metadata_round_trips_exactly_and_filters_on_its_json_view(
    saver: PilotCheckpointSaver,
) -> None:
    thread = str(uuid.uuid4())
    odd: dict[str, Any] = {
        "source": "update",
        "step": 4,
        "by_int": {1: "one", 2: "two"},
        "raw": b"\x00\x01",
        "nested": {"a": [1, {"b": None}]},
    }
    config = await saver.aput(_config(thread), _checkpoint(), odd, {})  # pyright: ignore[reportArgumentType]
    tup = await saver.aget_tuple(config)
    assert tup is not None
    for key, value in odd.items():
        assert tup.metadata[key] == value  # pyright: ignore[reportTypedDictNotRequiredAccess]
    assert (
        len(await _collect(saver, _config(thread), filter={"nested": {"a": [1, {"b": None}]}})) == 1
    )
    assert len(await _collect(saver, _config(thread), filter={"source": "update", "step": 4})) == 1
    assert await _collect(saver, _config(thread), filter={"step": 5}) == []
    assert await _collect(saver, _config(thread), filter={"missing": 1}) == []
