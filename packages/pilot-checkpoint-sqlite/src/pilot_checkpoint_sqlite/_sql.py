"""The store's SQL: SQLAlchemy Core statements, compiled once per dialect.

Why compile once and run on the driver's cursor: on the hot paths (``put``,
``put_writes``, ``get_tuple``) SQLAlchemy's per-execution machinery costs about
ten times the SQLite query itself (~190 us against ~20 us measured here), which
would cap the store far below what one SQLite file can do. The statements are
still written with SQLAlchemy Core against the tables in ``_schema`` and
compiled by the dialect (placeholders, ``ON CONFLICT``, ``COLLATE "C"`` bind
casts on PostgreSQL), so the SQL stays portable; only the execution skips the
engine. Migrations, pooling and URL handling stay in SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from sqlalchemy import (
    ClauseElement,
    Table,
    bindparam,
    delete,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler

from pilot_checkpoint_sqlite._schema import blobs, checkpoints, run_leases, writes

ROW_COLUMNS = (
    checkpoints.c.thread_id,
    checkpoints.c.checkpoint_ns,
    checkpoints.c.checkpoint_id,
    checkpoints.c.parent_checkpoint_id,
    checkpoints.c.checkpoint_type,
    checkpoints.c.checkpoint,
    checkpoints.c.metadata_type,
    checkpoints.c.metadata_blob,
    checkpoints.c.channel_versions,
)
"""Columns of a full checkpoint row, in the order ``_store`` unpacks them."""


class Compiled:
    """One statement compiled for one dialect, with its parameter order."""

    __slots__ = ("defaults", "order", "sql")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        self.sql = str(compiled)
        self.order: tuple[str, ...] | None = (
            tuple(compiled.positiontup) if compiled.positional and compiled.positiontup else None
        )
        self.defaults: dict[str, Any] = {k: v for k, v in compiled.params.items() if v is not None}

    def params(self, values: Mapping[str, Any]) -> Any:
        if self.order is not None:
            defaults = self.defaults
            return tuple(values[k] if k in values else defaults[k] for k in self.order)
        if self.defaults:
            return {**self.defaults, **values}
        return values


def _insert(dialect: Dialect, table: Table) -> Any:
    if dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def _all_values(table: Table) -> dict[str, Any]:
    return {c.name: bindparam(c.name) for c in table.columns}


def _p(name: str) -> Any:
    return bindparam(name)


class Statements:
    """Every statement of the store, compiled for ``dialect`` (lazily, then cached)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.name = dialect.name
        self._cache: dict[Any, Compiled] = {}

    def get(self, key: Any, build: Callable[[], ClauseElement]) -> Compiled:
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = Compiled(build(), self.dialect)
        return found

    # ------------------------------------------------------------- transactions

    def begin_write(self) -> str:
        return "BEGIN IMMEDIATE" if self.name == "sqlite" else "BEGIN"

    def begin_read(self) -> str:
        return (
            "BEGIN" if self.name == "sqlite" else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        )

    # ------------------------------------------------------------- writes

    def insert_ignore(self, table: Table) -> Compiled:
        return self.get(
            ("insert_ignore", table.name),
            lambda: (
                _insert(self.dialect, table).values(_all_values(table)).on_conflict_do_nothing()
            ),
        )

    def insert_write_replace(self) -> Compiled:
        def build() -> ClauseElement:
            stmt = _insert(self.dialect, writes).values(_all_values(writes))
            return stmt.on_conflict_do_update(
                index_elements=[c.name for c in writes.primary_key.columns],
                set_={
                    "channel": stmt.excluded.channel,
                    "type": stmt.excluded.type,
                    "value": stmt.excluded.value,
                    "task_path": stmt.excluded.task_path,
                },
            )

        return self.get("insert_write_replace", build)

    def delete_thread(self, table: Table) -> Compiled:
        return self.get(
            ("delete_thread", table.name),
            lambda: delete(table).where(
                table.c.scope == _p("scope"), table.c.thread_id == _p("thread_id")
            ),
        )

    def delete_of_checkpoint(self, table: Table) -> Compiled:
        return self.get(
            ("delete_of_checkpoint", table.name),
            lambda: delete(table).where(
                table.c.scope == _p("scope"),
                table.c.thread_id == _p("thread_id"),
                table.c.checkpoint_ns == _p("checkpoint_ns"),
                table.c.checkpoint_id == _p("checkpoint_id"),
            ),
        )

    def delete_blob(self) -> Compiled:
        return self.get(
            "delete_blob",
            lambda: delete(blobs).where(
                blobs.c.scope == _p("scope"),
                blobs.c.thread_id == _p("thread_id"),
                blobs.c.checkpoint_ns == _p("checkpoint_ns"),
                blobs.c.channel == _p("channel"),
                blobs.c.version == _p("version"),
            ),
        )

    def copy_page(self, table: Table, keys: tuple[str, ...], first: bool) -> Compiled:
        def build() -> ClauseElement:
            cols = [table.c[k] for k in keys]
            query = select(*table.columns).where(
                table.c.scope == _p("scope"), table.c.thread_id == _p("thread_id")
            )
            if not first:
                query = query.where(tuple_(*cols) > tuple_(*(_p(f"k_{k}") for k in keys)))
            return query.order_by(*cols).limit(_p("limit"))

        return self.get(("copy_page", table.name, first), build)

    def checkpoints_of_run(self) -> Compiled:
        return self.get(
            "checkpoints_of_run",
            lambda: select(
                checkpoints.c.thread_id, checkpoints.c.checkpoint_ns, checkpoints.c.checkpoint_id
            ).where(checkpoints.c.scope == _p("scope"), checkpoints.c.run_id == _p("run_id")),
        )

    def checkpoint_keys_of_thread(self) -> Compiled:
        return self.get(
            "checkpoint_keys_of_thread",
            lambda: select(checkpoints.c.checkpoint_ns, checkpoints.c.checkpoint_id).where(
                checkpoints.c.scope == _p("scope"), checkpoints.c.thread_id == _p("thread_id")
            ),
        )

    # ------------------------------------------------------------- retention
    # Each query is answered from an index (``pilot_checkpoints_age`` or the
    # primary key); ``test_retention_queries_use_indexes`` checks the plans.

    def checkpoints_older_than(self) -> Compiled:
        """Keys of checkpoints created before ``cutoff`` (age index range, covering)."""
        return self.get(
            "checkpoints_older_than",
            lambda: select(
                checkpoints.c.scope,
                checkpoints.c.thread_id,
                checkpoints.c.checkpoint_ns,
                checkpoints.c.checkpoint_id,
            ).where(checkpoints.c.created_at < _p("cutoff")),
        )

    def namespaces_written_since(self) -> Compiled:
        """Namespaces of checkpoints created at or after ``since`` (age index range).

        One row per checkpoint (the caller folds duplicates): with ``DISTINCT``
        SQLite may prefer walking the whole primary key in order.
        """
        return self.get(
            "namespaces_written_since",
            lambda: select(
                checkpoints.c.scope, checkpoints.c.thread_id, checkpoints.c.checkpoint_ns
            ).where(checkpoints.c.created_at >= _p("since")),
        )

    def namespaces_over(self) -> Compiled:
        """Namespaces holding more than ``keep`` checkpoints (primary-key index, covering)."""
        return self.get(
            "namespaces_over",
            lambda: (
                select(checkpoints.c.scope, checkpoints.c.thread_id, checkpoints.c.checkpoint_ns)
                .group_by(checkpoints.c.scope, checkpoints.c.thread_id, checkpoints.c.checkpoint_ns)
                .having(func.count() > _p("keep"))
            ),
        )

    def latest_of_namespace(self) -> Compiled:
        """The newest checkpoint id of one namespace (primary-key index, one probe)."""
        return self.get(
            "latest_of_namespace",
            lambda: select(func.max(checkpoints.c.checkpoint_id)).where(
                checkpoints.c.scope == _p("scope"),
                checkpoints.c.thread_id == _p("thread_id"),
                checkpoints.c.checkpoint_ns == _p("checkpoint_ns"),
            ),
        )

    def beyond_newest(self) -> Compiled:
        """Checkpoint ids of one namespace after its ``keep`` newest (primary-key index)."""
        return self.get(
            "beyond_newest",
            lambda: (
                select(checkpoints.c.checkpoint_id)
                .where(
                    checkpoints.c.scope == _p("scope"),
                    checkpoints.c.thread_id == _p("thread_id"),
                    checkpoints.c.checkpoint_ns == _p("checkpoint_ns"),
                )
                .order_by(checkpoints.c.checkpoint_id.desc())
                .offset(_p("keep"))
            ),
        )

    # ------------------------------------------------------------- run leases

    def lease_claim(self) -> Compiled:
        """Insert the lease, or take it over if expired or already ours."""
        return self.get("lease_claim", lambda: self._lease_upsert(same_run=False))

    def lease_takeover(self) -> Compiled:
        """As :meth:`lease_claim`, and also take a live lease held for the same run id.

        Used only for an acquire flagged as a resume with a non-empty run id:
        the run's earlier attempt (a worker that died, or one that is still
        running and will lose the lease at its next renewal) holds it.
        """
        return self.get("lease_takeover", lambda: self._lease_upsert(same_run=True))

    def _lease_upsert(self, *, same_run: bool) -> ClauseElement:
        stmt = _insert(self.dialect, run_leases).values(_all_values(run_leases))
        taken = (run_leases.c.expires_at <= _p("now")) | (
            run_leases.c.holder == stmt.excluded.holder
        )
        if same_run:
            taken = taken | (
                (run_leases.c.run_id == stmt.excluded.run_id) & (run_leases.c.run_id != "")
            )
        return stmt.on_conflict_do_update(
            index_elements=[c.name for c in run_leases.primary_key.columns],
            set_={
                "holder": stmt.excluded.holder,
                "acquired_at": stmt.excluded.acquired_at,
                "expires_at": stmt.excluded.expires_at,
                "run_id": stmt.excluded.run_id,
            },
            where=taken,
        )

    def lease_row(self) -> Compiled:
        return self.get(
            "lease_row",
            lambda: select(run_leases.c.holder, run_leases.c.expires_at, run_leases.c.run_id).where(
                run_leases.c.scope == _p("scope"), run_leases.c.thread_id == _p("thread_id")
            ),
        )

    def lease_renew(self) -> Compiled:
        return self.get(
            "lease_renew",
            lambda: (
                update(run_leases)
                .where(
                    run_leases.c.scope == _p("scope"),
                    run_leases.c.thread_id == _p("thread_id"),
                    run_leases.c.holder == _p("holder"),
                )
                .values(expires_at=_p("expires_at"))
            ),
        )

    def lease_release(self) -> Compiled:
        return self.get(
            "lease_release",
            lambda: delete(run_leases).where(
                run_leases.c.scope == _p("scope"),
                run_leases.c.thread_id == _p("thread_id"),
                run_leases.c.holder == _p("holder"),
            ),
        )

    def db_now(self) -> str | None:
        """SQL for the database server's clock in epoch seconds (``None``: use the local clock)."""
        if self.name == "postgresql":
            return "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8"
        return None

    def versions_of_namespace(self) -> Compiled:
        return self.get(
            "versions_of_namespace",
            lambda: select(checkpoints.c.channel_versions).where(
                checkpoints.c.scope == _p("scope"),
                checkpoints.c.thread_id == _p("thread_id"),
                checkpoints.c.checkpoint_ns == _p("checkpoint_ns"),
            ),
        )

    def blob_keys_of_namespace(self) -> Compiled:
        return self.get(
            "blob_keys_of_namespace",
            lambda: select(blobs.c.channel, blobs.c.version).where(
                blobs.c.scope == _p("scope"),
                blobs.c.thread_id == _p("thread_id"),
                blobs.c.checkpoint_ns == _p("checkpoint_ns"),
            ),
        )

    # ------------------------------------------------------------- reads

    def checkpoint_row(self, latest: bool) -> Compiled:
        def build() -> ClauseElement:
            query = select(*ROW_COLUMNS).where(
                checkpoints.c.scope == _p("scope"),
                checkpoints.c.thread_id == _p("thread_id"),
                checkpoints.c.checkpoint_ns == _p("checkpoint_ns"),
            )
            if latest:
                return query.order_by(checkpoints.c.checkpoint_id.desc()).limit(1)
            return query.where(checkpoints.c.checkpoint_id == _p("checkpoint_id"))

        return self.get(("checkpoint_row", latest), build)

    def chain_link(self, latest: bool) -> Compiled:
        def build() -> ClauseElement:
            query = select(
                checkpoints.c.checkpoint_id,
                checkpoints.c.parent_checkpoint_id,
                checkpoints.c.channel_versions,
            ).where(
                checkpoints.c.scope == _p("scope"),
                checkpoints.c.thread_id == _p("thread_id"),
                checkpoints.c.checkpoint_ns == _p("checkpoint_ns"),
            )
            if latest:
                return query.order_by(checkpoints.c.checkpoint_id.desc()).limit(1)
            return query.where(checkpoints.c.checkpoint_id == _p("checkpoint_id"))

        return self.get(("chain_link", latest), build)

    def blob(self) -> Compiled:
        return self.get(
            "blob",
            lambda: select(blobs.c.type, blobs.c.blob).where(
                blobs.c.scope == _p("scope"),
                blobs.c.thread_id == _p("thread_id"),
                blobs.c.checkpoint_ns == _p("checkpoint_ns"),
                blobs.c.channel == _p("channel"),
                blobs.c.version == _p("version"),
            ),
        )

    def writes_of(self) -> Compiled:
        return self.get(
            "writes_of",
            lambda: select(
                writes.c.task_path,
                writes.c.task_id,
                writes.c.idx,
                writes.c.channel,
                writes.c.type,
                writes.c.value,
            ).where(
                writes.c.scope == _p("scope"),
                writes.c.thread_id == _p("thread_id"),
                writes.c.checkpoint_ns == _p("checkpoint_ns"),
                writes.c.checkpoint_id == _p("checkpoint_id"),
            ),
        )

    def list_keys(
        self,
        *,
        thread: bool,
        ns: bool,
        checkpoint: bool,
        before: bool,
        cursor: bool,
        with_metadata: bool,
    ) -> Compiled:
        """Keys of checkpoints newest first (``checkpoint_id, thread_id, ns`` descending)."""

        def build() -> ClauseElement:
            order = (
                checkpoints.c.checkpoint_id,
                checkpoints.c.thread_id,
                checkpoints.c.checkpoint_ns,
            )
            columns = [*order, checkpoints.c.metadata_json] if with_metadata else list(order)
            query = select(*columns).where(checkpoints.c.scope == _p("scope"))
            if thread:
                query = query.where(checkpoints.c.thread_id == _p("thread_id"))
            if ns:
                query = query.where(checkpoints.c.checkpoint_ns == _p("checkpoint_ns"))
            if checkpoint:
                query = query.where(checkpoints.c.checkpoint_id == _p("checkpoint_id"))
            if before:
                query = query.where(checkpoints.c.checkpoint_id < _p("before"))
            if cursor:
                query = query.where(
                    tuple_(*order) < tuple_(_p("c_checkpoint_id"), _p("c_thread_id"), _p("c_ns"))
                )
            return query.order_by(*(c.desc() for c in order)).limit(_p("limit"))

        key = ("list_keys", thread, ns, checkpoint, before, cursor, with_metadata)
        return self.get(key, build)
