"""Database schema of the checkpoint store, and its migrations.

Theory of operation
-------------------
``pilot_checkpoint_migrations`` records every applied schema version (one row
per version, with its description and time). Opening a store applies, in one
transaction each and in order, every migration newer than the highest recorded
version; a database whose version is newer than this code knows is refused
(``StoreSchemaError``) rather than written with an older layout. Concurrent
openers are serialized: SQLite by ``BEGIN IMMEDIATE``, PostgreSQL by a
transaction-scoped advisory lock.

Every key column compares bytewise (``COLLATE "C"`` on PostgreSQL; SQLite's
default ``BINARY``), so ``checkpoint_id`` order in SQL equals Python's string
order, which is the order LangGraph's uuid6 ids are created in.

Rows are scoped: ``scope`` is the caller's node id (or ``""`` for a shared
store) and leads every primary key, so one caller's threads are invisible to
another's queries.

A migration, once released, never changes; a new layout is a new migration.
Indexes and tables added after version 1 are created by their own migration
with ``checkfirst`` (version 1 creates whatever ``Table`` objects carry, so a
fresh database and an upgraded one end in the same layout).

Retention reads ``pilot_checkpoints_age`` (``created_at`` then the full key):
old checkpoints and recently written namespaces are index range scans that
never touch the table. Run exclusion keeps one lease row per thread in
``pilot_run_leases``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.types import TypeEngine

from pilot_checkpoint_sqlite.errors import StoreSchemaError


def _key() -> TypeEngine[str]:
    return Text().with_variant(Text(collation="C"), "postgresql")


metadata = MetaData()

migrations_table = Table(
    "pilot_checkpoint_migrations",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_at", Float, nullable=False),
)

checkpoints = Table(
    "pilot_checkpoints",
    metadata,
    Column("scope", _key(), primary_key=True),
    Column("thread_id", _key(), primary_key=True),
    Column("checkpoint_ns", _key(), primary_key=True),
    Column("checkpoint_id", _key(), primary_key=True),
    Column("parent_checkpoint_id", _key(), nullable=True),
    Column("run_id", _key(), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("checkpoint_type", Text, nullable=False),
    Column("checkpoint", LargeBinary, nullable=False),
    Column("metadata_type", Text, nullable=False),
    Column("metadata_blob", LargeBinary, nullable=False),
    Column("metadata_json", Text, nullable=False),
    Column("channel_versions", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Index("pilot_checkpoints_run_id", "scope", "run_id"),
    Index("pilot_checkpoints_created_at", "created_at"),
)

blobs = Table(
    "pilot_checkpoint_blobs",
    metadata,
    Column("scope", _key(), primary_key=True),
    Column("thread_id", _key(), primary_key=True),
    Column("checkpoint_ns", _key(), primary_key=True),
    Column("channel", _key(), primary_key=True),
    Column("version", _key(), primary_key=True),
    Column("type", Text, nullable=False),
    Column("blob", LargeBinary, nullable=False),
)

writes = Table(
    "pilot_checkpoint_writes",
    metadata,
    Column("scope", _key(), primary_key=True),
    Column("thread_id", _key(), primary_key=True),
    Column("checkpoint_ns", _key(), primary_key=True),
    Column("checkpoint_id", _key(), primary_key=True),
    Column("task_id", _key(), primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("channel", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("value", LargeBinary, nullable=False),
    Column("task_path", Text, nullable=False),
)


age_index = Index(
    "pilot_checkpoints_age",
    checkpoints.c.created_at,
    checkpoints.c.scope,
    checkpoints.c.thread_id,
    checkpoints.c.checkpoint_ns,
    checkpoints.c.checkpoint_id,
)
"""Retention's index: age range scans that cover the whole key (no table reads)."""

run_leases = Table(
    "pilot_run_leases",
    metadata,
    Column("scope", _key(), primary_key=True),
    Column("thread_id", _key(), primary_key=True),
    Column("holder", Text, nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("run_id", Text, nullable=False, server_default=""),
)
"""One row per thread with a run in progress (or a holder that died, until it expires).

``run_id`` is the run the holder executes (``""``: not given); a resume of
the same run may take the lease over while it is live (schema version 4)."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1(conn: Connection) -> None:
    for table in (checkpoints, blobs, writes):
        table.create(conn, checkfirst=True)


def _v2(conn: Connection) -> None:
    age_index.create(conn, checkfirst=True)
    # The single-column index is a prefix of the new one: drop the duplicate.
    conn.execute(text("DROP INDEX IF EXISTS pilot_checkpoints_created_at"))


def _v3(conn: Connection) -> None:
    run_leases.create(conn, checkfirst=True)


def _v4(conn: Connection) -> None:
    # A database created at version 3 lacks the column; one created now has it.
    present = {c["name"] for c in inspect(conn).get_columns("pilot_run_leases")}
    if "run_id" not in present:
        conn.execute(
            text("ALTER TABLE pilot_run_leases ADD COLUMN run_id TEXT NOT NULL DEFAULT ''")
        )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "checkpoints, channel blobs and pending writes, scoped by caller", _v1),
    Migration(2, "retention index on (created_at, key)", _v2),
    Migration(3, "per-thread run leases", _v3),
    Migration(4, "the run id of a thread lease's holder (resume takeover)", _v4),
)

SCHEMA_VERSION = MIGRATIONS[-1].version

_PG_LOCK_KEY = 0x70696C6F74636B  # "pilotck": advisory lock id of migrations


def migrate(conn: Connection) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION` inside the caller's transaction.

    Returns:
        The schema version after migration.

    Raises:
        StoreSchemaError: the database is newer than this code.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    migrations_table.create(conn, checkfirst=True)
    current = conn.execute(select(func.max(migrations_table.c.version))).scalar_one_or_none() or 0
    if current > SCHEMA_VERSION:
        raise StoreSchemaError(
            f"database schema version {current} is newer than this pilot-checkpoint-sqlite "
            f"(knows up to {SCHEMA_VERSION}); upgrade the package"
        )
    for migration in MIGRATIONS:
        if migration.version > current:
            migration.apply(conn)
            conn.execute(
                insert(migrations_table).values(
                    version=migration.version,
                    description=migration.description,
                    applied_at=time.time(),
                )
            )
            current = migration.version
    return current
