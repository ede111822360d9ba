"""Per-thread run leases in the store, and ``exclusive_runs`` around a graph's runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pilot_checkpoint_sqlite import (
    CheckpointService,
    CheckpointStore,
    LocalStoreBackend,
    PilotCheckpointSaver,
    exclusive_runs,
)
from pilot_checkpoint_sqlite.errors import (
    CheckpointConfigError,
    CheckpointProtocolError,
    CheckpointUsageError,
    RunLeaseLostError,
    ThreadBusyError,
    ThreadBusyTimeout,
)

WAIT = 30.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(store: CheckpointStore) -> FakeClock:
    fake = FakeClock()
    store.clock = fake
    return fake


def _config(thread_id: str = "t") -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}}


async def test_one_holder_at_a_time_until_release(
    saver: PilotCheckpointSaver, clock: FakeClock
) -> None:
    first = await saver.aacquire_thread_lease("t", "run-a", 30)
    assert first.granted
    assert first.holder == "run-a"
    assert first.expires_in == 30
    other = await saver.aacquire_thread_lease("t", "run-b", 30)
    assert not other.granted
    assert other.holder == "run-a"
    # Repeating an acquire is safe: the holder keeps (and extends) its lease.
    clock.now += 10
    again = await saver.aacquire_thread_lease("t", "run-a", 30)
    assert again.granted
    assert again.expires_in == 30
    # Other threads are independent.
    assert (await saver.aacquire_thread_lease("u", "run-b", 30)).granted
    # Releasing someone else's lease is a no-op.
    await saver.arelease_thread_lease("t", "run-b")
    assert not (await saver.aacquire_thread_lease("t", "run-b", 30)).granted
    await saver.arelease_thread_lease("t", "run-a")
    await saver.arelease_thread_lease("t", "run-a")
    assert (await saver.aacquire_thread_lease("t", "run-b", 30)).granted


async def test_an_expired_lease_is_taken_over_and_its_holder_learns_it(
    saver: PilotCheckpointSaver, clock: FakeClock
) -> None:
    assert (await saver.aacquire_thread_lease("t", "dead", 5)).granted
    clock.now += 4.9
    assert not (await saver.aacquire_thread_lease("t", "next", 5)).granted
    renewed = await saver.arenew_thread_lease("t", "dead", 5)
    assert renewed.granted
    assert renewed.expires_in == 5
    clock.now += 5.1  # the holder stopped renewing: it died
    taken = await saver.aacquire_thread_lease("t", "next", 5)
    assert taken.granted
    late = await saver.arenew_thread_lease("t", "dead", 5)
    assert not late.granted
    assert late.holder == "next"


async def test_leases_are_scoped_like_threads(store: CheckpointStore, clock: FakeClock) -> None:
    service = CheckpointService(store)
    alice = PilotCheckpointSaver(backend=LocalStoreBackend(service, caller_node_id="alice"))
    bob = PilotCheckpointSaver(backend=LocalStoreBackend(service, caller_node_id="bob"))
    assert (await alice.aacquire_thread_lease("t", "a", 30)).granted
    assert (await bob.aacquire_thread_lease("t", "b", 30)).granted
    shared = CheckpointService(store, shared=True)
    one = PilotCheckpointSaver(backend=LocalStoreBackend(shared, caller_node_id="alice"))
    two = PilotCheckpointSaver(backend=LocalStoreBackend(shared, caller_node_id="bob"))
    assert (await one.aacquire_thread_lease("t", "a", 30)).granted
    assert not (await two.aacquire_thread_lease("t", "b", 30)).granted


@pytest.mark.parametrize(
    "payload",
    [
        {"thread_id": "t", "holder": "h", "ttl": 0},
        {"thread_id": "t", "holder": "h", "ttl": 3601},
        {"thread_id": "t", "holder": "h", "ttl": float("nan")},
        {"thread_id": "t", "holder": "h", "ttl": True},
        {"thread_id": "t", "holder": "", "ttl": 5},
        {"thread_id": "", "holder": "h", "ttl": 5},
    ],
)
async def test_bad_lease_requests_are_refused(
    store: CheckpointStore, payload: dict[str, Any]
) -> None:
    with pytest.raises(CheckpointProtocolError):
        await CheckpointService(store).handle("lease_acquire", payload, caller_node_id="x")


class FakeGraph:
    """Stands in for a compiled graph: each run waits until the test lets it finish."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.runs: list[Any] = []

    async def ainvoke(self, input: Any, config: Any, **kwargs: Any) -> Any:
        self.runs.append(input)
        self.started.set()
        await self.finish.wait()
        return {"done": input, **kwargs}

    async def astream(self, input: Any, config: Any, **kwargs: Any) -> AsyncIterator[Any]:
        self.runs.append(input)
        for i in range(3):
            yield {"step": i}

    def invoke(self, input: Any, config: Any, **kwargs: Any) -> Any:
        self.runs.append(input)
        return {"done": input}

    def stream(self, input: Any, config: Any, **kwargs: Any) -> Iterator[Any]:
        self.runs.append(input)
        yield {"step": 0}
        yield {"step": 1}

    def get_state(self, config: Any) -> str:
        return "state"


async def test_reject_refuses_a_second_concurrent_run_clearly(saver: PilotCheckpointSaver) -> None:
    graph = FakeGraph()
    app = exclusive_runs(graph, saver, multitask_strategy="reject")
    first = asyncio.create_task(app.ainvoke("one", _config(), durability="sync"))
    await asyncio.wait_for(graph.started.wait(), WAIT)
    with pytest.raises(ThreadBusyError) as caught:
        await app.ainvoke("two", _config())
    assert caught.value.thread_id == "t"
    assert "busy" in str(caught.value)
    assert "reject" in str(caught.value)
    assert caught.value.holder  # names the run holding the thread
    with pytest.raises(ThreadBusyError):
        await asyncio.to_thread(app.invoke, "three", _config())
    # Another thread is not affected.
    assert await asyncio.to_thread(app.invoke, "other", _config("u")) == {"done": "other"}
    graph.finish.set()
    assert await asyncio.wait_for(first, WAIT) == {"done": "one", "durability": "sync"}
    assert graph.runs == ["one", "other"]
    # Released at the end: the next run goes through.
    assert await asyncio.to_thread(app.invoke, "four", _config()) == {"done": "four"}
    assert app.get_state(_config()) == "state"  # everything else is the graph's


async def test_enqueue_waits_for_its_turn_and_times_out(saver: PilotCheckpointSaver) -> None:
    graph = FakeGraph()
    app = exclusive_runs(graph, saver, multitask_strategy="enqueue", enqueue_timeout=WAIT)
    first = asyncio.create_task(app.ainvoke("one", _config()))
    await asyncio.wait_for(graph.started.wait(), WAIT)
    with pytest.raises(ThreadBusyTimeout) as caught:
        await exclusive_runs(
            graph, saver, multitask_strategy="enqueue", enqueue_timeout=0.2
        ).ainvoke("late", _config())
    assert isinstance(caught.value, TimeoutError)
    second = asyncio.create_task(app.ainvoke("two", _config()))
    # The per-call override rejects instead of queueing.
    with pytest.raises(ThreadBusyError):
        await app.ainvoke("three", _config(), multitask_strategy="reject")
    assert graph.runs == ["one"]
    graph.finish.set()
    assert await asyncio.wait_for(first, WAIT) == {"done": "one"}
    assert await asyncio.wait_for(second, WAIT) == {"done": "two"}
    assert graph.runs == ["one", "two"]


async def test_the_lease_is_released_on_error_cancel_and_stream_close(
    saver: PilotCheckpointSaver,
) -> None:
    graph = FakeGraph()
    app = exclusive_runs(graph, saver)
    run = asyncio.create_task(app.ainvoke("one", _config()))
    await asyncio.wait_for(graph.started.wait(), WAIT)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert (await saver.aacquire_thread_lease("t", "probe", 30)).granted
    await saver.arelease_thread_lease("t", "probe")

    stream = app.astream("s", _config())
    assert await anext(stream) == {"step": 0}
    assert not (await saver.aacquire_thread_lease("t", "probe", 30)).granted
    await stream.aclose()
    assert (await saver.aacquire_thread_lease("t", "probe", 30)).granted
    await saver.arelease_thread_lease("t", "probe")

    assert [x async for x in app.astream("s2", _config())] == [{"step": i} for i in range(3)]
    assert await asyncio.to_thread(lambda: list(app.stream("s3", _config()))) == [
        {"step": 0},
        {"step": 1},
    ]

    class Boom(Exception):
        pass

    class Failing(FakeGraph):
        async def ainvoke(self, input: Any, config: Any, **kwargs: Any) -> Any:
            raise Boom

    with pytest.raises(Boom):
        await exclusive_runs(Failing(), saver).ainvoke("x", _config())
    assert (await saver.aacquire_thread_lease("t", "probe", 30)).granted


async def test_bad_arguments_are_usage_errors(saver: PilotCheckpointSaver) -> None:
    graph = FakeGraph()
    with pytest.raises(CheckpointConfigError, match="multitask_strategy"):
        exclusive_runs(graph, saver, multitask_strategy="interrupt")  # pyright: ignore[reportArgumentType]
    with pytest.raises(CheckpointConfigError, match="lease_ttl"):
        exclusive_runs(graph, saver, lease_ttl=0)
    with pytest.raises(CheckpointUsageError, match="thread_id"):
        await exclusive_runs(graph, saver).ainvoke("x", {"configurable": {}})
    assert graph.runs == []


class WatchedSaver(PilotCheckpointSaver):
    """Tells the test when a renewal found the lease taken."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost_seen = asyncio.Event()

    async def arenew_thread_lease(self, thread_id: str, holder: str, ttl: float) -> Any:
        lease = await super().arenew_thread_lease(thread_id, holder, ttl)
        if not lease.granted:
            self.lost_seen.set()
        return lease


async def test_a_run_whose_lease_was_taken_over_is_told(
    store: CheckpointStore, clock: FakeClock
) -> None:
    saver = WatchedSaver(backend=LocalStoreBackend(CheckpointService(store)))
    graph = FakeGraph()
    app = exclusive_runs(graph, saver, lease_ttl=0.3)
    run = asyncio.create_task(app.ainvoke("slow", _config()))
    await asyncio.wait_for(graph.started.wait(), WAIT)
    clock.now += 10  # the run stalled past its TTL...
    assert (await saver.aacquire_thread_lease("t", "newcomer", 30)).granted  # ...and lost it
    await asyncio.wait_for(saver.lost_seen.wait(), WAIT)
    graph.finish.set()
    with pytest.raises(RunLeaseLostError, match="lost its lease"):
        await asyncio.wait_for(run, WAIT)
    # The newcomer's lease is untouched by the loser's release.
    assert not (await saver.aacquire_thread_lease("t", "third", 30)).granted
    await saver.aclose()


async def test_astream_events_holds_the_lease_until_closed(saver: PilotCheckpointSaver) -> None:
    class Events(FakeGraph):
        async def astream_events(
            self, input: Any, config: Any, **kwargs: Any
        ) -> AsyncIterator[Any]:
            for i in range(3):
                yield {"event": i, **kwargs}

    app = exclusive_runs(Events(), saver)
    events = app.astream_events("x", _config(), version="v2")
    assert await anext(events) == {"event": 0, "version": "v2"}
    with pytest.raises(ThreadBusyError):
        await app.ainvoke("y", _config())
    await events.aclose()
    assert (await saver.aacquire_thread_lease("t", "probe", 30)).granted


async def test_only_a_resume_of_the_same_run_takes_a_live_lease_over(
    saver: PilotCheckpointSaver, clock: FakeClock
) -> None:
    first = await saver.aacquire_thread_lease("t", "attempt-1", 30, run_id="run-a")
    assert first.granted
    assert first.run_id == "run-a"
    assert first.took_over == ""
    # Another run never takes a live lease: not as a resume, not without a run id.
    for run_id, resume in (("run-b", True), ("run-b", False), (None, True), ("", True)):
        refused = await saver.aacquire_thread_lease(
            "t", "intruder", 30, run_id=run_id, resume=resume
        )
        assert not refused.granted, (run_id, resume)
        assert refused.holder == "attempt-1"
        assert refused.run_id == "run-a"
    # The same run id without the resume flag waits like anyone else.
    assert not (await saver.aacquire_thread_lease("t", "attempt-2", 30, run_id="run-a")).granted
    # A resume of the same run takes it over at once (the clock did not move).
    taken = await saver.aacquire_thread_lease("t", "attempt-2", 30, run_id="run-a", resume=True)
    assert taken.granted
    assert taken.holder == "attempt-2"
    assert taken.took_over == "attempt-1"
    # The earlier attempt is fenced off: its renewal is refused, its release is a no-op.
    late = await saver.arenew_thread_lease("t", "attempt-1", 30)
    assert not late.granted
    assert late.holder == "attempt-2"
    await saver.arelease_thread_lease("t", "attempt-1")
    assert not (await saver.aacquire_thread_lease("t", "probe", 30, run_id="run-b")).granted
    # Repeating the resume acquire is safe and displaces nobody.
    again = await saver.aacquire_thread_lease("t", "attempt-2", 30, run_id="run-a", resume=True)
    assert again.granted
    assert again.took_over == ""
    # A lease taken without a run id is never taken over while live.
    assert (await saver.aacquire_thread_lease("u", "anonymous", 30)).granted
    assert not (await saver.aacquire_thread_lease("u", "x", 30, run_id="", resume=True)).granted


async def test_a_resume_acquire_of_a_free_or_expired_lease_displaces_nobody(
    saver: PilotCheckpointSaver, clock: FakeClock
) -> None:
    fresh = await saver.aacquire_thread_lease("t", "a", 5, run_id="run-a", resume=True)
    assert fresh.granted
    assert fresh.took_over == ""
    clock.now += 6  # expired: anyone may take it, and nobody live was displaced
    taken = await saver.aacquire_thread_lease("t", "b", 5, run_id="run-a", resume=True)
    assert taken.granted
    assert taken.took_over == ""


@pytest.mark.parametrize(
    "extra", [{"run_id": 7}, {"run_id": "r" * 2000}, {"resume": "yes"}, {"resume": 1}]
)
async def test_bad_resume_fields_are_refused(store: CheckpointStore, extra: dict[str, Any]) -> None:
    payload = {"thread_id": "t", "holder": "h", "ttl": 5, **extra}
    with pytest.raises(CheckpointProtocolError):
        await CheckpointService(store).handle("lease_acquire", payload, caller_node_id="x")


class BlockingGraph(FakeGraph):
    """A graph whose runs block in a step until cancelled; it records the cancellation."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = asyncio.Event()

    async def ainvoke(self, input: Any, config: Any, **kwargs: Any) -> Any:
        self.runs.append(input)
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def astream(self, input: Any, config: Any, **kwargs: Any) -> AsyncIterator[Any]:
        self.runs.append(input)
        yield {"step": 0}
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield {"step": 1}


@pytest.mark.parametrize("method", ["ainvoke", "astream"])
async def test_a_resumed_run_takes_over_and_the_live_earlier_attempt_stops(
    saver: PilotCheckpointSaver, clock: FakeClock, method: str
) -> None:
    """Two attempts of one run never go on together: the displaced one is cancelled."""
    config = {**_config(), "run_id": "6f1c2b0e-0000-4000-8000-000000000001"}
    stuck = BlockingGraph()
    # a short TTL: the earlier attempt renews (and learns it lost) every 0.1 s
    earlier = exclusive_runs(stuck, saver, lease_ttl=0.3)

    async def first_attempt() -> Any:
        if method == "ainvoke":
            return await earlier.ainvoke("x", config)
        return [item async for item in earlier.astream("x", config)]

    first = asyncio.create_task(first_attempt())
    await asyncio.wait_for(stuck.started.wait(), WAIT)
    # Another run id is refused at once, and does not disturb the run.
    with pytest.raises(ThreadBusyError):
        await exclusive_runs(FakeGraph(), saver).ainvoke(
            "y", {**_config(), "run_id": "another"}, resume=True
        )
    assert not first.done()
    resumed = exclusive_runs(FakeGraph(), saver, lease_ttl=30)
    # The clock never moves: the lease is taken over, not expired.
    done = resumed.astream("x", config, resume=True)
    assert [item async for item in done] == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert resumed.takeovers == 1
    with pytest.raises(RunLeaseLostError, match="lost its lease"):
        await asyncio.wait_for(first, WAIT)
    assert stuck.cancelled.is_set()  # stopped mid-step, not at its next item
    assert earlier.takeovers == 0


async def test_a_version_3_lease_table_is_migrated_and_its_leases_kept(db_url: str) -> None:
    from pilot_checkpoint_sqlite import open_store
    from pilot_checkpoint_sqlite._schema import SCHEMA_VERSION, migrations_table
    from sqlalchemy import delete, text

    store = await open_store(db_url)
    await store.aclose()
    # Back to the previous release's layout, with a live lease of an old holder in it.
    with store._engine.begin() as conn:  # pyright: ignore[reportPrivateUsage]
        conn.execute(text("ALTER TABLE pilot_run_leases DROP COLUMN run_id"))
        conn.execute(delete(migrations_table).where(migrations_table.c.version == 4))
        conn.execute(
            text(
                "INSERT INTO pilot_run_leases (scope, thread_id, holder, acquired_at, expires_at) "
                "VALUES ('local', 't', 'old-holder', 0, 1e12)"
            )
        )
    store._engine.dispose()  # pyright: ignore[reportPrivateUsage]
    assert SCHEMA_VERSION == 4
    reopened = await open_store(db_url)
    saver = PilotCheckpointSaver(backend=LocalStoreBackend(CheckpointService(reopened)))
    try:
        assert reopened.schema_version == SCHEMA_VERSION
        held = await saver.aacquire_thread_lease("t", "new", 30, run_id="r", resume=True)
        assert not held.granted  # a lease of no recorded run is never taken over
        assert held.holder == "old-holder"
        assert held.run_id == ""
        assert (await saver.aacquire_thread_lease("u", "new", 30, run_id="r")).granted
    finally:
        await saver.aclose()
        await reopened.aclose()
