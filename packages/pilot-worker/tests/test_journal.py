"""The shared idempotency journal: two journal instances on one database play two workers.

Every test runs on SQLite and, when ``PILOT_TEST_POSTGRES_URL`` is set, on
PostgreSQL (a scratch schema per test). Lease expiry and retention use a fake
wall clock; nothing here depends on real time passing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pilot_rpc import DeadlineExceeded, Internal, NotFound, ResourceExhausted, Unavailable
from pilot_worker import JournalError, WorkerServer, pilot_handler
from pilot_worker.journal import IdempotencyJournal
from pilot_worker.testing import WorkerTestClient

POSTGRES_ENV = "PILOT_TEST_POSTGRES_URL"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_kind" in metafunc.fixturenames:
        params = [pytest.param("sqlite", id="sqlite")]
        if os.environ.get(POSTGRES_ENV):
            params.append(pytest.param("postgres", id="postgres", marks=pytest.mark.postgres))
        metafunc.parametrize("db_kind", params)


@contextlib.contextmanager
def scratch_schema(base_url: str) -> Iterator[str]:
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    base = make_url(base_url)
    schema = f"j_{uuid.uuid4().hex[:16]}"
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield base.set(drivername="postgresql").render_as_string(hide_password=False) + (
            ("&" if base.query else "?") + "options=" + quote(f"-csearch_path={schema}")
        )
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def db_url(db_kind: str, tmp_path: Path) -> Iterator[str]:
    if db_kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'journal.db'}"
        return
    with scratch_schema(os.environ[POSTGRES_ENV]) as url:
        yield url


async def wait_until(condition: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pilot_handler("steps", idempotent=True)
async def steps(req: Any, ctx: Any) -> Any:
    if req == "twice":
        await ctx.step("a", lambda: 1)
        await ctx.step("a", lambda: 2)
    if req == "unencodable":
        await ctx.step("obj", object)
    return await ctx.step("sync-fn", lambda: "plain")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Pool:
    """Two workers (offline WorkerServers), each with its own journal on one database."""

    def __init__(self, url: str) -> None:
        self.clock = Clock()
        self.runs: Counter[str] = Counter()
        self.effects: Counter[str] = Counter()
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        # Worker A never renews its leases by itself (as if it died whenever the
        # fake clock moves past its lease); B renews on the usual schedule.
        self.journals = [
            IdempotencyJournal(
                url, lease_secs=10, retention_secs=3600, heartbeat_secs=hb, clock=self.clock
            )
            for hb in (3600.0, None)
        ]
        self.clients = [WorkerTestClient(self._worker(j)) for j in self.journals]

    def _worker(self, journal: IdempotencyJournal) -> WorkerServer:
        worker = WorkerServer(None, idempotency_store=journal)
        pool = self

        @pilot_handler("charge", idempotent=True, timeout_secs=None)
        async def charge(req: dict[str, Any], ctx: Any) -> dict[str, Any]:
            account = req["account"]
            pool.runs[account] += 1

            async def side_effect() -> dict[str, Any]:
                pool.effects[account] += 1
                return {"charged": req["amount"]}

            receipt = await ctx.step("charge", side_effect)
            started = pool.started.get(account)
            if started is not None:
                started.set()
            gate = pool.gates.get(account)
            if gate is not None:
                await gate.wait()
            error = req.get("error")
            if error == "not_found":
                raise NotFound("no such account", details={"account": account})
            if error == "busy":
                raise ResourceExhausted("try later")
            return {"receipt": receipt, "run": pool.runs[account]}

        worker.register(charge)
        worker.register(steps)
        return worker

    async def aclose(self) -> None:
        for journal in self.journals:
            await journal.aclose()


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[Pool]:
    made = Pool(db_url)
    try:
        yield made
    finally:
        await made.aclose()


async def test_a_completed_call_is_replayed_by_another_worker(pool: Pool) -> None:
    a, b = pool.clients
    first = await a.call("charge", {"account": "x", "amount": 5}, idempotency_key="k1")
    again = await b.call("charge", {"account": "x", "amount": 5}, idempotency_key="k1")
    assert first == again == {"receipt": {"charged": 5}, "run": 1}
    assert pool.runs["x"] == 1
    assert pool.effects["x"] == 1
    assert pool.journals[1].replays == 1
    # Another key, or the same key from another caller, is another call.
    await b.call("charge", {"account": "x", "amount": 5}, idempotency_key="k2")
    await b.call("charge", {"account": "x", "amount": 5}, idempotency_key="k1", caller="bob")
    assert pool.runs["x"] == 3


async def test_a_recorded_error_is_replayed_and_a_transient_one_is_not(pool: Pool) -> None:
    a, b = pool.clients
    request = {"account": "y", "amount": 1, "error": "not_found"}
    with pytest.raises(NotFound) as first:
        await a.call("charge", request, idempotency_key="e1")
    with pytest.raises(NotFound) as again:
        await b.call("charge", request, idempotency_key="e1")
    assert again.value.message == first.value.message == "no such account"
    assert again.value.details == {"account": "y"}
    assert pool.runs["y"] == 1
    busy = {"account": "z", "amount": 1, "error": "busy"}
    for client in (a, b):
        with pytest.raises(ResourceExhausted):
            await client.call("charge", busy, idempotency_key="e2")
    assert pool.runs["z"] == 2  # not recorded: each attempt ran
    assert pool.effects["z"] == 1  # but the step was recorded and replayed


async def test_concurrent_duplicates_on_two_workers_run_once(pool: Pool) -> None:
    a, b = pool.clients
    pool.gates["c"] = asyncio.Event()
    pool.started["c"] = asyncio.Event()
    request = {"account": "c", "amount": 2}
    first = asyncio.create_task(a.call("charge", request, idempotency_key="d1"))
    await pool.started["c"].wait()
    twin = asyncio.create_task(b.call("charge", request, idempotency_key="d1"))
    local_twin = asyncio.create_task(a.call("charge", request, idempotency_key="d1"))
    await wait_until(lambda: pool.journals[0].waiting == 1 and pool.journals[1].waiting == 1)
    assert not twin.done()
    assert not local_twin.done()
    pool.gates["c"].set()
    results = await asyncio.wait_for(asyncio.gather(first, twin, local_twin), 30)
    assert results == [{"receipt": {"charged": 2}, "run": 1}] * 3
    assert pool.runs["c"] == 1


async def test_a_duplicate_waits_no_longer_than_its_deadline(pool: Pool) -> None:
    a, b = pool.clients
    pool.gates["w"] = asyncio.Event()
    pool.started["w"] = asyncio.Event()
    request = {"account": "w", "amount": 2}
    first = asyncio.create_task(a.call("charge", request, idempotency_key="t1"))
    await pool.started["w"].wait()
    with pytest.raises(DeadlineExceeded) as info:
        await b.call("charge", request, idempotency_key="t1", timeout=0.2)
    assert info.value.details["reason"] == "timeout"
    with pytest.raises(DeadlineExceeded):
        await a.call("charge", request, idempotency_key="t1", timeout=0.2)
    pool.gates["w"].set()
    assert (await first)["run"] == 1


async def test_takeover_after_the_lease_expires_replays_recorded_steps(pool: Pool) -> None:
    a, b = pool.clients
    pool.gates["k"] = asyncio.Event()  # never set: worker A "hangs" after its step
    pool.started["k"] = asyncio.Event()
    request = {"account": "k", "amount": 7}
    stuck = asyncio.create_task(a.call("charge", request, idempotency_key="l1"))
    await pool.started["k"].wait()
    assert pool.effects["k"] == 1
    # While A's lease is valid, B waits; once it expired (A died), B takes over.
    waiting = asyncio.create_task(b.call("charge", request, idempotency_key="l1"))
    await wait_until(lambda: pool.journals[1].waiting == 1)
    assert not waiting.done()
    pool.gates.pop("k")
    pool.clock.now += 11  # past the 10 s lease: A stopped renewing it
    assert await asyncio.wait_for(waiting, 30) == {"receipt": {"charged": 7}, "run": 2}
    assert pool.effects["k"] == 1  # the step was replayed, not re-run
    assert pool.journals[1].takeovers == 1
    assert pool.journals[1].steps_replayed == 1
    # The first worker finishing late does not overwrite the recorded outcome.
    pool.gates["k"] = asyncio.Event()
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    again = await a.call("charge", request, idempotency_key="l1")
    assert again == {"receipt": {"charged": 7}, "run": 2}


async def test_a_cancelled_call_releases_its_lease_and_keeps_its_steps(pool: Pool) -> None:
    a, b = pool.clients
    pool.gates["r"] = asyncio.Event()
    pool.started["r"] = asyncio.Event()
    request = {"account": "r", "amount": 3}
    first = asyncio.create_task(a.call("charge", request, idempotency_key="c1"))
    await pool.started["r"].wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    pool.gates.pop("r")
    # No lease to wait for: the retry runs at once (same fake time) and replays the step.
    assert await b.call("charge", request, idempotency_key="c1") == {
        "receipt": {"charged": 3},
        "run": 2,
    }
    assert pool.effects["r"] == 1


async def test_retention_deletes_old_finished_calls_only(pool: Pool) -> None:
    a, b = pool.clients
    await a.call("charge", {"account": "o", "amount": 1}, idempotency_key="old")
    pool.gates["n"] = asyncio.Event()
    pool.started["n"] = asyncio.Event()
    running = asyncio.create_task(
        a.call("charge", {"account": "n", "amount": 1}, idempotency_key="new")
    )
    await pool.started["n"].wait()
    pool.clock.now += 3601
    # Worker A is alive: renew its lease as its heartbeat would at this time.
    node = a.peer("test-caller").node_id
    await pool.journals[0]._db(pool.journals[0]._renew_sync, [("charge", node, "new")])
    assert await pool.journals[1].purge_expired() == 1
    assert await pool.journals[1].purge_expired() == 0
    await b.call("charge", {"account": "o", "amount": 1}, idempotency_key="old")
    assert pool.runs["o"] == 2  # forgotten: ran again
    assert pool.effects["o"] == 2
    pool.gates["n"].set()
    await running
    assert pool.runs["n"] == 1


async def test_step_misuse_is_a_clear_error(pool: Pool) -> None:
    a, _ = pool.clients
    assert await a.call("steps", "ok", idempotency_key="s1") == "plain"
    with pytest.raises(Internal, match=r"JournalError.*already ran"):
        await a.call("steps", "twice", idempotency_key="s2")
    with pytest.raises(Internal, match=r"JournalError.*msgpack cannot encode"):
        await a.call("steps", "unencodable", idempotency_key="s3")


async def test_steps_without_a_journal_simply_run() -> None:
    calls: list[int] = []

    @pilot_handler("plain", idempotent=True)
    async def plain(req: Any, ctx: Any) -> Any:
        return await ctx.step("one", lambda: calls.append(1) or len(calls))

    client = WorkerTestClient([plain])
    assert await client.call("plain", None) == 1
    assert await client.call("plain", None) == 2
    assert await client.call("plain", None, idempotency_key="k") == 3
    assert await client.call("plain", None, idempotency_key="k") == 3  # in-memory replay


async def test_the_journal_being_down_is_unavailable_and_retry_safe(tmp_path: Path) -> None:
    journal = IdempotencyJournal(f"sqlite:///{tmp_path / 'j.db'}")
    worker = WorkerServer(None, idempotency_store=journal)
    worker.register(steps)
    client = WorkerTestClient(worker)
    journal._engine.dispose()
    (tmp_path / "j.db").unlink()
    (tmp_path / "j.db").mkdir()  # the database file is now a directory: cannot open
    with pytest.raises(Unavailable) as info:
        await client.call("steps", "ok", idempotency_key="x")
    assert info.value.retry_safe
    assert info.value.details["reason"] == "journal_unavailable"
    await journal.aclose()


@pytest.mark.parametrize(
    "url",
    ["mysql://u@h/db", "sqlite://", "sqlite:///:memory:", "no url", "postgresql+psycopg2://h/db"],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(JournalError, match="idempotency-store"):
        IdempotencyJournal(url)


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="lease_secs"):
        IdempotencyJournal(f"sqlite:///{tmp_path / 'j.db'}", lease_secs=0)


def test_the_sqlite_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "journal.db"
    journal = IdempotencyJournal(f"sqlite:///{path}")
    try:
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        asyncio.run(journal.aclose())
