"""A shared idempotency journal: exactly-once results across a pool of workers.

Theory of operation
-------------------
Two tables in a SQLAlchemy database (``sqlite:///`` for the workers of one
host, ``postgresql://`` for many hosts):

- ``pilot_journal_calls``, one row per ``(handler, caller, key)``: ``state``
  (``running``, ``done`` or ``error``), the ``owner`` (one id per journal
  instance, so per worker process), ``lease_expires`` (wall-clock seconds),
  the msgpack ``outcome`` and ``created_at`` (indexed, for retention).
- ``pilot_journal_steps``, one row per recorded step of a call.

A call first tries ``INSERT ... ON CONFLICT DO NOTHING`` of a ``running`` row
with its lease: if the row went in, this worker owns the call and runs the
handler. Otherwise it reads the row: a ``done``/``error`` row is replayed; a
``running`` row whose lease expired is taken over with a compare-and-set
``UPDATE`` (the owner died: its recorded steps are loaded and replayed); a
``running`` row with a live lease means a twin is running, so the duplicate
polls (10 ms doubling to 250 ms) until the row changes, the lease expires or
the call's deadline passes (``DEADLINE_EXCEEDED``). Duplicates inside one
process wait on an in-memory future instead of polling.

Every statement is its own short transaction; nothing holds a lock while a
handler runs. A heartbeat task renews the leases of this process's running
calls every ``lease_secs / 3``. The owner records the outcome with an
``UPDATE ... WHERE owner = me``; if it lost the lease meanwhile (it was
paused for longer than the lease) the update matches nothing and is logged.

Outcomes recorded: the encoded result, or an ``RpcError`` whose code says the
same request would fail again (``INVALID_ARGUMENT``, ``NOT_FOUND``,
``INTERNAL``...). Transient failures (``DEADLINE_EXCEEDED``,
``RESOURCE_EXHAUSTED``, ``UNAVAILABLE``, ``CANCELLED``, ``ABORTED``) and
cancellation release the lease instead, keeping the recorded steps, so a retry
runs the handler again and replays its completed steps.

Database calls run on a small thread pool owned by the journal (one thread
for SQLite, so one process never contends with itself for the write lock);
a database write that has started is finished even if the awaiting task is
cancelled, so a step whose side effect ran is recorded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgpack
from pilot_rpc import DeadlineExceeded, RpcError, StatusCode, Unavailable
from sqlalchemy import (
    Column,
    Connection,
    CursorResult,
    Dialect,
    Engine,
    Float,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from pilot_worker._steps import Key, current_scope
from pilot_worker.errors import JournalError

__all__ = ["IdempotencyJournal"]

logger = logging.getLogger("pilot_worker.journal")

T = TypeVar("T")

_TRANSIENT = frozenset(
    {
        StatusCode.CANCELLED,
        StatusCode.DEADLINE_EXCEEDED,
        StatusCode.RESOURCE_EXHAUSTED,
        StatusCode.UNAVAILABLE,
        StatusCode.ABORTED,
    }
)
_POLL_FIRST = 0.01
_POLL_MAX = 0.25

_metadata = MetaData()
_calls = Table(
    "pilot_journal_calls",
    _metadata,
    Column("handler", String(255), primary_key=True),
    Column("caller", String(255), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("state", String(8), nullable=False),
    Column("owner", String(128), nullable=False),
    Column("lease_expires", Float, nullable=False),
    Column("outcome", LargeBinary, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("completed_at", Float, nullable=True),
    Index("pilot_journal_calls_created", "created_at"),
)
_steps = Table(
    "pilot_journal_steps",
    _metadata,
    Column("handler", String(255), primary_key=True),
    Column("caller", String(255), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("step", String(255), primary_key=True),
    Column("result", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("pilot_journal_steps_created", "created_at"),
)


class _Sql:
    """A Core statement compiled once for one dialect, run as driver SQL.

    Building and compiling a Core statement per call costs several hundred
    microseconds; compiling each statement once keeps a journal call cheap.
    """

    __slots__ = ("_defaults", "_order", "_text")

    def __init__(self, stmt: Any, dialect: Dialect) -> None:
        compiled = stmt.compile(dialect=dialect)
        self._text: str = compiled.string
        # Constants of the statement ("running", 0.0) are bound parameters too.
        self._defaults: dict[str, Any] = dict(compiled.params)
        self._order: tuple[str, ...] | None = (
            tuple(compiled.positiontup or ()) if compiled.positional else None
        )

    def run(self, conn: Connection, **values: Any) -> CursorResult[Any]:
        params = {**self._defaults, **values}
        if self._order is None:
            return conn.exec_driver_sql(self._text, params)
        return conn.exec_driver_sql(self._text, tuple(params[name] for name in self._order))


class _Statements:
    """Every statement the journal runs, compiled for one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        def same_call(table: Table) -> Any:
            return and_(
                table.c.handler == bindparam("handler"),
                table.c.caller == bindparam("caller"),
                table.c.key == bindparam("key"),
            )

        insert = sqlite.insert if dialect.name == "sqlite" else postgresql.insert
        owned = and_(
            same_call(_calls), _calls.c.owner == bindparam("owner"), _calls.c.state == "running"
        )
        self.claim = _Sql(
            insert(_calls)
            .values(
                handler=bindparam("handler"),
                caller=bindparam("caller"),
                key=bindparam("key"),
                state="running",
                owner=bindparam("owner"),
                lease_expires=bindparam("lease_expires"),
                created_at=bindparam("created_at"),
            )
            .on_conflict_do_nothing(),
            dialect,
        )
        self.read = _Sql(
            select(_calls.c.state, _calls.c.owner, _calls.c.lease_expires, _calls.c.outcome).where(
                same_call(_calls)
            ),
            dialect,
        )
        self.take_over = _Sql(
            update(_calls)
            .where(
                same_call(_calls),
                _calls.c.state == "running",
                _calls.c.owner == bindparam("old_owner"),
                _calls.c.lease_expires == bindparam("old_lease"),
            )
            .values(owner=bindparam("owner"), lease_expires=bindparam("lease_expires")),
            dialect,
        )
        self.read_steps = _Sql(
            select(_steps.c.step, _steps.c.result).where(same_call(_steps)), dialect
        )
        self.finish = _Sql(
            update(_calls)
            .where(owned)
            .values(
                state=bindparam("state"),
                outcome=bindparam("outcome"),
                completed_at=bindparam("completed_at"),
                lease_expires=0.0,
            ),
            dialect,
        )
        self.release = _Sql(update(_calls).where(owned).values(lease_expires=0.0), dialect)
        self.renew = _Sql(
            update(_calls).where(owned).values(lease_expires=bindparam("lease_expires")),
            dialect,
        )
        self.record_step = _Sql(
            insert(_steps)
            .values(
                handler=bindparam("handler"),
                caller=bindparam("caller"),
                key=bindparam("key"),
                step=bindparam("step"),
                result=bindparam("result"),
                created_at=bindparam("created_at"),
            )
            .on_conflict_do_nothing(),
            dialect,
        )
        self.purge_calls = _Sql(
            delete(_calls).where(
                _calls.c.created_at < bindparam("cutoff"),
                or_(_calls.c.state != "running", _calls.c.lease_expires < bindparam("now")),
            ),
            dialect,
        )
        live = and_(
            _calls.c.handler == _steps.c.handler,
            _calls.c.caller == _steps.c.caller,
            _calls.c.key == _steps.c.key,
            _calls.c.state == "running",
            _calls.c.lease_expires > bindparam("now"),
        )
        self.purge_steps = _Sql(
            delete(_steps).where(_steps.c.created_at < bindparam("cutoff"), ~exists().where(live)),
            dialect,
        )


class _Abandoned(Exception):
    """The in-process twin gave up (cancelled or transient error): claim again."""


def _pack(value: Any) -> bytes:
    data = msgpack.packb(value, use_bin_type=True)
    assert isinstance(data, bytes)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _error_blob(exc: RpcError) -> bytes:
    return _pack({"error": {"code": int(exc.code), "message": exc.message, "details": exc.details}})


def _outcome(blob: Any) -> Any:
    """The recorded result, or raise the recorded error."""
    value = _unpack(bytes(blob))
    if isinstance(value, dict) and "error" in value:
        err: dict[str, Any] = value["error"]  # pyright: ignore[reportUnknownVariableType]
        raise RpcError.from_code(int(err["code"]), str(err["message"]), err.get("details") or {})
    return value["result"]  # pyright: ignore[reportIndexIssue]


def _normalise_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise JournalError(f"--idempotency-store: not a database URL: {url!r}") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise JournalError(
                "--idempotency-store: a shared journal needs a file: sqlite:///path/journal.db"
            )
        return parsed.set(drivername="sqlite+pysqlite")
    if backend in ("postgresql", "postgres"):
        if driver and driver != "psycopg":
            raise JournalError("--idempotency-store: use postgresql:// (psycopg 3)")
        return parsed.set(drivername="postgresql+psycopg")
    raise JournalError(
        f"--idempotency-store: unsupported database {backend!r}; "
        "use sqlite:///path/journal.db or postgresql://user@host/db"
    )


class _Scope:
    """Steps of one call this process owns (what ``ctx.step`` talks to)."""

    __slots__ = ("_journal", "_key", "_recorded", "_used")

    def __init__(self, journal: IdempotencyJournal, key: Key, recorded: dict[str, bytes]) -> None:
        self._journal = journal
        self._key = key
        self._recorded = recorded
        self._used: set[str] = set()

    async def step(self, name: str, fn: Callable[[], Any]) -> Any:
        if name in self._used:
            raise JournalError(f"step {name!r} already ran in this call; step names must differ")
        self._used.add(name)
        blob = self._recorded.get(name)
        if blob is not None:
            self._journal.steps_replayed += 1
            return _unpack(blob)
        result = fn()
        if inspect.isawaitable(result):
            result = await result
        try:
            data = _pack(result)
        except (TypeError, ValueError, OverflowError) as exc:
            raise JournalError(
                f"step {name!r} returned a value msgpack cannot encode "
                f"({type(result).__name__}); it ran but was not recorded"
            ) from exc
        await self._journal._db(self._journal._record_step_sync, self._key, name, data)
        self._recorded[name] = data
        return result


class IdempotencyJournal:
    """Idempotent results and handler steps shared by a pool of workers, in a database.

    Give it to the worker (``pilot-worker --idempotency-store URL``, or
    ``WorkerServer(..., idempotency_store=journal)`` plus
    ``worker.on_shutdown(journal.aclose)``). For handlers declared
    ``idempotent=True`` and calls that carry an idempotency key, a completed
    call is replayed on any worker of the pool; a duplicate of a running call
    waits for it (bounded by the call's deadline) or takes over once the
    first worker's lease expired; ``await ctx.step(name, fn)`` inside the
    handler replays steps a dead worker had completed.

    Opening creates the tables if needed (blocking I/O: call it before the
    event loop is busy, or in a thread).

    Args:
        url: ``sqlite:///path/journal.db`` (workers of one host; WAL and a busy
            timeout are set) or ``postgresql://user@host/db`` (psycopg 3).
        lease_secs: How long a running call stays owned without a heartbeat;
            a duplicate takes over after that. Renewed every ``lease_secs / 3``.
        retention_secs: Finished calls and steps older than this are deleted.
        retention_interval_secs: How often retention runs.
        busy_timeout_secs: How long a statement waits for a database lock
            (SQLite) or a pooled connection.
        threads: Database threads (default 1 for SQLite, 4 for PostgreSQL).
        heartbeat_secs: How often leases are renewed (default ``lease_secs / 3``;
            keep it well below ``lease_secs`` or live calls lose their lease).
        clock: Wall clock for leases and retention (shared by every host of the
            pool: keep their clocks synchronised well within ``lease_secs``).

    Raises:
        JournalError: a bad URL, or the database cannot be opened.
    """

    def __init__(
        self,
        url: str,
        *,
        lease_secs: float = 10.0,
        retention_secs: float = 24 * 3600.0,
        retention_interval_secs: float = 60.0,
        busy_timeout_secs: float = 10.0,
        threads: int | None = None,
        heartbeat_secs: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        heartbeat = lease_secs / 3 if heartbeat_secs is None else heartbeat_secs
        for name, value in (
            ("lease_secs", lease_secs),
            ("heartbeat_secs", heartbeat),
            ("retention_secs", retention_secs),
            ("retention_interval_secs", retention_interval_secs),
            ("busy_timeout_secs", busy_timeout_secs),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:  # pyright: ignore[reportUnnecessaryIsInstance]
                raise JournalError(f"{name} must be a number > 0, got {value!r}")
        parsed = _normalise_url(url)
        self.url = parsed.render_as_string(hide_password=True)
        self.lease_secs = float(lease_secs)
        self.heartbeat_secs = float(heartbeat)
        self.retention_secs = float(retention_secs)
        self.retention_interval_secs = float(retention_interval_secs)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._clock = clock
        self._is_sqlite = parsed.drivername.startswith("sqlite")
        self._engine = self._make_engine(parsed, busy_timeout_secs)
        try:
            self._create_tables()
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise JournalError(f"cannot open the idempotency journal {self.url}: {exc}") from exc
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads or (1 if self._is_sqlite else 4),
            thread_name_prefix="pilot-journal",
        )
        self._sql = _Statements(self._engine.dialect)
        self._tls = threading.local()
        self._conns: list[Connection] = []
        self._inline: Connection | None = None
        self._conns_lock = threading.Lock()
        self._local: dict[Key, asyncio.Future[Any]] = {}
        self._owned: set[Key] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.runs = 0
        """Calls this process ran (claimed fresh or took over)."""
        self.replays = 0
        """Calls answered from the journal without running the handler."""
        self.takeovers = 0
        """Calls taken over from a worker whose lease had expired."""
        self.steps_replayed = 0
        """Steps answered from the journal without running them."""
        self.waiting = 0
        """Duplicates waiting right now for a twin (here or on another worker)."""

    # -- set-up --------------------------------------------------------------

    def _make_engine(self, url: URL, busy_timeout: float) -> Engine:
        if not self._is_sqlite:
            try:
                return create_engine(
                    url,
                    pool_size=4,
                    max_overflow=4,
                    pool_timeout=busy_timeout,
                    pool_pre_ping=True,
                    connect_args={"connect_timeout": max(1, int(busy_timeout))},
                )
            except ModuleNotFoundError as exc:
                raise JournalError(
                    "a PostgreSQL journal needs psycopg 3: "
                    "pip install 'pilot-worker[journal-postgres]'"
                ) from exc
        assert url.database is not None
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": busy_timeout},
            pool_size=4,
            max_overflow=0,
            pool_timeout=busy_timeout,
        )
        busy_ms = int(busy_timeout * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:  # pyright: ignore[reportUnusedFunction]
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            finally:
                cursor.close()

        return engine

    def _create_tables(self) -> None:
        try:
            _metadata.create_all(self._engine)
        except SQLAlchemyError:
            # Another worker of the pool created them at the same moment.
            _metadata.create_all(self._engine)
        if self._is_sqlite:
            assert self._engine.url.database is not None
            with contextlib.suppress(OSError):
                os.chmod(self._engine.url.database, 0o600)

    def _start(self) -> None:
        if self._tasks or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._heartbeat_loop(), name="pilot-journal-heartbeat"),
            loop.create_task(self._retention_loop(), name="pilot-journal-retention"),
        ]

    async def aclose(self) -> None:
        """Stop the heartbeat and retention tasks and close the database. Safe to repeat.

        Calls still running lose their lease when it expires (another worker
        may then take them over). Cancelling it re-raises CancelledError.
        """
        if self._closed:
            return
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._shutdown_sync)

    def _shutdown_sync(self) -> None:
        self._executor.shutdown(wait=True)
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(SQLAlchemyError):
                conn.close()
        self._engine.dispose()

    # -- database helpers ----------------------------------------------------

    def _inline_conn(self) -> Connection:
        conn = self._inline
        if conn is None:
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("PRAGMA busy_timeout=0")
            self._inline = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)``; once started it finishes even if the caller is cancelled.

        On SQLite the statement first runs right here, on a connection that
        never waits for a lock (``busy_timeout=0``): a local SQLite statement
        takes tens of microseconds, less than a hop to a thread. Only if the
        database is locked by another process does it go to the journal
        thread, whose connection waits up to ``busy_timeout_secs``.
        """
        if self._closed:
            raise JournalError("the idempotency journal is closed")
        done, result = self._try_inline(fn, *args)
        if done:
            return result  # pyright: ignore[reportReturnType]
        future = asyncio.wrap_future(self._executor.submit(self._with_conn, fn, *args))
        return await asyncio.shield(future)

    def _conn(self) -> Connection:
        """This journal thread's own autocommit connection (each statement commits)."""
        conn: Connection | None = getattr(self._tls, "conn", None)
        if conn is None:
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._tls.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _try_inline(self, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
        """SQLite: run ``fn`` on the loop's no-wait connection; (False, None) if locked."""
        if not self._is_sqlite:
            return False, None
        conn = self._inline_conn()
        try:
            return True, fn(conn, *args)
        except OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return False, None
            self._drop_inline(conn)
            raise
        except SQLAlchemyError:
            self._drop_inline(conn)
            raise

    def _drop_inline(self, conn: Connection) -> None:
        self._inline = None
        with contextlib.suppress(SQLAlchemyError):
            conn.invalidate()

    def _with_conn(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._conn()
        try:
            return fn(conn, *args)
        except SQLAlchemyError:
            # A broken connection (database restarted...): reconnect next time.
            self._tls.conn = None
            with contextlib.suppress(SQLAlchemyError):
                conn.invalidate()
            raise

    def _insert_running_sync(self, conn: Connection, key: Key) -> tuple[str, Any]:
        """Claim ``key`` or report its state: (kind, payload)."""
        now = self._clock()
        sql = self._sql
        inserted = sql.claim.run(
            conn,
            handler=key[0],
            caller=key[1],
            key=key[2],
            owner=self.owner,
            lease_expires=now + self.lease_secs,
            created_at=now,
        )
        if inserted.rowcount == 1:
            return "claimed", {}
        row = sql.read.run(conn, handler=key[0], caller=key[1], key=key[2]).first()
        if row is None:
            return "retry", None  # deleted by retention in between
        state, owner, lease, outcome = tuple(row)
        if state != "running":
            return "done", outcome
        if lease > now:
            return "busy", owner
        took = sql.take_over.run(
            conn,
            handler=key[0],
            caller=key[1],
            key=key[2],
            old_owner=owner,
            old_lease=lease,
            owner=self.owner,
            lease_expires=now + self.lease_secs,
        ).rowcount
        if took != 1:
            return "retry", None
        steps = sql.read_steps.run(conn, handler=key[0], caller=key[1], key=key[2]).all()
        return "took_over", {str(name): bytes(data) for name, data in (tuple(r) for r in steps)}

    def _finish_sync(self, conn: Connection, key: Key, state: str, outcome: bytes) -> bool:
        done = self._sql.finish.run(
            conn,
            handler=key[0],
            caller=key[1],
            key=key[2],
            owner=self.owner,
            state=state,
            outcome=outcome,
            completed_at=self._clock(),
        )
        return done.rowcount == 1

    def _release_sync(self, conn: Connection, key: Key) -> None:
        self._sql.release.run(conn, handler=key[0], caller=key[1], key=key[2], owner=self.owner)

    def _record_step_sync(self, conn: Connection, key: Key, name: str, data: bytes) -> None:
        self._sql.record_step.run(
            conn,
            handler=key[0],
            caller=key[1],
            key=key[2],
            step=name,
            result=data,
            created_at=self._clock(),
        )

    def _renew_sync(self, conn: Connection, keys: list[Key]) -> None:
        expires = self._clock() + self.lease_secs
        for key in keys:
            self._sql.renew.run(
                conn,
                handler=key[0],
                caller=key[1],
                key=key[2],
                owner=self.owner,
                lease_expires=expires,
            )

    def _purge_sync(self, conn: Connection, cutoff: float, now: float) -> int:
        deleted = self._sql.purge_calls.run(conn, cutoff=cutoff, now=now).rowcount
        self._sql.purge_steps.run(conn, cutoff=cutoff, now=now)
        return deleted

    # -- background tasks ----------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_secs)
            if not self._owned:
                continue
            try:
                await self._db(self._renew_sync, list(self._owned))
            except (SQLAlchemyError, JournalError) as exc:
                logger.warning("journal lease renewal failed (will retry): %s", exc)

    async def _retention_loop(self) -> None:
        while True:
            try:
                await self.purge_expired()
            except (SQLAlchemyError, JournalError) as exc:
                logger.warning("journal retention failed (will retry): %s", exc)
            await asyncio.sleep(self.retention_interval_secs)

    async def purge_expired(self) -> int:
        """Delete finished calls (and their steps) older than ``retention_secs`` now.

        Returns the number of calls deleted. Uses the ``created_at`` indexes.
        Safe to repeat; cancelling it does not undo a delete that started.
        """
        now = self._clock()
        deleted = await self._db(self._purge_sync, now - self.retention_secs, now)
        if deleted:
            logger.info("journal retention deleted %d call(s)", deleted)
        return deleted

    # -- the IdempotencyStore interface --------------------------------------

    def forget(self, handler: str) -> None:
        """Nothing is dropped: other workers of the pool may still serve ``handler``.

        Recorded outcomes of a replaced handler age out by retention.
        """

    async def run(
        self,
        key: Key,
        factory: Callable[[], Awaitable[Any]],
        *,
        deadline: float | None = None,
    ) -> tuple[Any, bool]:
        """Return ``(result, replayed)``: the recorded outcome, or run ``factory`` once.

        A recorded error is raised again (the same ``RpcError`` subclass,
        message and details). ``deadline`` (event-loop time) bounds waiting for
        a twin that is still running on this or another worker.

        Raises:
            pilot_rpc.DeadlineExceeded: the twin was still running at ``deadline``.
            pilot_rpc.RpcError: the outcome of the handler (or the recorded one).
            JournalError: the journal is closed.
            sqlalchemy.exc.SQLAlchemyError: the database failed (the pipeline
                reports it as ``INTERNAL``).

        Cancelling a waiting duplicate does not affect the running call;
        cancelling the running call releases its lease (recorded steps stay).
        """
        self._start()
        loop = asyncio.get_running_loop()
        poll = _POLL_FIRST
        while True:
            local = self._local.get(key)
            if local is not None:
                self.waiting += 1
                try:
                    async with asyncio.timeout_at(deadline):
                        result = await asyncio.shield(local)
                except _Abandoned:
                    continue
                except TimeoutError:
                    raise self._deadline_error(key) from None
                finally:
                    self.waiting -= 1
                self.replays += 1
                return result, True
            try:
                kind, payload = await self._claim(key)
            except SQLAlchemyError as exc:
                raise Unavailable(
                    f"the idempotency journal is unavailable: {exc}",
                    details={"reason": "journal_unavailable", "retry_safe": True},
                    retry_safe=True,
                ) from exc
            if kind == "done":
                self.replays += 1
                return _outcome(payload), True
            if kind in ("claimed", "took_over"):
                if kind == "took_over":
                    self.takeovers += 1
                    logger.warning(
                        "took over call %s/%s: its previous worker's lease expired", key[0], key[2]
                    )
                return await self._run_owned(key, factory, payload), False
            if kind == "busy":
                if deadline is not None and loop.time() >= deadline:
                    raise self._deadline_error(key)
                wait = poll if deadline is None else min(poll, max(0.0, deadline - loop.time()))
                self.waiting += 1
                try:
                    await asyncio.sleep(wait)
                finally:
                    self.waiting -= 1
                poll = min(poll * 2, _POLL_MAX)

    async def _claim(self, key: Key) -> tuple[str, Any]:
        if self._closed:
            raise JournalError("the idempotency journal is closed")
        done, claimed = self._try_inline(self._insert_running_sync, key)
        if done:
            assert claimed is not None
            return claimed
        future = asyncio.wrap_future(
            self._executor.submit(self._with_conn, self._insert_running_sync, key)
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The claim may still succeed in its thread: release it then.
            def release(done: asyncio.Future[tuple[str, Any]]) -> None:
                if (
                    not done.cancelled()
                    and done.exception() is None
                    and done.result()[0] in ("claimed", "took_over")
                ):
                    self._executor.submit(self._with_conn, self._release_sync, key)

            future.add_done_callback(release)
            raise

    async def _run_owned(
        self, key: Key, factory: Callable[[], Awaitable[Any]], recorded: dict[str, bytes]
    ) -> Any:
        self.runs += 1
        local: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        local.add_done_callback(_retrieve)
        self._local[key] = local
        self._owned.add(key)
        token = current_scope().set(_Scope(self, key, recorded))
        try:
            try:
                value = await factory()
            finally:
                current_scope().reset(token)
        except RpcError as exc:
            if exc.code in _TRANSIENT:
                await self._give_up(key, local)
            else:
                await self._finish(key, "error", _error_blob(exc))
                local.set_exception(exc)
            raise
        except BaseException:
            await self._give_up(key, local)
            raise
        else:
            try:
                blob = _pack({"result": value})
            except (TypeError, ValueError, OverflowError) as exc:
                logger.warning(
                    "result of %s is not msgpack-encodable (%s): not recorded", key[0], exc
                )
                await self._give_up(key, local)
                return value
            await self._finish(key, "done", blob)
            local.set_result(value)
            return value
        finally:
            self._owned.discard(key)
            if not local.done():  # cancelled while recording: twins look again
                local.set_exception(_Abandoned())
            if self._local.get(key) is local:
                del self._local[key]

    async def _finish(self, key: Key, state: str, blob: bytes) -> None:
        try:
            recorded = await self._db(self._finish_sync, key, state, blob)
        except (SQLAlchemyError, JournalError) as exc:
            # The handler ran; its caller still gets the outcome. A retry may run it again.
            logger.error("journal: could not record the outcome of %s/%s: %s", key[0], key[2], exc)
            return
        if not recorded:
            logger.warning(
                "call %s/%s finished after its lease was taken over by another worker; "
                "its outcome was not recorded",
                key[0],
                key[2],
            )

    async def _give_up(self, key: Key, local: asyncio.Future[Any]) -> None:
        local.set_exception(_Abandoned())
        try:
            await self._db(self._release_sync, key)
        except (SQLAlchemyError, JournalError) as exc:
            logger.warning("journal: could not release %s/%s: %s", key[0], key[2], exc)

    def _deadline_error(self, key: Key) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"a duplicate of this call ({key[0]}, same idempotency key) was still running "
            "when the deadline passed",
            details={"reason": "timeout"},
        )


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
