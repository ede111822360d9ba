"""Retention by index: the query plans, the results, and the schema migration that adds it."""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from pilot_checkpoint_sqlite import (
    CheckpointService,
    CheckpointStore,
    LocalStoreBackend,
    PilotCheckpointSaver,
    RetentionPolicy,
    StoreOptions,
    open_store,
)
from pilot_checkpoint_sqlite._schema import SCHEMA_VERSION, checkpoints, migrations_table
from sqlalchemy import delete, inspect, select, text, update

Key = tuple[str, str, str, str]


def _config(thread_id: str, ns: str = "") -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns}}


def _checkpoint() -> Checkpoint:
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"v": 1}
    checkpoint["channel_versions"] = {"v": "1"}
    return checkpoint


def _plan(db: Path, sql: str, params: Any) -> str:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
    return " | ".join(str(r[-1]) for r in rows)


def test_retention_queries_use_indexes(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = CheckpointStore.open(f"sqlite:///{db}")
    try:
        sql = store._sql  # pyright: ignore[reportPrivateUsage]
        ns = {"scope": "s", "thread_id": "t", "checkpoint_ns": ""}
        plans = {
            "older": _plan(
                db,
                sql.checkpoints_older_than().sql,
                sql.checkpoints_older_than().params({"cutoff": 1.0}),
            ),
            "since": _plan(
                db,
                sql.namespaces_written_since().sql,
                sql.namespaces_written_since().params({"since": 1.0}),
            ),
            "latest": _plan(
                db, sql.latest_of_namespace().sql, sql.latest_of_namespace().params(ns)
            ),
            "beyond": _plan(
                db, sql.beyond_newest().sql, sql.beyond_newest().params({**ns, "keep": 2})
            ),
        }
    finally:
        store.close()
    # Range searches of the (created_at, key) index that never read the table.
    assert (
        "SEARCH pilot_checkpoints USING COVERING INDEX pilot_checkpoints_age (created_at<?)"
        in (plans["older"])
    ), plans
    assert (
        "SEARCH pilot_checkpoints USING COVERING INDEX pilot_checkpoints_age (created_at>?)"
        in (plans["since"])
    ), plans
    # Per-namespace probes of the primary key.
    for name in ("latest", "beyond"):
        assert "(scope=? AND thread_id=? AND checkpoint_ns=?)" in plans[name], plans
        assert "INDEX sqlite_autoindex_pilot_checkpoints_1" in plans[name], plans
    for plan in plans.values():
        assert "SCAN pilot_checkpoints" not in plan, plans


def _reference(
    rows: Sequence[tuple[str, str, str, str, float]], keep: int, cutoff: float
) -> set[Key]:
    """What retention keeps, computed the way the full-table version did."""
    groups: dict[tuple[str, str, str], list[tuple[str, float]]] = {}
    for scope, thread_id, ns, cid, created in rows:
        groups.setdefault((scope, thread_id, ns), []).append((cid, created))
    kept: set[Key] = set()
    for (scope, thread_id, ns), items in groups.items():
        items.sort(reverse=True)
        for rank, (cid, created) in enumerate(items):
            if rank == 0 or not (rank >= keep or created < cutoff):
                kept.add((scope, thread_id, ns, cid))
    return kept


def _rows(store: CheckpointStore) -> list[tuple[str, str, str, str, float]]:
    with store._engine.connect() as conn:  # pyright: ignore[reportPrivateUsage]
        found = conn.execute(
            select(
                checkpoints.c.scope,
                checkpoints.c.thread_id,
                checkpoints.c.checkpoint_ns,
                checkpoints.c.checkpoint_id,
                checkpoints.c.created_at,
            )
        )
        return [(r[0], r[1], r[2], r[3], float(r[4])) for r in found]


async def _fill(savers: Sequence[PilotCheckpointSaver], rng: random.Random, threads: int) -> None:
    for saver in savers:
        for t in range(threads):
            for ns in ("", "child"):
                config = _config(f"t{t}", ns)
                for _ in range(rng.randint(1, 7)):
                    config = await saver.aput(config, _checkpoint(), {}, {"v": "1"})
                    config = {
                        "configurable": {
                            **config["configurable"],  # pyright: ignore[reportTypedDictNotRequiredAccess]
                        }
                    }


async def test_retention_results_are_unchanged(db_url: str) -> None:
    rng = random.Random(1234)
    keep, max_age = 3, 100.0
    store = await open_store(
        db_url,
        StoreOptions(
            retention=RetentionPolicy(max_age_secs=max_age, max_checkpoints_per_thread=keep)
        ),
    )
    service = CheckpointService(store)
    savers = [
        PilotCheckpointSaver(backend=LocalStoreBackend(service, caller_node_id=who))
        for who in ("alice", "bob")
    ]
    try:
        await _fill(savers, rng, threads=6)
        now = time.time()
        # Spread the ages: some namespaces entirely old, some mixed.
        stored = _rows(store)
        with store._engine.begin() as conn:  # pyright: ignore[reportPrivateUsage]
            for scope, thread_id, ns, cid, _ in stored:
                conn.execute(
                    update(checkpoints)
                    .where(
                        checkpoints.c.scope == scope,
                        checkpoints.c.thread_id == thread_id,
                        checkpoints.c.checkpoint_ns == ns,
                        checkpoints.c.checkpoint_id == cid,
                    )
                    .values(created_at=now - rng.uniform(0, 2 * max_age))
                )
        before = _rows(store)
        expected = _reference(before, keep, now - max_age)
        removed = await store.apply_retention(now=now)
        after = {r[:4] for r in _rows(store)}
        assert after == expected
        assert removed == len(before) - len(expected) > 0

        # A second pass looks only at namespaces written since the first.
        await _fill(savers[:1], rng, threads=3)
        before = _rows(store)
        expected = _reference(before, keep, now - max_age)
        removed = await store.apply_retention(now=now)
        assert {r[:4] for r in _rows(store)} == expected
        assert removed == len(before) - len(expected) > 0
        assert await store.apply_retention(now=now) == 0
        # Every surviving checkpoint still reads back whole.
        for scope_saver in savers:
            async for tup in scope_saver.alist(None):
                assert tup.checkpoint["channel_values"] == {"v": 1}
    finally:
        for saver in savers:
            await saver.aclose()
        await store.aclose()


async def test_an_existing_database_is_migrated_to_the_index(db_url: str) -> None:
    store = await open_store(db_url)
    saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(store)))
    config = await saver.aput(_config("t"), _checkpoint(), {}, {"v": "1"})
    await saver.aclose()
    await store.aclose()
    # Put the database back in its version-1 layout.
    engine = store._engine  # pyright: ignore[reportPrivateUsage]
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX pilot_checkpoints_age"))
        conn.execute(
            text("CREATE INDEX pilot_checkpoints_created_at ON pilot_checkpoints (created_at)")
        )
        conn.execute(text("DROP TABLE pilot_run_leases"))
        conn.execute(delete(migrations_table).where(migrations_table.c.version > 1))
    with engine.connect() as conn:
        indexes = {i["name"] for i in inspect(conn).get_indexes("pilot_checkpoints")}
    assert "pilot_checkpoints_age" not in indexes
    engine.dispose()

    reopened = await open_store(db_url)
    try:
        assert reopened.schema_version == SCHEMA_VERSION == 4
        with reopened._engine.connect() as conn:  # pyright: ignore[reportPrivateUsage]
            inspector = inspect(conn)
            indexes = {i["name"] for i in inspector.get_indexes("pilot_checkpoints")}
            assert "pilot_run_leases" in inspector.get_table_names()
            lease_columns = {c["name"] for c in inspector.get_columns("pilot_run_leases")}
            assert "run_id" in lease_columns
        assert "pilot_checkpoints_age" in indexes
        assert "pilot_checkpoints_created_at" not in indexes
        again = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(reopened)))
        got = await again.aget_tuple(config)
        assert got is not None
        assert got.checkpoint["channel_values"] == {"v": 1}
        await again.aclose()
    finally:
        await reopened.aclose()
