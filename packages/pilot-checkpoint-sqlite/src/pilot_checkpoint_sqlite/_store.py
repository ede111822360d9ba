"""The checkpoint store: typed blobs in SQLite or PostgreSQL.

Theory of operation
-------------------
* **One writer path per database.** Every write request becomes a small
  function queued (bounded) to one writer thread, which owns one connection.
  The writer takes whatever has queued up (at most ``max_batch``), runs it all
  in *one* transaction and commits once: group commit. Under load many requests
  share one fsync; at rest a request commits alone at once. If a grouped
  transaction fails, the writer rolls it back and runs each request in its own
  transaction, so one bad request fails alone. A request is acknowledged only
  after its commit returned, so an acknowledged write is on disk (SQLite
  ``synchronous=FULL``).
* **Reads never wait for writes.** Reads run on a pool of reader threads, each
  with its own connection (SQLite WAL readers see the last commit; PostgreSQL
  reads are ``REPEATABLE READ READ ONLY``), one transaction per read for a
  consistent snapshot.
* **The store never deserializes a caller's value.** Checkpoints, channel
  values and writes arrive as ``(type, bytes)`` pairs and leave as they came.
  It parses only JSON it needs to answer queries (metadata for ``list``
  filters, channel versions to find blobs), which runs no caller code.
* **Idempotent writes.** ``put`` of an existing checkpoint id and
  ``put_writes`` of an existing ``(task_id, idx)`` change nothing (special
  channels with a negative ``idx`` are replaced, as in LangGraph's own
  savers), so a retried request is a no-op re-ack.

SQLAlchemy owns URLs, pools, dialects and migrations; statements are SQLAlchemy
Core compiled once per dialect and run on the driver cursor (see ``_sql.py``
for why). Connections are in driver autocommit mode and every transaction is
explicit (``BEGIN`` ... ``COMMIT``).

Every operation takes a ``scope`` (the caller's node id, or ``""`` for a shared
store) and touches only rows of that scope.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from pilot_checkpoint_sqlite import _schema
from pilot_checkpoint_sqlite._options import StoreOptions
from pilot_checkpoint_sqlite._schema import blobs, checkpoints, writes
from pilot_checkpoint_sqlite._sql import Compiled, Statements
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
_MAX_SCAN = 4 * _SCAN_BATCH
_COPY_BATCH = 256

RETENTION_CLOCK_MARGIN = 60.0
"""Seconds a retention pass looks back before the previous pass for new checkpoints."""


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


# ---------------------------------------------------------------- connections


class _Db:
    """One pooled connection, used by one thread at a time, with explicit transactions."""

    def __init__(self, engine: Engine, statements: Statements) -> None:
        self._engine = engine
        self.sql = statements
        self._raw: Any = None
        self._cursor: Any = None
        self._dbapi: Any = engine.dialect.loaded_dbapi
        # Inside a pipelined read transaction: every run() is a SELECT whose
        # rows are fetched explicitly (a pipelined cursor has no description
        # until its result is fetched).
        self._piped_reads = False

    def _ensure(self) -> Any:
        if self._cursor is None:
            raw = self._engine.raw_connection()
            driver = raw.driver_connection
            if self.sql.name == "postgresql":
                cast(Any, driver).autocommit = True
            self._raw = raw
            self._cursor = cast(Any, driver).cursor()
        return self._cursor

    def run(self, statement: Compiled, values: Mapping[str, Any]) -> list[Any]:
        cursor = self._ensure()
        cursor.execute(statement.sql, statement.params(values))
        if self._piped_reads:
            return cursor.fetchall()
        if cursor.description is None:
            return []
        return cursor.fetchall()

    def run_many(self, statement: Compiled, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            self._ensure().executemany(statement.sql, [statement.params(r) for r in rows])

    def run_batch(self, items: Sequence[tuple[Compiled, Mapping[str, Any]]]) -> list[list[Any]]:
        """Run independent statements; their rows, in order.

        On PostgreSQL they travel as one pipeline (one round trip for all, each
        on its own cursor) inside the current transaction; elsewhere they run
        one after another.
        """
        if self.sql.name != "postgresql" or len(items) < 2:
            return [self.run(statement, values) for statement, values in items]
        self._ensure()
        conn = self._raw.driver_connection
        cursors = [conn.cursor() for _ in items]
        try:
            if self._piped_reads:
                # Already in a pipeline: queue them all, then fetch (one flush).
                for cursor, (statement, values) in zip(cursors, items, strict=True):
                    cursor.execute(statement.sql, statement.params(values))
                return [c.fetchall() for c in cursors]
            with conn.pipeline():
                for cursor, (statement, values) in zip(cursors, items, strict=True):
                    cursor.execute(statement.sql, statement.params(values))
            return [c.fetchall() if c.description is not None else [] for c in cursors]
        finally:
            for cursor in cursors:
                cursor.close()

    def send(self, statement: Compiled, values: Mapping[str, Any]) -> None:
        """Execute a statement that returns no rows, without reading a result.

        Inside a pipelined transaction (see :meth:`transaction`) this does not
        wait for the server: the statement travels with the rest of the batch.
        """
        self._ensure().execute(statement.sql, statement.params(values))

    def execute(self, sql: str) -> None:
        self._ensure().execute(sql)

    def query(self, sql: str) -> list[Any]:
        cursor = self._ensure()
        cursor.execute(sql)
        return cursor.fetchall()

    def rollback_quietly(self) -> None:
        if self._cursor is None:
            return
        try:
            self._cursor.execute("ROLLBACK")
        except Exception:
            self.invalidate()

    def transaction(
        self,
        begin: str,
        fn: Callable[[_Db], T],
        *,
        pipeline: bool = False,
        reads: bool = False,
    ) -> T:
        """Run ``fn`` in one transaction; translate driver errors.

        ``pipeline`` (PostgreSQL only; ``fn`` must only :meth:`send` and
        :meth:`run_many`, never read rows): ``BEGIN``, every statement and
        ``COMMIT`` go to the server in one pipeline, one round trip for the
        whole transaction instead of one per statement. The server still runs
        them in order in one transaction; an error in any of them aborts it
        and surfaces here, before the transaction is reported committed.

        ``reads`` (PostgreSQL only; ``fn`` must only :meth:`run` SELECTs and
        :meth:`run_batch`): the transaction runs in a pipeline too; each
        ``run`` fetches its rows (one round trip, ``BEGIN`` riding along with
        the first), and ``COMMIT`` goes with the pipeline's end.
        """
        try:
            try:
                if (pipeline or reads) and self.sql.name == "postgresql":
                    self._ensure()
                    with self._raw.driver_connection.pipeline():
                        self._piped_reads = reads
                        try:
                            self.execute(begin)
                            result = fn(self)
                            self.execute("COMMIT")
                        finally:
                            self._piped_reads = False
                else:
                    self.execute(begin)
                    result = fn(self)
                    self.execute("COMMIT")
            except BaseException:
                self.rollback_quietly()
                raise
            return result
        except CheckpointError:
            raise
        except Exception as exc:
            raise self.translate(exc) from exc

    def translate(self, exc: BaseException) -> CheckpointError:
        dbapi = self._dbapi
        if dbapi is not None and isinstance(exc, dbapi.OperationalError | dbapi.InterfaceError):
            # A connection that failed this way may be dead: get a fresh one next time.
            self.invalidate()
            return StoreUnavailableError(f"database unavailable: {exc}")
        if dbapi is not None and isinstance(exc, dbapi.Error):
            return CheckpointStoreError(f"database error: {exc}")
        if isinstance(exc, SQLAlchemyError):
            return StoreUnavailableError(f"database unavailable: {exc}")
        return CheckpointStoreError(f"store failure: {type(exc).__name__}: {exc}")

    def invalidate(self) -> None:
        raw, self._raw, self._cursor = self._raw, None, None
        if raw is not None:
            # Already broken; dropping it is all that is left to do.
            with contextlib.suppress(Exception):
                raw.invalidate()

    def close(self) -> None:
        raw, self._raw, self._cursor = self._raw, None, None
        if raw is not None:
            with contextlib.suppress(Exception):  # closing at shutdown must not fail
                raw.close()


# ---------------------------------------------------------------- the writer


class _Op:
    __slots__ = ("blind", "fn", "future")

    def __init__(self, fn: Callable[[_Db], Any], *, blind: bool = False) -> None:
        self.fn = fn
        self.blind = blind
        """``fn`` only sends statements and reads nothing back: it may be pipelined."""
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


class _Writer:
    """One thread, one connection, group commit (see module docstring)."""

    def __init__(self, db: _Db, *, max_batch: int, max_queue: int, name: str) -> None:
        self._db = db
        self._begin = db.sql.begin_write()
        self._max_batch = max_batch
        self._queue: queue.Queue[_Op | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._lock = threading.Lock()
        self.batches = 0
        self.ops = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[[_Db], T], *, blind: bool = False
    ) -> concurrent.futures.Future[T]:
        op = _Op(fn, blind=blind)
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

    def queued(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        try:
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
        finally:
            self._db.close()

    def _commit(self, batch: list[_Op]) -> None:
        live = [op for op in batch if op.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches += 1
        self.ops += len(live)

        def _all(db: _Db) -> list[Any]:
            return [op.fn(db) for op in live]

        # A batch of writes that read nothing back (puts, pending writes) goes
        # to PostgreSQL as one pipeline: one round trip per transaction.
        pipeline = all(op.blind for op in live)
        try:
            results = self._db.transaction(self._begin, _all, pipeline=pipeline)
        except BaseException as exc:
            if len(live) == 1:
                live[0].future.set_exception(self._as_error(exc))
                return
            logger.debug("grouped write transaction failed (%s); retrying one by one", exc)
            for op in live:
                try:
                    result = self._db.transaction(self._begin, op.fn, pipeline=op.blind)
                except BaseException as one_exc:
                    op.future.set_exception(self._as_error(one_exc))
                else:
                    op.future.set_result(result)
            return
        for op, result in zip(live, results, strict=True):
            op.future.set_result(result)

    def _as_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, CheckpointError):
            return exc
        if isinstance(exc, Exception):
            return self._db.translate(exc)
        return exc

    def close(self, timeout: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # The sentinel queues after every accepted request: they all commit first.
        self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)


class _Readers:
    """Reader threads, each with its own connection, fed by one bounded queue."""

    def __init__(self, engine: Engine, statements: Statements, size: int, max_queue: int) -> None:
        self._begin = statements.begin_read()
        self._queue: queue.Queue[_Op | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._closed = False
        self._dbs = [_Db(engine, statements) for _ in range(size)]
        self._threads = [
            threading.Thread(
                target=self._run, args=(db,), name=f"pilot-ckpt-reader-{i}", daemon=True
            )
            for i, db in enumerate(self._dbs)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[_Db], T]) -> concurrent.futures.Future[T]:
        op = _Op(fn)
        with self._lock:
            if self._closed:
                raise StoreClosedError("the checkpoint store is closed")
            try:
                self._queue.put_nowait(op)
            except queue.Full:
                raise StoreOverloadedError(
                    "checkpoint store read queue is full; retry later"
                ) from None
        return op.future

    def _run(self, db: _Db) -> None:
        try:
            while True:
                op = self._queue.get()
                if op is None:
                    return
                if not op.future.set_running_or_notify_cancel():
                    continue
                try:
                    result = db.transaction(self._begin, op.fn, reads=True)
                except BaseException as exc:
                    op.future.set_exception(
                        exc if isinstance(exc, Exception) else db.translate(exc)
                    )
                else:
                    op.future.set_result(result)
        finally:
            db.close()

    def close(self, timeout: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._threads:
            self._queue.put(None, timeout=timeout)
        for thread in self._threads:
            thread.join(timeout)


class _Relay:
    """Hands results from the store's threads to one event loop, one wake-up per burst.

    ``asyncio.wrap_future`` wakes the loop once per result (a self-pipe write
    and a GIL hand-over each); a group commit resolves dozens of requests at
    once, so the relay queues results and schedules one drain while one is
    pending.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[concurrent.futures.Future[Any], asyncio.Future[Any]]] = []
        self._scheduled = False

    def watch(self, cfut: concurrent.futures.Future[T]) -> asyncio.Future[T]:
        afut: asyncio.Future[T] = self._loop.create_future()

        def _on_cancel(done: asyncio.Future[T]) -> None:
            if done.cancelled():
                cfut.cancel()  # dropped if not started yet

        afut.add_done_callback(_on_cancel)
        cfut.add_done_callback(lambda f: self._push(f, afut))
        return afut

    def _push(self, cfut: concurrent.futures.Future[Any], afut: asyncio.Future[Any]) -> None:
        with self._lock:
            self._ready.append((cfut, afut))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
            self._scheduled = False
        for cfut, afut in ready:
            if afut.done():
                continue
            if cfut.cancelled():
                afut.cancel()
                continue
            exc = cfut.exception()
            if exc is not None:
                afut.set_exception(exc)
            else:
                afut.set_result(cfut.result())


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


def _sqlite_engine(url: URL, options: StoreOptions, *, pool_size: int) -> Engine:
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": options.busy_timeout},
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=options.busy_timeout,
    )
    synchronous = options.sqlite_synchronous
    busy_ms = int(options.busy_timeout * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:  # pyright: ignore[reportUnusedFunction]
        # Driver autocommit: every transaction is an explicit BEGIN ... COMMIT.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:  # pyright: ignore[reportUnusedFunction]
        # Only migrations use SQLAlchemy transactions; make them real ones.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _postgres_engine(url: URL, options: StoreOptions, *, pool_size: int) -> Engine:
    try:
        return create_engine(
            url,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=options.busy_timeout,
            connect_args={"connect_timeout": max(1, int(options.busy_timeout))},
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
    ``pilot_checkpoint_sqlite.errors`` exceptions. Every method is safe to
    repeat. Cancelling an awaiting caller does not undo a write that already
    started; a write not yet started is dropped.
    """

    def __init__(self, url: URL, options: StoreOptions, engine: Engine, version: int) -> None:
        self.url = url
        self.options = options
        self.dialect = engine.dialect.name
        self.schema_version = version
        self._engine = engine
        self._sql = Statements(engine.dialect)
        self._writer = _Writer(
            _Db(engine, self._sql),
            max_batch=options.max_batch,
            max_queue=options.max_queue,
            name="pilot-ckpt-writer",
        )
        self._readers = _Readers(engine, self._sql, options.read_pool_size, options.max_queue)
        self._relays: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Relay] = (
            weakref.WeakKeyDictionary()
        )
        self._relays_lock = threading.Lock()
        self._closed = False
        self._retention_since: float | None = None
        self._retention_keep: int | None = None
        self.clock: Callable[[], float] | None = None
        """Lease clock override (epoch seconds); ``None``: the database's clock
        on PostgreSQL, this process's on SQLite. Tests set a fake clock here."""

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
        # One connection per reader thread, one for the writer, one spare for
        # maintenance (migrations, inspection).
        pool_size = options.read_pool_size + 2
        if parsed.get_backend_name() == "sqlite":
            assert parsed.database is not None
            try:
                _create_sqlite_file(parsed.database)
            except OSError as exc:
                raise StoreUnavailableError(f"cannot create {parsed.database}: {exc}") from exc
            engine = _sqlite_engine(parsed, options, pool_size=pool_size)
        else:
            engine = _postgres_engine(parsed, options, pool_size=pool_size)
        try:
            with engine.begin() as conn:
                version = _schema.migrate(conn)
        except CheckpointError:
            engine.dispose()
            raise
        except Exception as exc:
            engine.dispose()
            orig = getattr(exc, "orig", None) or exc
            raise StoreUnavailableError(f"cannot open the checkpoint database: {orig}") from exc
        return cls(parsed, options, engine, version)

    def close(self, timeout: float = 30.0) -> None:
        """Commit every accepted write, then release connections and threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._writer.close(timeout)
        self._readers.close(timeout)
        self._engine.dispose()

    async def aclose(self, grace: float = 30.0) -> None:
        """Async twin of :meth:`close` (``grace``: seconds to commit queued writes)."""
        await asyncio.to_thread(self.close, grace)

    @property
    def stats(self) -> dict[str, int]:
        """Write transactions committed and requests they carried (group commit ratio)."""
        return {"write_transactions": self._writer.batches, "write_requests": self._writer.ops}

    # -------------------------------------------------------- plumbing

    def _relay(self) -> _Relay:
        loop = asyncio.get_running_loop()
        relay = self._relays.get(loop)
        if relay is None:
            with self._relays_lock:
                relay = self._relays.get(loop)
                if relay is None:
                    relay = self._relays[loop] = _Relay(loop)
        return relay

    async def _write(self, fn: Callable[[_Db], T], *, blind: bool = False) -> T:
        # ``blind``: ``fn`` only sends statements (``_Db.send``/``run_many``) and
        # reads no rows, so its transaction may be pipelined.
        if self._closed:
            raise StoreClosedError("the checkpoint store is closed")
        return await self._relay().watch(self._writer.submit(fn, blind=blind))

    async def _read(self, fn: Callable[[_Db], T]) -> T:
        if self._closed:
            raise StoreClosedError("the checkpoint store is closed")
        return await self._relay().watch(self._readers.submit(fn))

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
            "created_at": 0.0,
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
        insert_checkpoint = self._sql.insert_ignore(checkpoints)
        insert_blob = self._sql.insert_ignore(blobs)

        def _op(db: _Db) -> None:
            # Stamped on the writer, in commit order (retention relies on it).
            row["created_at"] = time.time()
            db.run_many(insert_blob, blob_rows)
            db.send(insert_checkpoint, row)

        await self._write(_op, blind=True)

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
        if all(w[0] < 0 for w in record.writes):
            statement = self._sql.insert_write_replace()
        else:
            statement = self._sql.insert_ignore(writes)

        def _op(db: _Db) -> None:
            db.run_many(statement, rows)

        await self._write(_op, blind=True)

    async def delete_thread(self, scope: str, thread_id: str) -> None:
        """Delete every row of a thread (all namespaces). Idempotent."""

        def _op(db: _Db) -> None:
            self._delete_threads(db, scope, [thread_id])

        await self._write(_op)

    def _delete_threads(self, db: _Db, scope: str, thread_ids: Sequence[str]) -> None:
        for table in (writes, blobs, checkpoints):
            statement = self._sql.delete_thread(table)
            for thread_id in thread_ids:
                db.run(statement, {"scope": scope, "thread_id": thread_id})

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

        def _op(db: _Db) -> None:
            for table, keys in tables:
                names = [c.name for c in table.columns]
                key_cols = [names.index(k) for k in keys]
                insert = self._sql.insert_ignore(table)
                values: dict[str, Any] = {"scope": scope, "thread_id": source, "limit": _COPY_BATCH}
                first = True
                while True:
                    page = db.run(self._sql.copy_page(table, keys, first), values)
                    if not page:
                        break
                    rows: list[dict[str, Any]] = []
                    for r in page:
                        row = dict(zip(names, r, strict=True))
                        row["thread_id"] = target
                        rows.append(row)
                    db.run_many(insert, rows)
                    last = page[-1]
                    values.update({f"k_{k}": last[i] for k, i in zip(keys, key_cols, strict=True)})
                    first = False
                    if len(page) < _COPY_BATCH:
                        break

        await self._write(_op)

    async def delete_for_runs(self, scope: str, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints created by ``run_ids`` and their writes. Idempotent."""
        ids = list(dict.fromkeys(run_ids))
        if not ids:
            return

        def _op(db: _Db) -> None:
            found: list[tuple[str, str, str]] = []
            for run_id in ids:
                found.extend(
                    (r[0], r[1], r[2])
                    for r in db.run(
                        self._sql.checkpoints_of_run(), {"scope": scope, "run_id": run_id}
                    )
                )
            self._delete_checkpoints(db, scope, found)

        await self._write(_op)

    async def prune(self, scope: str, thread_ids: Sequence[str], strategy: str) -> None:
        """``keep_latest``: keep the newest checkpoint per namespace; ``delete``: drop all."""
        if strategy not in ("keep_latest", "delete"):
            raise CheckpointUsageError(f"unknown prune strategy {strategy!r}")
        ids = list(dict.fromkeys(thread_ids))
        if not ids:
            return

        def _op(db: _Db) -> None:
            if strategy == "delete":
                self._delete_threads(db, scope, ids)
                return
            doomed: list[tuple[str, str, str]] = []
            for thread_id in ids:
                rows = db.run(
                    self._sql.checkpoint_keys_of_thread(), {"scope": scope, "thread_id": thread_id}
                )
                latest: dict[str, str] = {}
                for ns, cid in rows:
                    if ns not in latest or cid > latest[ns]:
                        latest[ns] = cid
                doomed.extend((thread_id, ns, cid) for ns, cid in rows if latest[ns] != cid)
            self._delete_checkpoints(db, scope, doomed)

        await self._write(_op)

    async def apply_retention(self, now: float | None = None) -> int:
        """Apply the configured :class:`RetentionPolicy` to every scope.

        The newest checkpoint of every thread namespace is always kept. Every
        query is an index lookup: checkpoints older than the cutoff come from
        a range of the ``(created_at, key)`` index; the size limit looks only
        at namespaces written since the previous pass (the first pass of a
        store, or after the limit changed, counts every namespace over the
        primary-key index) and finds the surplus by walking that namespace's
        keys newest first.

        Args:
            now: The time ages are measured against (default: the clock).

        Returns:
            How many checkpoints were deleted.
        """
        policy = self.options.retention
        if not policy.enabled:
            return 0
        max_age = policy.max_age_secs
        cutoff = None if max_age is None else (now if now is not None else time.time()) - max_age
        keep = policy.max_checkpoints_per_thread
        since = self._retention_since if self._retention_keep == keep else None
        started = time.time()

        def _op(db: _Db) -> int:
            doomed: set[tuple[str, str, str, str]] = set()
            if cutoff is not None:
                latest: dict[tuple[str, str, str], str | None] = {}
                for scope, thread_id, ns, cid in db.run(
                    self._sql.checkpoints_older_than(), {"cutoff": cutoff}
                ):
                    key = (scope, thread_id, ns)
                    if key not in latest:
                        found = db.run(
                            self._sql.latest_of_namespace(),
                            {"scope": scope, "thread_id": thread_id, "checkpoint_ns": ns},
                        )
                        latest[key] = found[0][0] if found else None
                    if cid != latest[key]:
                        doomed.add((scope, thread_id, ns, cid))
            if keep is not None:
                if since is None:
                    namespaces = db.run(self._sql.namespaces_over(), {"keep": keep})
                else:
                    namespaces = db.run(self._sql.namespaces_written_since(), {"since": since})
                for scope, thread_id, ns in dict.fromkeys(tuple(n) for n in namespaces):
                    for (cid,) in db.run(
                        self._sql.beyond_newest(),
                        {"scope": scope, "thread_id": thread_id, "checkpoint_ns": ns, "keep": keep},
                    ):
                        doomed.add((scope, thread_id, ns, cid))
            by_scope: dict[str, list[tuple[str, str, str]]] = {}
            for scope, thread_id, ns, cid in sorted(doomed):
                by_scope.setdefault(scope, []).append((thread_id, ns, cid))
            for scope, keys in by_scope.items():
                self._delete_checkpoints(db, scope, keys)
            return len(doomed)

        removed = await self._write(_op)
        # Checkpoints are stamped when their write runs on this store's writer
        # (serialized with this pass); the margin covers other store processes
        # on the same database and their clocks.
        self._retention_since = started - RETENTION_CLOCK_MARGIN
        self._retention_keep = keep
        return removed

    # -------------------------------------------------------- run leases

    def _clock(self, db: _Db) -> float:
        # One clock for every store process on a database: PostgreSQL's;
        # a SQLite file is served from one machine, whose clock it is.
        if self.clock is not None:
            return self.clock()
        sql = self._sql.db_now()
        if sql is None:
            return time.time()
        return float(db.query(sql)[0][0])

    async def acquire_lease(
        self,
        scope: str,
        thread_id: str,
        holder: str,
        ttl: float,
        *,
        run_id: str = "",
        resume: bool = False,
    ) -> dict[str, Any]:
        """Take the run lease of a thread if it is free, expired or already ``holder``'s.

        The lease records ``run_id``. With ``resume`` and a non-empty
        ``run_id``, a live lease held for the same run id is taken over too
        (the earlier attempt of this run; its holder's next renewal then
        fails). A lease held for another run, or for no run id, is never
        taken while it is live.

        Returns:
            ``{"acquired": bool, "holder": str, "expires_in": float,
            "run_id": str, "took_over": str}``; on refusal ``holder``,
            ``expires_in`` and ``run_id`` describe the current holder;
            ``took_over`` names the live holder this acquire displaced (``""``
            when none). Safe to repeat (the same holder re-acquires and extends).
        """
        key = {"scope": scope, "thread_id": thread_id}
        takeover = resume and run_id != ""

        def _op(db: _Db) -> dict[str, Any]:
            now = self._clock(db)
            before = db.run(self._sql.lease_row(), key) if takeover else []
            db.run(
                self._sql.lease_takeover() if takeover else self._sql.lease_claim(),
                {
                    **key,
                    "holder": holder,
                    "acquired_at": now,
                    "expires_at": now + ttl,
                    "run_id": run_id,
                    "now": now,
                },
            )
            found = db.run(self._sql.lease_row(), key)
            current, expires_at, current_run = (
                (found[0][0], float(found[0][1]), str(found[0][2] or ""))
                if found
                else ("", now, "")
            )
            acquired = current == holder
            took_over = ""
            if acquired and before:
                prior, prior_expiry = str(before[0][0]), float(before[0][1])
                if prior != holder and prior_expiry > now:
                    took_over = prior
            return {
                "acquired": acquired,
                "holder": current,
                "expires_in": max(0.0, expires_at - now),
                "run_id": current_run,
                "took_over": took_over,
            }

        return await self._write(_op)

    async def renew_lease(
        self, scope: str, thread_id: str, holder: str, ttl: float
    ) -> dict[str, Any]:
        """Extend ``holder``'s lease to ``ttl`` seconds from now.

        Returns:
            ``{"renewed": bool, "holder": str, "expires_in": float}``;
            ``renewed`` is false when the lease was taken by another holder
            after it expired (or released). Safe to repeat.
        """
        key = {"scope": scope, "thread_id": thread_id}

        def _op(db: _Db) -> dict[str, Any]:
            now = self._clock(db)
            db.run(self._sql.lease_renew(), {**key, "holder": holder, "expires_at": now + ttl})
            found = db.run(self._sql.lease_row(), key)
            current, expires_at = (found[0][0], float(found[0][1])) if found else ("", now)
            # renewal is by holder name: a holder whose lease a resume of its run
            # took over is refused here (the name is the fencing token)
            return {
                "renewed": current == holder,
                "holder": current,
                "expires_in": max(0.0, expires_at - now),
            }

        return await self._write(_op)

    async def release_lease(self, scope: str, thread_id: str, holder: str) -> None:
        """Drop ``holder``'s lease of a thread (no-op if it is not theirs). Idempotent."""

        def _op(db: _Db) -> None:
            db.run(
                self._sql.lease_release(),
                {"scope": scope, "thread_id": thread_id, "holder": holder},
            )

        await self._write(_op)

    def _delete_checkpoints(
        self, db: _Db, scope: str, keys: Sequence[tuple[str, str, str]]
    ) -> None:
        if not keys:
            return
        delete_writes = self._sql.delete_of_checkpoint(writes)
        delete_checkpoint = self._sql.delete_of_checkpoint(checkpoints)
        rows = [
            {"scope": scope, "thread_id": t, "checkpoint_ns": ns, "checkpoint_id": cid}
            for t, ns, cid in keys
        ]
        db.run_many(delete_writes, rows)
        db.run_many(delete_checkpoint, rows)
        for thread_id, ns in dict.fromkeys((k[0], k[1]) for k in keys):
            self._collect_blobs(db, scope, thread_id, ns)

    def _collect_blobs(self, db: _Db, scope: str, thread_id: str, ns: str) -> None:
        """Delete the blobs no remaining checkpoint of ``(thread, ns)`` refers to."""
        where = {"scope": scope, "thread_id": thread_id, "checkpoint_ns": ns}
        referenced: set[tuple[str, str]] = set()
        for (versions_json,) in db.run(self._sql.versions_of_namespace(), where):
            referenced.update(_versions(versions_json).items())
        orphans = [
            {**where, "channel": c, "version": v}
            for c, v in db.run(self._sql.blob_keys_of_namespace(), where)
            if (c, v) not in referenced
        ]
        db.run_many(self._sql.delete_blob(), orphans)

    # -------------------------------------------------------- reads

    async def get_tuple(
        self, scope: str, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> dict[str, Any] | None:
        """The checkpoint row (latest of the namespace without an id), or ``None``."""
        values = {
            "scope": scope,
            "thread_id": thread_id,
            "checkpoint_ns": checkpoint_ns,
            "checkpoint_id": checkpoint_id,
        }
        statement = self._sql.checkpoint_row(latest=checkpoint_id is None)

        def _op(db: _Db) -> dict[str, Any] | None:
            found = db.run(statement, values)
            return self._full_row(db, scope, found[0]) if found else None

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
        base: dict[str, Any] = {
            "scope": scope,
            "thread_id": thread_id,
            "checkpoint_ns": checkpoint_ns,
            "checkpoint_id": checkpoint_id,
            "before": before,
        }
        flags = {
            "thread": thread_id is not None,
            "ns": checkpoint_ns is not None,
            "checkpoint": checkpoint_id is not None,
            "before": before is not None,
            "with_metadata": bool(wanted),
        }
        # Without a filter every scanned row is a match: scan just what is asked.
        batch_size = _SCAN_BATCH if wanted else limit
        row_statement = self._sql.checkpoint_row(latest=False)

        def _op(db: _Db) -> dict[str, Any]:
            position: tuple[str, str, str] | None = (
                (cursor[0], cursor[1], cursor[2]) if cursor else None
            )
            matches: list[tuple[str, str, str]] = []
            scanned = 0
            next_cursor: list[str] | None = None
            while True:
                values = dict(base, limit=batch_size)
                if position is not None:
                    values.update(
                        c_checkpoint_id=position[0], c_thread_id=position[1], c_ns=position[2]
                    )
                statement = self._sql.list_keys(cursor=position is not None, **flags)
                batch = db.run(statement, values)
                for row in batch:
                    cid, tid, ns = row[0], row[1], row[2]
                    position = (cid, tid, ns)
                    scanned += 1
                    if wanted and not _matches(row[3], wanted):
                        continue
                    matches.append((tid, ns, cid))
                    if len(matches) >= limit:
                        break
                if len(matches) >= limit or (scanned >= _MAX_SCAN and len(batch) == batch_size):
                    next_cursor = list(position) if position is not None else None
                    break
                if len(batch) < batch_size:
                    break
            out: list[dict[str, Any]] = []
            for tid, ns, cid in matches:
                found = db.run(
                    row_statement,
                    {"scope": scope, "thread_id": tid, "checkpoint_ns": ns, "checkpoint_id": cid},
                )
                if found:
                    out.append(self._full_row(db, scope, found[0]))
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
        where = {"scope": scope, "thread_id": thread_id, "checkpoint_ns": checkpoint_ns}

        def _op(db: _Db) -> dict[str, Any]:
            collected: dict[str, list[list[Any]]] = {c: [] for c in channels}
            seeds: dict[str, list[Any]] = {}
            remaining = set(channels)
            target = db.run(
                self._sql.chain_link(latest=checkpoint_id is None),
                {**where, "checkpoint_id": checkpoint_id},
            )
            current: str | None = target[0][1] if target else None
            seen: set[str] = set()
            link = self._sql.chain_link(latest=False)
            while current is not None and remaining and current not in seen:
                seen.add(current)
                found = db.run(link, {**where, "checkpoint_id": current})
                if not found:
                    break
                _, parent, versions_json = found[0]
                versions = _versions(versions_json)
                here = self._load_blobs(
                    db, where, {ch: versions[ch] for ch in remaining if ch in versions}
                )
                for task_id, channel, kind, data in reversed(
                    self._load_writes(db, {**where, "checkpoint_id": current})
                ):
                    if channel in remaining:
                        collected[channel].append([task_id, kind, data])
                for channel, kind, data in here:
                    seeds[channel] = [kind, data]
                    remaining.discard(channel)
                current = parent
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

    def _full_row(self, db: _Db, scope: str, row: Sequence[Any]) -> dict[str, Any]:
        (thread_id, ns, cid, parent, cp_type, cp, md_type, md, versions_json) = row
        where = {"scope": scope, "thread_id": thread_id, "checkpoint_ns": ns}
        # One blob lookup per channel and the writes query are independent: one
        # batch (a single round trip on PostgreSQL).
        versions = _versions(versions_json)
        blob = self._sql.blob()
        items: list[tuple[Compiled, Mapping[str, Any]]] = [
            (blob, {**where, "channel": channel, "version": version})
            for channel, version in versions.items()
        ]
        items.append((self._sql.writes_of(), {**where, "checkpoint_id": cid}))
        *blob_rows, write_rows = db.run_batch(items)
        blobs_out = [
            [channel, found[0][0], bytes(found[0][1])]
            for channel, found in zip(versions, blob_rows, strict=True)
            if found
        ]
        return {
            "thread_id": thread_id,
            "checkpoint_ns": ns,
            "checkpoint_id": cid,
            "parent_checkpoint_id": parent,
            "checkpoint": [cp_type, bytes(cp)],
            "metadata": [md_type, bytes(md)],
            "blobs": blobs_out,
            "writes": [list(w) for w in _sorted_writes(write_rows)],
        }

    def _load_blobs(
        self, db: _Db, where: Mapping[str, Any], versions: Mapping[str, str]
    ) -> list[tuple[str, str, bytes]]:
        statement = self._sql.blob()
        out: list[tuple[str, str, bytes]] = []
        for channel, version in versions.items():
            found = db.run(statement, {**where, "channel": channel, "version": version})
            if found:
                out.append((channel, found[0][0], bytes(found[0][1])))
        return out

    def _load_writes(self, db: _Db, where: Mapping[str, Any]) -> list[tuple[str, str, str, bytes]]:
        return _sorted_writes(db.run(self._sql.writes_of(), where))


def _sorted_writes(rows: list[Any]) -> list[tuple[str, str, str, bytes]]:
    # writes_sort_key order, computed here (not in SQL) so it is the same
    # bytewise string order on every database and collation.
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return [(r[1], r[3], r[4], bytes(r[5])) for r in rows]


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
