"""WorkerServer over a real RpcServer and transport (memory://, in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pilot_rpc import (
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    RpcClient,
    Unavailable,
)
from pilot_transport import open_transport
from pilot_transport.testing import create_test_peers
from pilot_worker import Context, HandlerSpec, WorkerConfig, WorkerServer, pilot_handler

_hubs = itertools.count()


@pilot_handler("echo")
async def echo(payload: Any, ctx: Context) -> dict[str, Any]:
    return {"payload": payload, "caller": ctx.caller_node_id, "name": ctx.caller_name}


@pilot_handler("count")
async def count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@pilot_handler("sum", input_model=list[int])
def total(values: list[int]) -> int:
    return sum(values)


class Env:
    def __init__(self, worker: WorkerServer, client: RpcClient, node_ids: dict[str, str]) -> None:
        self.worker = worker
        self.client = client
        self.node_ids = node_ids

    async def call(self, method: str, payload: Any = None, **kwargs: Any) -> Any:
        return await self.client.call("worker", 5000, method, payload, **kwargs)


async def _env(tmp_path: Path, config: WorkerConfig, handlers: list[Any]) -> AsyncIterator[Env]:
    peers = create_test_peers(tmp_path, ["client", "worker", "other"])
    hub = f"memory://worker-tests-{next(_hubs)}"
    async with (
        open_transport(hub, identity=peers["worker"].identity, trust=peers["worker"].trust) as wt,
        open_transport(hub, identity=peers["client"].identity, trust=peers["client"].trust) as ct,
    ):
        worker = WorkerServer(wt, config)
        for handler in handlers:
            worker.register(handler)
        async with worker:
            client = RpcClient(ct)
            try:
                yield Env(worker, client, {n: p.identity.node_id for n, p in peers.items()})
            finally:
                await client.aclose()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for item in _env(tmp_path, WorkerConfig(port=5000), [echo, count, total]):
        yield item


async def test_unary_streaming_and_context(env: Env) -> None:
    reply = await env.call("echo", {"x": 1})
    assert reply == {"payload": {"x": 1}, "caller": env.node_ids["client"], "name": "client"}
    async with env.client.stream("worker", 5000, "count", 4) as items:
        assert [item async for item in items] == [0, 1, 2, 3]
    assert await env.call("sum", [1, 2, 3]) == 6
    with pytest.raises(InvalidArgument) as info:
        await env.call("sum", ["x"])
    assert info.value.details["errors"][0]["loc"] == ["0"]
    health = await env.call("_health")
    assert health["ok"] is True
    assert health["status"] == "serving"
    names = [h["name"] for h in await env.call("_handlers")]
    assert names == ["_handlers", "_health", "count", "echo", "sum"]


async def test_acl_uses_authenticated_node_ids(tmp_path: Path) -> None:
    async for env in _env(tmp_path, WorkerConfig(port=5000, default_policy="closed"), [echo]):
        with pytest.raises(PermissionDenied):
            await env.call("echo", 1)
        with pytest.raises(PermissionDenied):
            await env.call("_health")
        env.worker.replace_handlers(
            remove=["echo"],
            add=[HandlerSpec(name="echo", fn=echo, allow=[env.node_ids["client"]])],
        )
        assert (await env.call("echo", 1))["caller"] == env.node_ids["client"]


async def test_limits_over_rpc(tmp_path: Path) -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    @pilot_handler("one", max_concurrent=1, rate_per_caller=2, rate_window_secs=60)
    async def one(payload: Any) -> str:
        entered.set()
        await gate.wait()
        return "ok"

    @pilot_handler("slow", timeout_secs=0.1)
    async def slow(payload: Any) -> None:
        await asyncio.Event().wait()

    async for env in _env(tmp_path, WorkerConfig(port=5000), [one, slow]):
        first = asyncio.create_task(env.call("one"))
        await entered.wait()
        with pytest.raises(ResourceExhausted) as busy:
            await env.call("one")
        assert busy.value.details["reason"] == "concurrency_limit"
        gate.set()
        assert await first == "ok"
        # Both calls above passed the ACL, so both count towards the rate limit.
        with pytest.raises(ResourceExhausted) as rate:
            await env.call("one")
        assert rate.value.details["reason"] == "rate_limit"
        with pytest.raises(DeadlineExceeded):
            await env.call("slow")


async def test_drain_finishes_in_flight_and_refuses_new(tmp_path: Path) -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    @pilot_handler("work", timeout_secs=None)
    async def work(payload: Any) -> str:
        entered.set()
        await gate.wait()
        return "finished"

    async for env in _env(tmp_path, WorkerConfig(port=5000), [work, echo]):
        running = asyncio.create_task(env.call("work"))
        await entered.wait()
        draining = asyncio.create_task(env.worker.drain(5))
        async with asyncio.timeout(5):
            while env.worker.state != "draining":
                await asyncio.sleep(0)
        assert not await env.worker.check_ready()
        # The RPC server sent GOAWAY and serves no new connection: a new call fails.
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await env.call("echo", 1, timeout=0.5)
        gate.set()
        assert await running == "finished"
        assert await draining == 0


async def test_drain_cuts_after_timeout(tmp_path: Path) -> None:
    entered = asyncio.Event()

    @pilot_handler("stuck", timeout_secs=None)
    async def stuck(payload: Any) -> None:
        entered.set()
        await asyncio.Event().wait()

    async for env in _env(tmp_path, WorkerConfig(port=5000), [stuck]):
        running = asyncio.create_task(env.call("stuck"))
        await entered.wait()
        assert await env.worker.drain(0.1) == 1
        with pytest.raises(Unavailable):
            await running


async def test_periodic_tasks_and_shutdown_hooks(tmp_path: Path) -> None:
    runs: list[str] = []
    three = asyncio.Event()
    failed = asyncio.Event()
    order: list[str] = []

    async def tick() -> None:
        runs.append("async")
        if len(runs) >= 3:
            three.set()

    loop = asyncio.get_running_loop()
    attempts: list[int] = []

    def sync_fails() -> None:  # runs on a pool thread
        attempts.append(1)
        if len(attempts) == 2:
            # Runs never overlap, so the first failure has been counted by now.
            loop.call_soon_threadsafe(failed.set)
        raise RuntimeError("periodic failure")

    async for env in _env(tmp_path, WorkerConfig(port=5000), [echo]):
        worker = env.worker
        worker.add_periodic(0.01, tick, name="tick", run_immediately=True)
        worker.add_periodic(0.01, sync_fails, name="fails", run_immediately=True)
        worker.on_shutdown(lambda: order.append("first registered"))

        async def second() -> None:
            order.append("second registered")

        worker.on_shutdown(second)
        async with asyncio.timeout(5):
            await three.wait()
        async with asyncio.timeout(5):
            await failed.wait()
        failures = worker.metrics_registry.get_sample_value(
            "pilot_worker_periodic_failures_total", {"task": "fails"}
        )
        assert failures is not None
        assert failures >= 1
        await worker.aclose()
        count = len(runs)
        # Stopped with the worker: no run after close, hooks in reverse order.
        assert [p.task.done() for p in worker._lifecycle.periodic] == [True, True]  # type: ignore[union-attr]
        assert len(runs) == count
        assert order == ["second registered", "first registered"]


async def test_own_timeout_over_rpc_answers_at_once_without_a_timer_task(tmp_path: Path) -> None:
    """A handler timeout earlier than the caller's deadline is enforced by pilot-rpc itself.

    The handler runs on the call's own task (no child task per call); at its
    timeout the call is answered with the worker's DEADLINE_EXCEEDED even
    though the handler catches its cancellation, and it keeps its slot until
    it really returns.
    """
    release = asyncio.Event()
    tasks: list[asyncio.Task[Any] | None] = []
    returned: list[str] = []

    @pilot_handler("stubborn", timeout_secs=0.2)
    async def stubborn(payload: Any) -> str:
        tasks.append(asyncio.current_task())
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # carries on regardless
                await release.wait()
        returned.append("returned")
        return "late"

    @pilot_handler("quick", timeout_secs=5.0)
    async def quick(payload: Any) -> Any:
        tasks.append(asyncio.current_task())
        return payload

    async for env in _env(tmp_path, WorkerConfig(port=5000), [stubborn, quick]):
        assert await env.call("quick", 7, timeout=30) == 7
        with pytest.raises(DeadlineExceeded) as info:
            await env.call("stubborn", timeout=30)
        assert info.value.details["reason"] == "timeout"
        assert info.value.details["timeout_secs"] == 0.2
        assert "its 0.2s timeout" in info.value.message
        assert info.value.info.domain == "pilot-worker"
        assert returned == []  # answered while the handler still runs
        stats = env.worker._registry.stats["stubborn"]  # pyright: ignore[reportPrivateUsage]
        assert stats.in_flight == 1  # it keeps its slot
        release.set()
        async with asyncio.timeout(10):
            while stats.in_flight:
                await asyncio.sleep(0.01)
        assert returned == ["returned"]
        assert stats.overruns == 1
        assert stats.codes == {"DEADLINE_EXCEEDED": 1}
        # Both handlers ran on pilot-rpc's task of their call, not on a task of the worker's.
        assert len(tasks) == 2
        owners = [getattr(t.get_coro(), "__qualname__", "") for t in tasks if t is not None]
        assert len(owners) == 2
        assert not any(owner.startswith("CallPipeline.") for owner in owners), owners


async def test_an_idempotent_handlers_timeout_reaches_its_waiting_twin(tmp_path: Path) -> None:
    """A duplicate waiting on a run that hits its own timeout gets that error; no second run."""
    runs: list[int] = []

    @pilot_handler("idem_slow", timeout_secs=0.3, idempotent=True)
    async def idem_slow(payload: Any) -> str:
        runs.append(payload)
        await asyncio.sleep(30)
        return "never"

    async for env in _env(tmp_path, WorkerConfig(port=5000), [idem_slow]):
        first = asyncio.create_task(env.call("idem_slow", 1, timeout=30, idempotency_key="k"))
        async with asyncio.timeout(10):
            while not runs:
                await asyncio.sleep(0.01)
        second = asyncio.create_task(env.call("idem_slow", 2, timeout=30, idempotency_key="k"))
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(r, DeadlineExceeded) for r in results), results
        assert runs == [1]  # the twin was not handed the work
