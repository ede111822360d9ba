"""The checkpoint store: typed blobs in SQLite or PostgreSQL through SQLAlchemy Core.

Theory of operation
-------------------
* **One writer path per database.** Every write request becomes a small
  function queued (bounded) to one writer thread. The writer takes whatever has
  queued up (at most ``max_batch``), runs it all in *one* transaction and
  commits once: group commit. Under load many requests share one fsync; at
  rest a request commits alone at once. If a grouped transaction fails, the
  writer rolls it back and runs each request in its own transaction, so one bad
  request fails alone. A request is acknowledged only after its commit
  returned, so an acknowledged write is on disk (SQLite ``synchronous=FULL``).
* **Reads never wait for writes.** Reads run on a pool of separate read
  connections (SQLite WAL readers see the last commit, PostgreSQL reads are
  ``REPEATABLE READ``), each read in one transaction for a consistent snapshot.
* **The store never deserializes a caller's value.** Checkpoints, channel
  values and writes arrive as ``(type, bytes)`` pairs and leave as they came.
  It parses only JSON it needs to answer queries (metadata for ``list``
  filters, channel versions to find blobs), which runs no caller code.
* **Idempotent writes.** ``put`` of an existing checkpoint id and
  ``put_writes`` of an existing ``(task_id, idx)`` change nothing (special
  channels with a negative ``idx`` are replaced, as in LangGraph's own
  savers), so a retried request is a no-op re-ack.

Every operation takes a ``scope`` (the caller's node id, or ``""`` for a shared
store) and touches only rows of that scope.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    create_engine,
    delete,
    event,
    select,
    tuple_,
)
from sqlalchemy.engine import URL, RowMapping, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.pool import ConnectionPoolEntry

from pilot_checkpoint_sqlite import _schema
from pilot_checkpoint_sqlite._options import StoreOptions
from pilot_checkpoint_sqlite._schema import blobs, checkpoints, writes
from pilot_checkpoint_sqlite.errors import (
    CheckpointConfigError,
    CheckpointError,
    CheckpointStoreError,
    CheckpointUsageError,
    StoreClosedError,
    StoreOverloadedError,
    StoreUnavailableError,
)

__all__ = ["CheckpointStore", "PutRecord", "WritesRecord", "open_store"]

logger = logging.getLogger("pilot_checkpoint_sqlite.store")

T = TypeVar("T")
TypedBlob = tuple[str, bytes]

_SCAN_BATCH = 256
_COPY_BATCH = 256


@dataclass(frozen=True, slots=True)
class PutRecord:
    """One ``put``: a checkpoint (without channel values), its metadata and new blobs."""

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    parent_checkpoint_id: str | None
    run_id: str | None
    checkpoint: TypedBlob
    metadata: TypedBlob
    metadata_json: str
    channel_versions: Mapping[str, str]
    blobs: Sequence[tuple[str, str, str, bytes]]
    """``(channel, version, type, bytes)`` of the channels new in this checkpoint."""


@dataclass(frozen=True, slots=True)
class WritesRecord:
    """One ``put_writes``: a task's writes ``(idx, channel, type, bytes)``."""

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    task_id: str
    task_path: str
    writes: Sequence[tuple[int, str, str, bytes]]


def _translate(exc: BaseException) -> CheckpointError:
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, OperationalError | DBAPIError) and getattr(
        exc, "connection_invalidated", False
    ):
        return StoreUnavailableError(f"database connection lost: {exc.orig}")
    if isinstance(exc, OperationalError):
        return StoreUnavailableError(f"database unavailable: {exc.orig}")
    if isinstance(exc, SQLAlchemyError):
        return CheckpointStoreError(f"database error: {exc}")
    return CheckpointStoreError(f"store failure: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- the writer


class _Op:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[Connection], Any]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


class _Writer:
    """One thread, one connection, group commit (see module docstring)."""

    def __init__(self, engine: Engine, *, max_batch: int, max_queue: int, name: str) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._queue: queue.Queue[_Op | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._lock = threading.Lock()
        self.batches = 0
        self.ops = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Connection], T]) -> concurrent.futures.Future[T]:
        op = _Op(fn)
        with self._lock:
            if self._closed:
                raise StoreClosedError("the checkpoint store is closed")
            try:
                self._queue.put_nowait(op)
            except queue.Full:
                raise StoreOverloadedError(
                    "checkpoint store write queue is full; retry later"
                ) from None
        return op.future

    def _run(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            batch = [op]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Op]) -> None:
        live = [op for op in batch if op.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches += 1
        self.ops += len(live)
        try:
            with self._engine.begin() as conn:
                results = [op.fn(conn) for op in live]
        except BaseException as exc:
            if len(live) == 1:
                live[0].future.set_exception(_translate(exc))
                return
            logger.debug("grouped write transaction failed (%s); retrying one by one", exc)
            for op in live:
                try:
                    with self._engine.begin() as conn:
                        result = op.fn(conn)
                except BaseException as one_exc:
                    op.future.set_exception(_translate(one_exc))
                else:
                    op.future.set_result(result)
            return
        for op, result in zip(live, results, strict=True):
            op.future.set_result(result)

    def close(self, timeout: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # The sentinel queues after every accepted request: they all commit first.
        self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)


# ---------------------------------------------------------------- engines


def _normalize_url(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise CheckpointConfigError(f"invalid database URL: {exc}") from exc
    backend = parsed.get_backend_name()
    driver = parsed.get_driver_name()
    if backend == "sqlite":
        if driver not in ("pysqlite", ""):
            raise CheckpointConfigError(f"unsupported SQLite driver {driver!r}; use sqlite:///path")
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file:"):
            raise CheckpointConfigError(
                "the SQLite store needs a file path (sqlite:///path/to/state.db): several "
                "connections share it, which an in-memory database cannot"
            )
        return parsed.set(drivername="sqlite+pysqlite")
    if backend == "postgresql":
        if driver == "psycopg2":
            raise CheckpointConfigError("use postgresql+psycopg:// (psycopg 3)")
        return parsed.set(drivername="postgresql+psycopg")
    raise CheckpointConfigError(
        f"unsupported database {backend!r}; use sqlite:///path or postgresql+psycopg://..."
    )


def _create_sqlite_file(path: str) -> None:
    # A new database file (and its WAL) holds callers' state: owner-only.
    if not os.path.exists(path):
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


def _sqlite_engine(url: URL, options: StoreOptions, *, writer: bool) -> Engine:
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": options.busy_timeout},
        pool_size=1 if writer else options.read_pool_size,
        max_overflow=0,
        pool_timeout=options.busy_timeout,
    )
    synchronous = options.sqlite_synchronous
    busy_ms = int(options.busy_timeout * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:  # pyright: ignore[reportUnusedFunction]
        # Let SQLAlchemy's "begin" event below own transactions (the driver's
        # implicit BEGIN would not start one for SELECTs).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA foreign_keys=OFF")
        finally:
            cursor.close()

    begin_sql = "BEGIN IMMEDIATE" if writer else "BEGIN"

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:  # pyright: ignore[reportUnusedFunction]
        conn.exec_driver_sql(begin_sql)

    return engine


def _postgres_engine(url: URL, options: StoreOptions, *, writer: bool) -> Engine:
    try:
        return create_engine(
            url,
            pool_size=1 if writer else options.read_pool_size,
            max_overflow=0,
            pool_timeout=options.busy_timeout,
            pool_pre_ping=True,
            isolation_level="READ COMMITTED" if writer else "REPEATABLE READ",
        )
    except (NoSuchModuleError, ImportError) as exc:
        raise CheckpointConfigError(
            "PostgreSQL needs psycopg 3: pip install 'pilot-checkpoint-sqlite[postgres]'"
        ) from exc


# ---------------------------------------------------------------- the store


class CheckpointStore:
    """Checkpoints, channel blobs and pending writes in one database.

    Build with :func:`open_store` (async) or :meth:`CheckpointStore.open`
    (sync). All query methods are coroutines usable from any event loop (the
    work runs on the store's own threads); they raise only
    ``pilot_checkpoint_sqlite.errors`` exceptions.
    """

    def __init__(self, url: URL, options: StoreOptions, writer: Engine, reader: Engine) -> None:
        self.url = url
        self.options = options
        self.dialect = writer.dialect.name
        self._writer_engine = writer
        self._reader_engine = reader
        self.schema_version = 0
        self._writer = _Writer(
            writer,
            max_batch=options.max_batch,
            max_queue=options.max_queue,
            name="pilot-ckpt-writer",
        )
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=options.read_pool_size, thread_name_prefix="pilot-ckpt-reader"
        )
        self._closed = False

    # -------------------------------------------------------- lifecycle

    @classmethod
    def open(cls, url: str | URL, options: StoreOptions | None = None) -> CheckpointStore:
        """Open (creating and migrating as needed) the store at ``url``. Blocking.

        Args:
            url: ``sqlite:///path/to/file.db`` or ``postgresql+psycopg://user@host/db``.
            options: See :class:`StoreOptions`.

        Raises:
            CheckpointConfigError: unsupported or malformed URL.
            StoreUnavailableError: the database cannot be reached or opened.
            StoreSchemaError: the database schema is newer than this code.
        """
        options = options if options is not None else StoreOptions()
        parsed = _normalize_url(url)
        if parsed.get_backend_name() == "sqlite":
            assert parsed.database is not None
            try:
                _create_sqlite_file(parsed.database)
            except OSError as exc:
                raise StoreUnavailableError(f"cannot create {parsed.database}: {exc}") from exc
            writer = _sqlite_engine(parsed, options, writer=True)
            reader = _sqlite_engine(parsed, options, writer=False)
        else:
            writer = _postgres_engine(parsed, options, writer=True)
            reader = _postgres_engine(parsed, options, writer=False)
        try:
            with writer.begin() as conn:
                version = _schema.migrate(conn)
        except CheckpointError:
            writer.dispose()
            reader.dispose()
            raise
        except Exception as exc:
            writer.dispose()
            reader.dispose()
            raise _translate(exc) from exc
        store = cls(parsed, options, writer, reader)
        store.schema_version = version
        return store

    def close(self, timeout: float = 30.0) -> None:
        """Commit every accepted write, then release connections and threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._writer.close(timeout)
        self._readers.shutdown(wait=True, cancel_futures=True)
        self._writer_engine.dispose()
        self._reader_engine.dispose()

    async def aclose(self, grace: float = 30.0) -> None:
        """Async twin of :meth:`close` (``grace``: seconds to commit queued writes)."""
        await asyncio.to_thread(self.close, grace)

    @property
    def stats(self) -> dict[str, int]:
        """Write transactions committed and requests they carried (group commit ratio)."""
        return {"write_transactions": self._writer.batches, "write_requests": self._writer.ops}

    # -------------------------------------------------------- plumbing

    async def _write(self, fn: Callable[[Connection], T]) -> T:
        if self._closed:
            raise StoreClosedError("the checkpoint store is closed")
        return await asyncio.wrap_future(self._writer.submit(fn))

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        if self._closed:
            raise StoreClosedError("the checkpoint store is closed")

        def _run() -> T:
            try:
                with self._reader_engine.connect() as conn, conn.begin():
                    return fn(conn)
            except CheckpointError:
                raise
            except Exception as exc:
                raise _translate(exc) from exc

        try:
            future = self._readers.submit(_run)
        except RuntimeError:
            raise StoreClosedError("the checkpoint store is closed") from None
        return await asyncio.wrap_future(future)

    def _insert(self, table: Any) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    # -------------------------------------------------------- writes

    async def put(self, scope: str, record: PutRecord) -> None:
        """Store a checkpoint; a no-op if ``(scope, thread, ns, checkpoint_id)`` exists."""
        size = len(record.checkpoint[1]) + sum(len(b[3]) for b in record.blobs)
        row = {
            "scope": scope,
            "thread_id": record.thread_id,
            "checkpoint_ns": record.checkpoint_ns,
            "checkpoint_id": record.checkpoint_id,
            "parent_checkpoint_id": record.parent_checkpoint_id,
            "run_id": record.run_id,
            "created_at": time.time(),
            "checkpoint_type": record.checkpoint[0],
            "checkpoint": record.checkpoint[1],
            "metadata_type": record.metadata[0],
            "metadata_blob": record.metadata[1],
            "metadata_json": record.metadata_json,
            "channel_versions": json.dumps(dict(record.channel_versions), separators=(",", ":")),
            "size": size,
        }
        blob_rows = [
            {
                "scope": scope,
                "thread_id": record.thread_id,
                "checkpoint_ns": record.checkpoint_ns,
                "channel": channel,
                "version": version,
                "type": kind,
                "blob": data,
            }
            for channel, version, kind, data in record.blobs
        ]
        checkpoint_stmt = self._insert(checkpoints).on_conflict_do_nothing()
        blob_stmt = self._insert(blobs).on_conflict_do_nothing() if blob_rows else None

        def _op(conn: Connection) -> None:
            if blob_stmt is not None:
                conn.execute(blob_stmt, blob_rows)
            conn.execute(checkpoint_stmt, row)

        await self._write(_op)

    async def put_writes(self, scope: str, record: WritesRecord) -> None:
        """Store a task's writes; existing ``(task_id, idx)`` are kept (special ones replaced)."""
        if not record.writes:
            return
        rows = [
            {
                "scope": scope,
                "thread_id": record.thread_id,
                "checkpoint_ns": record.checkpoint_ns,
                "checkpoint_id": record.checkpoint_id,
                "task_id": record.task_id,
                "idx": idx,
                "channel": channel,
                "type": kind,
                "value": data,
                "task_path": record.task_path,
            }
            for idx, channel, kind, data in record.writes
        ]
        stmt = self._insert(writes)
        if all(w[0] < 0 for w in record.writes):
            stmt = stmt.on_conflict_do_update(
                index_elements=[c.name for c in writes.primary_key.columns],
                set_={
                    "channel": stmt.excluded.channel,
                    "type": stmt.excluded.type,
                    "value": stmt.excluded.value,
                    "task_path": stmt.excluded.task_path,
                },
            )
        else:
            stmt = stmt.on_conflict_do_nothing()

        def _op(conn: Connection) -> None:
            conn.execute(stmt, rows)

        await self._write(_op)

    async def delete_thread(self, scope: str, thread_id: str) -> None:
        """Delete every row of a thread (all namespaces). Idempotent."""

        def _op(conn: Connection) -> None:
            for table in (writes, blobs, checkpoints):
                conn.execute(
                    delete(table).where(table.c.scope == scope, table.c.thread_id == thread_id)
                )

        await self._write(_op)

    async def copy_thread(self, scope: str, source: str, target: str) -> None:
        """Copy every checkpoint, blob and write of ``source`` to ``target``.

        Rows already on the target are kept, so a repeated copy is a no-op.
        """
        if source == target:
            return
        tables = (
            (checkpoints, ("checkpoint_ns", "checkpoint_id")),
            (blobs, ("checkpoint_ns", "channel", "version")),
            (writes, ("checkpoint_ns", "checkpoint_id", "task_id", "idx")),
        )

        def _op(conn: Connection) -> None:
            for table, keys in tables:
                stmt = self._insert(table).on_conflict_do_nothing()
                key_cols = [table.c[k] for k in keys]
                last: tuple[Any, ...] | None = None
                while True:
                    query = select(table).where(table.c.scope == scope, table.c.thread_id == source)
                    if last is not None:
                        query = query.where(tuple_(*key_cols) > tuple_(*last))
                    page = (
                        conn.execute(query.order_by(*key_cols).limit(_COPY_BATCH)).mappings().all()
                    )
                    if not page:
                        break
                    conn.execute(stmt, [{**dict(r), "thread_id": target} for r in page])
                    last = tuple(page[-1][k] for k in keys)
                    if len(page) < _COPY_BATCH:
                        break

        await self._write(_op)

    async def delete_for_runs(self, scope: str, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints created by ``run_ids`` and their writes. Idempotent."""
        if not run_ids:
            return
        ids = list(dict.fromkeys(run_ids))

        def _op(conn: Connection) -> None:
            found = conn.execute(
                select(
                    checkpoints.c.thread_id,
                    checkpoints.c.checkpoint_ns,
                    checkpoints.c.checkpoint_id,
                ).where(checkpoints.c.scope == scope, checkpoints.c.run_id.in_(ids))
            ).all()
            self._delete_checkpoints(conn, scope, [(r[0], r[1], r[2]) for r in found])

        await self._write(_op)

    async def prune(self, scope: str, thread_ids: Sequence[str], strategy: str) -> None:
        """``keep_latest``: keep the newest checkpoint per namespace; ``delete``: drop all."""
        if strategy not in ("keep_latest", "delete"):
            raise CheckpointUsageError(f"unknown prune strategy {strategy!r}")
        ids = list(dict.fromkeys(thread_ids))
        if not ids:
            return

        def _op(conn: Connection) -> None:
            if strategy == "delete":
                for table in (writes, blobs, checkpoints):
                    conn.execute(
                        delete(table).where(table.c.scope == scope, table.c.thread_id.in_(ids))
                    )
                return
            doomed: list[tuple[str, str, str]] = []
            for thread_id in ids:
                rows = conn.execute(
                    select(checkpoints.c.checkpoint_ns, checkpoints.c.checkpoint_id).where(
                        checkpoints.c.scope == scope, checkpoints.c.thread_id == thread_id
                    )
                ).all()
                latest: dict[str, str] = {}
                for ns, cid in rows:
                    if ns not in latest or cid > latest[ns]:
                        latest[ns] = cid
                doomed.extend((thread_id, ns, cid) for ns, cid in rows if latest[ns] != cid)
            self._delete_checkpoints(conn, scope, doomed)

        await self._write(_op)

    async def apply_retention(self, now: float | None = None) -> int:
        """Apply the configured :class:`RetentionPolicy` to every scope.

        The newest checkpoint of every thread namespace is always kept.

        Returns:
            How many checkpoints were deleted.
        """
        policy = self.options.retention
        if not policy.enabled:
            return 0
        cutoff = (
            None
            if policy.max_age_seconds is None
            else (now or time.time()) - policy.max_age_seconds
        )
        keep = policy.max_checkpoints_per_thread

        def _op(conn: Connection) -> int:
            rows = conn.execute(
                select(
                    checkpoints.c.scope,
                    checkpoints.c.thread_id,
                    checkpoints.c.checkpoint_ns,
                    checkpoints.c.checkpoint_id,
                    checkpoints.c.created_at,
                )
            ).all()
            groups: dict[tuple[str, str, str], list[tuple[str, float]]] = {}
            for scope, thread_id, ns, cid, created in rows:
                groups.setdefault((scope, thread_id, ns), []).append((cid, created))
            doomed: dict[str, list[tuple[str, str, str]]] = {}
            for (scope, thread_id, ns), items in groups.items():
                items.sort(reverse=True)  # newest first
                for rank, (cid, created) in enumerate(items):
                    if rank == 0:
                        continue
                    if (keep is not None and rank >= keep) or (
                        cutoff is not None and created < cutoff
                    ):
                        doomed.setdefault(scope, []).append((thread_id, ns, cid))
            for scope, keys in doomed.items():
                self._delete_checkpoints(conn, scope, keys)
            return sum(len(v) for v in doomed.values())

        return await self._write(_op)

    def _delete_checkpoints(
        self, conn: Connection, scope: str, keys: Sequence[tuple[str, str, str]]
    ) -> None:
        if not keys:
            return
        for start in range(0, len(keys), _COPY_BATCH):
            chunk = [tuple(k) for k in keys[start : start + _COPY_BATCH]]
            for table in (writes, checkpoints):
                conn.execute(
                    delete(table).where(
                        table.c.scope == scope,
                        tuple_(table.c.thread_id, table.c.checkpoint_ns, table.c.checkpoint_id).in_(
                            chunk
                        ),
                    )
                )
        for thread_id, ns in dict.fromkeys((k[0], k[1]) for k in keys):
            self._collect_blobs(conn, scope, thread_id, ns)

    def _collect_blobs(self, conn: Connection, scope: str, thread_id: str, ns: str) -> None:
        """Delete the blobs no remaining checkpoint of ``(thread, ns)`` refers to."""
        referenced: set[tuple[str, str]] = set()
        for (versions_json,) in conn.execute(
            select(checkpoints.c.channel_versions).where(
                checkpoints.c.scope == scope,
                checkpoints.c.thread_id == thread_id,
                checkpoints.c.checkpoint_ns == ns,
            )
        ):
            referenced.update(_versions(versions_json).items())
        stored = conn.execute(
            select(blobs.c.channel, blobs.c.version).where(
                blobs.c.scope == scope, blobs.c.thread_id == thread_id, blobs.c.checkpoint_ns == ns
            )
        ).all()
        orphans = [(c, v) for c, v in stored if (c, v) not in referenced]
        for start in range(0, len(orphans), _COPY_BATCH):
            conn.execute(
                delete(blobs).where(
                    blobs.c.scope == scope,
                    blobs.c.thread_id == thread_id,
                    blobs.c.checkpoint_ns == ns,
                    tuple_(blobs.c.channel, blobs.c.version).in_(
                        orphans[start : start + _COPY_BATCH]
                    ),
                )
            )

    # -------------------------------------------------------- reads

    async def get_tuple(
        self, scope: str, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> dict[str, Any] | None:
        """The checkpoint row (latest of the namespace without an id), or ``None``."""

        def _op(conn: Connection) -> dict[str, Any] | None:
            query = select(checkpoints).where(
                checkpoints.c.scope == scope,
                checkpoints.c.thread_id == thread_id,
                checkpoints.c.checkpoint_ns == checkpoint_ns,
            )
            if checkpoint_id is not None:
                query = query.where(checkpoints.c.checkpoint_id == checkpoint_id)
            else:
                query = query.order_by(checkpoints.c.checkpoint_id.desc()).limit(1)
            row = conn.execute(query).mappings().first()
            return None if row is None else self._full_row(conn, scope, row)

        return await self._read(_op)

    async def list(
        self,
        scope: str,
        *,
        thread_id: str | None,
        checkpoint_ns: str | None,
        checkpoint_id: str | None,
        before: str | None,
        filter_json: str | None,
        limit: int,
        cursor: Sequence[str] | None,
    ) -> dict[str, Any]:
        """One page of checkpoints, newest first: ``{"rows": [...], "cursor": next|None}``.

        The store scans a bounded number of rows per call; ``cursor`` continues
        where the previous page stopped.
        """
        wanted: dict[str, Any] = json.loads(filter_json) if filter_json else {}
        order_cols = (
            checkpoints.c.checkpoint_id,
            checkpoints.c.thread_id,
            checkpoints.c.checkpoint_ns,
        )

        def _op(conn: Connection) -> dict[str, Any]:
            conditions: list[Any] = [checkpoints.c.scope == scope]
            if thread_id is not None:
                conditions.append(checkpoints.c.thread_id == thread_id)
            if checkpoint_ns is not None:
                conditions.append(checkpoints.c.checkpoint_ns == checkpoint_ns)
            if checkpoint_id is not None:
                conditions.append(checkpoints.c.checkpoint_id == checkpoint_id)
            if before is not None:
                conditions.append(checkpoints.c.checkpoint_id < before)
            position = tuple(cursor) if cursor else None
            matches: list[Any] = []
            scanned = 0
            while True:
                query = select(*order_cols, checkpoints.c.metadata_json).where(and_(*conditions))
                if position is not None:
                    query = query.where(tuple_(*order_cols) < tuple_(*position))
                batch = conn.execute(
                    query.order_by(*(c.desc() for c in order_cols)).limit(_SCAN_BATCH)
                ).all()
                for cid, tid, ns, md_json in batch:
                    position = (cid, tid, ns)
                    scanned += 1
                    if wanted and not _matches(md_json, wanted):
                        continue
                    matches.append((tid, ns, cid))
                    if len(matches) >= limit:
                        break
                if len(matches) >= limit:
                    next_cursor: list[str] | None = list(position) if position else None
                    break
                if len(batch) < _SCAN_BATCH:
                    next_cursor = None
                    break
                if scanned >= 4 * _SCAN_BATCH:
                    next_cursor = list(position) if position else None
                    break
            out: list[dict[str, Any]] = []
            for tid, ns, cid in matches:
                row = (
                    conn.execute(
                        select(checkpoints).where(
                            checkpoints.c.scope == scope,
                            checkpoints.c.thread_id == tid,
                            checkpoints.c.checkpoint_ns == ns,
                            checkpoints.c.checkpoint_id == cid,
                        )
                    )
                    .mappings()
                    .first()
                )
                if row is not None:
                    out.append(self._full_row(conn, scope, row))
            return {"rows": out, "cursor": next_cursor}

        return await self._read(_op)

    async def delta_history(
        self,
        scope: str,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str | None,
        channels: Sequence[str],
    ) -> dict[str, Any]:
        """Per channel, the writes along the parent chain and the nearest stored value.

        Mirrors ``BaseCheckpointSaver.get_delta_channel_history``: the walk
        starts at the target's parent; a channel stops at the nearest ancestor
        holding a stored value (its ``seed``), whose own writes still count.
        Writes are returned oldest first, each checkpoint's in
        ``writes_sort_key`` order.
        """

        def _op(conn: Connection) -> dict[str, Any]:
            collected: dict[str, list[list[Any]]] = {c: [] for c in channels}
            seeds: dict[str, list[Any]] = {}
            remaining = set(channels)
            base = select(
                checkpoints.c.checkpoint_id,
                checkpoints.c.parent_checkpoint_id,
                checkpoints.c.channel_versions,
            ).where(
                checkpoints.c.scope == scope,
                checkpoints.c.thread_id == thread_id,
                checkpoints.c.checkpoint_ns == checkpoint_ns,
            )
            if checkpoint_id is not None:
                target = conn.execute(
                    base.where(checkpoints.c.checkpoint_id == checkpoint_id)
                ).first()
            else:
                target = conn.execute(
                    base.order_by(checkpoints.c.checkpoint_id.desc()).limit(1)
                ).first()
            current: str | None = None if target is None else target[1]
            seen: set[str] = set()
            while current is not None and remaining and current not in seen:
                seen.add(current)
                row = conn.execute(base.where(checkpoints.c.checkpoint_id == current)).first()
                if row is None:
                    break
                versions = _versions(row[2])
                here = self._load_blobs(
                    conn,
                    scope,
                    thread_id,
                    checkpoint_ns,
                    {ch: versions[ch] for ch in remaining if ch in versions},
                )
                for task_id, channel, kind, data in reversed(
                    self._load_writes(conn, scope, thread_id, checkpoint_ns, current)
                ):
                    if channel in remaining:
                        collected[channel].append([task_id, kind, data])
                for channel, kind, data in here:
                    seeds[channel] = [kind, data]
                    remaining.discard(channel)
                current = row[1]
            return {
                ch: {"writes": list(reversed(collected[ch])), "seed": seeds.get(ch)}
                for ch in channels
            }

        return await self._read(_op)

    async def info(self) -> dict[str, Any]:
        """Schema version, dialect and group-commit counters."""
        return {
            "schema_version": self.schema_version,
            "dialect": self.dialect,
            "shared": self.options.shared,
            **self.stats,
        }

    # -------------------------------------------------------- row assembly

    def _full_row(self, conn: Connection, scope: str, row: RowMapping) -> dict[str, Any]:
        thread_id = row["thread_id"]
        ns = row["checkpoint_ns"]
        cid = row["checkpoint_id"]
        return {
            "thread_id": thread_id,
            "checkpoint_ns": ns,
            "checkpoint_id": cid,
            "parent_checkpoint_id": row["parent_checkpoint_id"],
            "checkpoint": [row["checkpoint_type"], bytes(row["checkpoint"])],
            "metadata": [row["metadata_type"], bytes(row["metadata_blob"])],
            "blobs": [
                list(b)
                for b in self._load_blobs(
                    conn, scope, thread_id, ns, _versions(row["channel_versions"])
                )
            ],
            "writes": [list(w) for w in self._load_writes(conn, scope, thread_id, ns, cid)],
        }

    def _load_blobs(
        self, conn: Connection, scope: str, thread_id: str, ns: str, versions: Mapping[str, str]
    ) -> list[tuple[str, str, bytes]]:
        if not versions:
            return []
        pairs = list(versions.items())
        out: list[tuple[str, str, bytes]] = []
        for start in range(0, len(pairs), _COPY_BATCH):
            out.extend(
                (channel, kind, bytes(data))
                for channel, kind, data in conn.execute(
                    select(blobs.c.channel, blobs.c.type, blobs.c.blob).where(
                        blobs.c.scope == scope,
                        blobs.c.thread_id == thread_id,
                        blobs.c.checkpoint_ns == ns,
                        tuple_(blobs.c.channel, blobs.c.version).in_(
                            pairs[start : start + _COPY_BATCH]
                        ),
                    )
                )
            )
        return out

    def _load_writes(
        self, conn: Connection, scope: str, thread_id: str, ns: str, checkpoint_id: str
    ) -> list[tuple[str, str, str, bytes]]:
        rows = conn.execute(
            select(
                writes.c.task_path,
                writes.c.task_id,
                writes.c.idx,
                writes.c.channel,
                writes.c.type,
                writes.c.value,
            ).where(
                writes.c.scope == scope,
                writes.c.thread_id == thread_id,
                writes.c.checkpoint_ns == ns,
                writes.c.checkpoint_id == checkpoint_id,
            )
        ).all()
        # writes_sort_key order, computed here (not in SQL) so it is the same
        # bytewise string order on every database and collation.
        ordered = sorted(rows, key=lambda r: (r[0], r[1], r[2]))
        return [(r[1], r[3], r[4], bytes(r[5])) for r in ordered]


def _versions(raw: str) -> dict[str, str]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in cast(dict[Any, Any], value).items()}


def _matches(metadata_json: str, wanted: Mapping[str, Any]) -> bool:
    try:
        md = json.loads(metadata_json)
    except ValueError:
        return False
    if not isinstance(md, dict):
        return False
    md_map = cast(dict[str, Any], md)
    return all(md_map.get(key) == value for key, value in wanted.items())


async def open_store(url: str | URL, options: StoreOptions | None = None) -> CheckpointStore:
    """Open the store at ``url`` without blocking the loop (see :meth:`CheckpointStore.open`)."""
    return await asyncio.to_thread(CheckpointStore.open, url, options)
