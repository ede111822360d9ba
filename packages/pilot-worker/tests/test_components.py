"""Unit tests of the building blocks: limits, idempotency cache, sync pool, percentiles."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any

import pytest
from pilot_worker._idempotency import IdempotencyCache
from pilot_worker._limits import ConcurrencyGate, GateFull, SlidingWindowLimiter
from pilot_worker._metrics import percentiles
from pilot_worker._pool import SyncPool
from pilot_worker.errors import WorkerConfigError


def test_sliding_window_is_exact() -> None:
    limiter = SlidingWindowLimiter(3, 10.0, max_callers=100)
    assert limiter.try_acquire("a", 0.0) is None
    assert limiter.try_acquire("a", 4.0) is None
    assert limiter.try_acquire("a", 9.0) is None
    # Fourth call inside the window: refused until the first leaves it at t=10.
    assert limiter.try_acquire("a", 9.5) == pytest.approx(0.5)
    assert limiter.try_acquire("a", 10.0) is None
    # At t=14.5 the call at t=4 has left the window: room for one more.
    assert limiter.try_acquire("a", 14.5) is None
    assert limiter.try_acquire("a", 14.6) == pytest.approx(4.4)
    assert limiter.try_acquire("b", 9.5) is None


def test_sliding_window_tracks_bounded_callers() -> None:
    limiter = SlidingWindowLimiter(1, 60.0, max_callers=2)
    for caller in ("a", "b", "c"):
        assert limiter.try_acquire(caller, 0.0) is None
    assert limiter.tracked_callers == 2
    # "a" was evicted (least recently seen), so it starts afresh.
    assert limiter.try_acquire("a", 1.0) is None
    assert limiter.try_acquire("c", 1.0) is not None


async def test_gate_reject_and_queue_handoff() -> None:
    gate = ConcurrencyGate(1, overflow="reject", max_queued=1)
    await gate.acquire()
    with pytest.raises(GateFull) as info:
        await gate.acquire()
    assert info.value.reason == "concurrency_limit"
    gate.release()
    assert gate.active == 0

    queue = ConcurrencyGate(1, overflow="queue", max_queued=1)
    await queue.acquire()
    waiter = asyncio.create_task(queue.acquire())
    async with asyncio.timeout(5):
        while queue.queued == 0:
            await asyncio.sleep(0)
    with pytest.raises(GateFull, match="queue_full"):
        await queue.acquire()
    queue.release()
    await waiter
    assert queue.active == 1
    queue.release()
    assert queue.active == 0


async def test_gate_cancelled_waiter_keeps_no_slot() -> None:
    gate = ConcurrencyGate(1, overflow="queue", max_queued=4)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    async with asyncio.timeout(5):
        while gate.queued == 0:
            await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.queued == 0
    gate.release()
    assert gate.active == 0


async def test_idempotency_cache_ttl_size_and_scoping() -> None:
    now = [0.0]
    cache = IdempotencyCache(ttl_secs=10, max_entries=2, clock=lambda: now[0])
    runs: list[str] = []

    async def make(value: str) -> str:
        runs.append(value)
        return value

    assert await cache.run(("h", "alice", "k"), lambda: make("1")) == ("1", False)
    assert await cache.run(("h", "alice", "k"), lambda: make("2")) == ("1", True)
    assert await cache.run(("h", "bob", "k"), lambda: make("3")) == ("3", False)
    assert await cache.run(("h", "carol", "k"), lambda: make("4")) == ("4", False)
    assert len(cache) == 2  # alice's entry was evicted (oldest first)
    assert await cache.run(("h", "alice", "k"), lambda: make("5")) == ("5", False)
    now[0] = 11.0
    assert await cache.run(("h", "alice", "k"), lambda: make("6")) == ("6", False)
    assert runs == ["1", "3", "4", "5", "6"]


async def test_idempotency_waiter_takes_over_when_first_is_cancelled() -> None:
    cache = IdempotencyCache(ttl_secs=10, max_entries=10)
    gate = asyncio.Event()
    runs: list[int] = []

    async def slow() -> str:
        runs.append(1)
        await gate.wait()
        return "done"

    first = asyncio.create_task(cache.run(("h", "a", "k"), slow))
    async with asyncio.timeout(5):
        while not runs:
            await asyncio.sleep(0)
    twin = asyncio.create_task(cache.run(("h", "a", "k"), slow))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    async with asyncio.timeout(5):
        while len(runs) < 2:
            await asyncio.sleep(0)
    gate.set()
    assert await twin == ("done", False)


async def test_sync_pool_bounds_threads_and_reports_busy() -> None:
    pool = SyncPool(2)
    release = threading.Event()
    running = threading.Semaphore(0)

    def job(n: int) -> int:
        running.release()
        assert release.wait(10)
        return n

    tasks = [asyncio.create_task(pool.run(job, n)) for n in range(3)]
    await asyncio.to_thread(running.acquire, True, 5)
    await asyncio.to_thread(running.acquire, True, 5)
    assert pool.busy == 2
    # The third job waits for a thread; it has not started.
    assert not running.acquire(blocking=False)
    release.set()
    assert await asyncio.gather(*tasks) == [0, 1, 2]
    async with asyncio.timeout(5):
        await pool.wait_idle()
    assert pool.busy == 0
    pool.close()


async def test_sync_pool_propagates_exceptions() -> None:
    pool = SyncPool(1)

    def boom() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await pool.run(boom)
    pool.close()


def test_percentiles() -> None:
    samples: deque[float] = deque([0.001 * i for i in range(1, 101)])
    out: dict[str, Any] = percentiles(samples, (50.0, 90.0, 99.0))
    assert out == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert percentiles(deque(), (50.0,)) == {"p50": None}


def test_per_peer_connection_cap_reaches_pilot_rpc_when_it_can(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import dataclasses

    from pilot_rpc import ServerOptions
    from pilot_worker import WorkerConfig
    from pilot_worker._lifecycle import server_options

    assert server_options(WorkerConfig()) == ServerOptions()
    with caplog.at_level(logging.WARNING, logger="pilot_worker"):
        options = server_options(WorkerConfig(max_connections_per_peer=3))
    if "max_connections_per_peer" in {f.name for f in dataclasses.fields(ServerOptions)}:
        assert options.max_connections_per_peer == 3  # pyright: ignore[reportAttributeAccessIssue]
    else:
        assert "max_connections_per_peer=3 is ignored" in caplog.text
    with pytest.raises(WorkerConfigError):
        WorkerConfig(max_connections_per_peer=0)
