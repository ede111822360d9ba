"""The call pipeline, driven offline through pilot_worker.testing."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import pytest
from pilot_rpc import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from pilot_worker import Context, WorkerConfig, WorkerServer, pilot_handler
from pilot_worker.testing import WorkerTestClient, make_context, make_peer
from prometheus_client import CollectorRegistry
from pydantic import BaseModel


class Query(BaseModel):
    q: str
    limit: int = 10


class Answer(BaseModel):
    q: str
    hits: list[int]


@pilot_handler("echo")
async def echo(payload: Any) -> Any:
    return payload


@pilot_handler("whoami")
def whoami(payload: Any, ctx: Context) -> dict[str, Any]:
    return {
        "caller": ctx.caller_node_id,
        "name": ctx.caller_name,
        "handler": ctx.handler_name,
        "request_id": ctx.request_id,
        "metadata": dict(ctx.metadata),
        "has_deadline": ctx.deadline is not None,
        "thread": threading.current_thread().name,
    }


@pilot_handler("count")
async def count(n: int, ctx: Context):
    for i in range(n):
        yield {"i": i}


@pilot_handler("search")
async def search(query: Query) -> Answer:
    return Answer(q=query.q, hits=list(range(query.limit)))


async def test_unary_sync_async_and_stream() -> None:
    async with WorkerTestClient([echo, whoami, count], caller="alice") as client:
        assert await client.call("echo", {"a": [1, 2]}) == {"a": [1, 2]}
        info = await client.call("whoami", None, metadata={"k": "v"})
        assert info["caller"] == make_peer("alice").node_id
        assert info["name"] == "alice"
        assert info["handler"] == "whoami"
        assert info["request_id"].startswith("test-")
        assert info["metadata"] == {"k": "v"}
        assert info["has_deadline"]  # default timeout_secs=30
        assert info["thread"].startswith("pilot-worker-sync")
        assert await client.stream("count", 3) == [{"i": 0}, {"i": 1}, {"i": 2}]


async def test_unknown_handler_is_not_found() -> None:
    async with WorkerTestClient([echo]) as client:
        with pytest.raises(NotFound):
            await client.call("nope", 1)


async def test_sync_handler_never_blocks_the_loop() -> None:
    release = threading.Event()
    started = threading.Event()

    @pilot_handler("block")
    def block(payload: Any) -> str:
        started.set()
        assert release.wait(10)
        return "done"

    async with WorkerTestClient([block, echo]) as client:
        blocked = asyncio.create_task(client.call("block"))
        await asyncio.to_thread(started.wait, 5)
        # The loop still serves other calls while the sync handler blocks its thread.
        assert await client.call("echo", 7) == 7
        assert not blocked.done()
        release.set()
        assert await blocked == "done"


async def test_async_timeout_is_deadline_exceeded() -> None:
    never = asyncio.Event()

    @pilot_handler("slow", timeout_secs=0.05)
    async def slow(payload: Any) -> None:
        await never.wait()

    async with WorkerTestClient([slow]) as client:
        with pytest.raises(DeadlineExceeded) as info:
            await client.call("slow")
        assert info.value.details["reason"] == "timeout"
        assert "0.05s timeout" in info.value.message


async def test_callers_deadline_applies() -> None:
    never = asyncio.Event()

    @pilot_handler("slow", timeout_secs=None)
    async def slow(payload: Any) -> None:
        await never.wait()

    async with WorkerTestClient([slow]) as client:
        with pytest.raises(DeadlineExceeded, match="caller's deadline"):
            await client.call("slow", timeout=0.05)


async def test_sync_overrun_keeps_its_slot_until_the_thread_ends() -> None:
    release = threading.Event()
    finished = threading.Event()

    @pilot_handler("stuck", timeout_secs=0.05, max_concurrent=1)
    def stuck(payload: Any) -> str:
        release.wait(10)
        finished.set()
        return "late"

    worker = WorkerServer(None)
    worker.register(stuck)
    async with WorkerTestClient(worker) as client:
        with pytest.raises(DeadlineExceeded):
            await client.call("stuck")
        # The thread still runs: the handler's only slot is still taken.
        assert worker.in_flight == 1
        with pytest.raises(ResourceExhausted) as info:
            await client.call("stuck")
        assert info.value.details["reason"] == "concurrency_limit"
        release.set()
        await asyncio.to_thread(finished.wait, 5)
        async with asyncio.timeout(5):
            while worker.in_flight:
                await asyncio.sleep(0)  # let the thread's completion callback run
        assert await client.call("stuck") == "late"


async def test_acl_allow_list_and_empty_list() -> None:
    alice = make_peer("alice")

    @pilot_handler("private", allow=[alice.node_id])
    def private(payload: Any) -> str:
        return "secret"

    @pilot_handler("nobody", allow=[])
    def nobody(payload: Any) -> str:
        return "never"

    async with WorkerTestClient([private, nobody]) as client:
        assert await client.call("private", caller="alice") == "secret"
        with pytest.raises(PermissionDenied) as info:
            await client.call("private", caller="mallory")
        assert info.value.details == {"reason": "acl", "handler": "private"}
        with pytest.raises(PermissionDenied):
            await client.call("nobody", caller="alice")


async def test_default_closed_policy_covers_builtins() -> None:
    alice = make_peer("alice")
    closed = WorkerConfig(default_policy="closed")
    async with WorkerTestClient([echo], config=closed) as client:
        with pytest.raises(PermissionDenied):
            await client.call("echo", 1, caller="alice")
        # No underscore bypass: introspection follows the same policy.
        with pytest.raises(PermissionDenied):
            await client.call("_health", caller="alice")
        with pytest.raises(PermissionDenied):
            await client.call("_handlers", caller="alice")
    config = WorkerConfig(default_policy="closed", introspection_allow=[alice.node_id])
    async with WorkerTestClient([echo], config=config) as client:
        assert (await client.call("_health", caller="alice"))["ok"] is False  # offline: not serving
        with pytest.raises(PermissionDenied):
            await client.call("_health", caller="bob")


async def test_rate_per_caller_sliding_window() -> None:
    @pilot_handler("limited", rate_per_caller=2, rate_window_secs=60)
    def limited(payload: Any) -> int:
        return payload

    async with WorkerTestClient([limited]) as client:
        assert await client.call("limited", 1, caller="alice") == 1
        assert await client.call("limited", 2, caller="alice") == 2
        with pytest.raises(ResourceExhausted) as info:
            await client.call("limited", 3, caller="alice")
        details = info.value.details
        assert details["reason"] == "rate_limit"
        assert details["limit"] == 2
        assert 0 < details["retry_after_secs"] <= 60
        # The same facts as one structured ErrorInfo.
        assert info.value.info.domain == "pilot-worker"
        assert info.value.info.reason == "RATE_LIMIT"
        assert info.value.info.metadata["limit"] == "2"
        # Another caller has its own window.
        assert await client.call("limited", 4, caller="bob") == 4


async def test_max_concurrent_reject() -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    @pilot_handler("one", max_concurrent=1, overflow="reject")
    async def one(payload: Any) -> str:
        entered.set()
        await gate.wait()
        return "ok"

    async with WorkerTestClient([one]) as client:
        first = asyncio.create_task(client.call("one"))
        await entered.wait()
        with pytest.raises(ResourceExhausted) as info:
            await client.call("one")
        assert info.value.details["reason"] == "concurrency_limit"
        gate.set()
        assert await first == "ok"
        assert await client.call("one") == "ok"


async def test_max_concurrent_queue_waits_then_runs_in_order() -> None:
    gate = asyncio.Event()
    order: list[int] = []

    @pilot_handler("q", max_concurrent=1, overflow="queue")
    async def q(n: int) -> int:
        order.append(n)
        await gate.wait()
        return n

    async with WorkerTestClient([q]) as client:
        tasks = [asyncio.create_task(client.call("q", n)) for n in range(3)]
        async with asyncio.timeout(5):
            while not order:
                await asyncio.sleep(0)
        assert order == [0]
        gate.set()
        assert await asyncio.gather(*tasks) == [0, 1, 2]
        assert order == [0, 1, 2]


async def test_queue_full_and_queue_wait_bounded_by_deadline() -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    @pilot_handler("q", max_concurrent=1, overflow="queue", timeout_secs=None)
    async def q(n: int) -> int:
        entered.set()
        await gate.wait()
        return n

    config = WorkerConfig(max_queued_per_handler=1)
    async with WorkerTestClient([q], config=config) as client:
        first = asyncio.create_task(client.call("q", 1))
        await entered.wait()
        queued = asyncio.create_task(client.call("q", 2, timeout=0.1))
        async with asyncio.timeout(5):
            while client.worker._registry.entries["q"].gate.queued == 0:  # type: ignore[union-attr]
                await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted) as info:
            await client.call("q", 3)
        assert info.value.details["reason"] == "queue_full"
        with pytest.raises(DeadlineExceeded, match="while queued"):
            await queued
        gate.set()
        assert await first == 1


async def test_worker_default_overflow_is_used() -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    @pilot_handler("q", max_concurrent=1)
    async def q(n: int) -> int:
        entered.set()
        await gate.wait()
        return n

    async with WorkerTestClient([q], config=WorkerConfig(overflow="queue")) as client:
        first = asyncio.create_task(client.call("q", 1))
        await entered.wait()
        second = asyncio.create_task(client.call("q", 2))
        gate.set()
        assert await asyncio.gather(first, second) == [1, 2]


async def test_input_and_output_validation() -> None:
    @pilot_handler("bad_output", output_model=Answer)
    def bad_output(payload: Any) -> dict[str, Any]:
        return {"q": "x", "hits": "not a list"}

    async with WorkerTestClient([search, bad_output]) as client:
        assert await client.call("search", {"q": "hi", "limit": 2}) == {"q": "hi", "hits": [0, 1]}
        with pytest.raises(InvalidArgument) as bad_in:
            await client.call("search", {"limit": "many"})
        errors = bad_in.value.details["errors"]
        assert {tuple(e["loc"]) for e in errors} == {("q",), ("limit",)}
        assert bad_in.value.details["reason"] == "invalid_argument"
        with pytest.raises(Internal) as bad_out:
            await client.call("bad_output")
        assert bad_out.value.details["reason"] == "invalid_output"
        assert bad_out.value.details["errors"][0]["loc"] == ["hits"]


async def test_handler_errors() -> None:
    @pilot_handler("boom")
    def boom(payload: Any) -> None:
        raise ValueError("bad thing")

    @pilot_handler("missing")
    async def missing(payload: Any) -> None:
        raise NotFound("no such key", details={"key": payload})

    async with WorkerTestClient([boom, missing]) as client:
        with pytest.raises(Internal) as info:
            await client.call("boom")
        assert info.value.message == "ValueError: bad thing"
        assert info.value.details == {"reason": "handler_error", "type": "ValueError"}
        with pytest.raises(NotFound) as nf:
            await client.call("missing", "k")
        assert nf.value.details == {"key": "k"}


async def test_idempotent_replays_and_waits_for_the_running_twin() -> None:
    runs: list[Any] = []
    gate = asyncio.Event()

    @pilot_handler("charge", idempotent=True)
    async def charge(payload: Any) -> dict[str, Any]:
        runs.append(payload)
        await gate.wait()
        return {"charged": payload, "run": len(runs)}

    async with WorkerTestClient([charge], caller="alice") as client:
        first = asyncio.create_task(client.call("charge", 5, idempotency_key="k1"))
        twin = asyncio.create_task(client.call("charge", 5, idempotency_key="k1"))
        async with asyncio.timeout(5):
            while not runs:
                await asyncio.sleep(0)
        gate.set()
        assert await first == await twin == {"charged": 5, "run": 1}
        # A later retry gets the stored result.
        assert await client.call("charge", 5, idempotency_key="k1") == {"charged": 5, "run": 1}
        assert len(runs) == 1
        # Another key, or another caller with the same key, runs again.
        await client.call("charge", 5, idempotency_key="k2")
        await client.call("charge", 5, idempotency_key="k1", caller="bob")
        # No key: not deduplicated.
        await client.call("charge", 5)
        assert len(runs) == 4


async def test_idempotent_failure_is_not_stored() -> None:
    attempts: list[int] = []

    @pilot_handler("flaky", idempotent=True)
    def flaky(payload: Any) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("transient")
        return "ok"

    async with WorkerTestClient([flaky]) as client:
        with pytest.raises(Internal):
            await client.call("flaky", idempotency_key="k")
        assert await client.call("flaky", idempotency_key="k") == "ok"
        assert await client.call("flaky", idempotency_key="k") == "ok"
        assert len(attempts) == 2


async def test_middleware_order_short_circuit_and_transform() -> None:
    seen: list[str] = []

    async def outer(payload: Any, ctx: Context, call_next: Any) -> Any:
        seen.append(f"outer:{ctx.handler_name}")
        result = await call_next(payload, ctx)
        return {"wrapped": result} if ctx.handler_name == "echo" else result

    def inner(payload: Any, ctx: Context, call_next: Any) -> Any:
        seen.append("inner")
        if payload == "stop":
            return "short-circuited"
        if isinstance(payload, int):
            payload = payload * 10
        return call_next(payload, ctx)

    async with WorkerTestClient([echo], middleware=[outer, inner]) as client:
        assert await client.call("echo", 2) == {"wrapped": 20}
        assert seen == ["outer:echo", "inner"]
        assert await client.call("echo", "stop") == {"wrapped": "short-circuited"}


async def test_middleware_can_refuse_with_rpc_error() -> None:
    def deny(payload: Any, ctx: Context, call_next: Any) -> Any:
        if ctx.metadata.get("token") != "t":
            raise PermissionDenied("bad token")
        return call_next(payload, ctx)

    async with WorkerTestClient([echo], middleware=[deny]) as client:
        with pytest.raises(PermissionDenied, match="bad token"):
            await client.call("echo", 1)
        assert await client.call("echo", 1, metadata={"token": "t"}) == 1


async def test_middleware_wraps_streams() -> None:
    async def double(payload: Any, ctx: Context, call_next: Any) -> Any:
        items = await call_next(payload, ctx)

        async def doubled():
            async for item in items:
                yield {"i": item["i"] * 2}

        return doubled()

    async with WorkerTestClient([count], middleware=[double]) as client:
        assert await client.stream("count", 3) == [{"i": 0}, {"i": 2}, {"i": 4}]


async def test_streaming_timeout_and_early_close() -> None:
    closed = asyncio.Event()
    never = asyncio.Event()

    @pilot_handler("ticks", timeout_secs=0.1)
    async def ticks(payload: Any):
        try:
            yield 1
            yield 2
            await never.wait()
        finally:
            closed.set()

    async with WorkerTestClient([ticks]) as client:
        with pytest.raises(DeadlineExceeded, match="while streaming"):
            await client.stream("ticks")
        assert closed.is_set()
        closed.clear()
        assert await client.stream("ticks", limit=1) == [1]
        assert closed.is_set()


async def test_progress_and_codec() -> None:
    class Tagged:
        def decode_request(self, obj: Any) -> Any:
            return {"decoded": obj}

        def encode_response(self, value: Any) -> Any:
            return ["enc", value]

    @pilot_handler("work")
    async def work(payload: Any, ctx: Context) -> Any:
        await ctx.report_progress(0.5)
        return payload

    progress: list[Any] = []
    async with WorkerTestClient([work], codec=Tagged()) as client:
        result = await client.call("work", 1, on_progress=progress.append)
        assert result == ["enc", {"decoded": 1}]
        assert progress == [["enc", 0.5]]


async def test_sync_progress_nowait() -> None:
    @pilot_handler("work")
    def work(payload: Any, ctx: Context) -> str:
        ctx.report_progress_nowait("half")
        return "done"

    got = asyncio.Event()
    progress: list[Any] = []

    def on_progress(value: Any) -> None:
        progress.append(value)
        got.set()

    async with WorkerTestClient([work]) as client:
        assert await client.call("work", on_progress=on_progress) == "done"
        async with asyncio.timeout(5):
            await got.wait()
        assert progress == ["half"]


async def test_handlers_and_health_introspection() -> None:
    registry = CollectorRegistry()
    worker = WorkerServer(None, metrics_registry=registry)
    worker.register(search)
    worker.register(count)
    async with WorkerTestClient(worker) as client:
        await client.call("search", {"q": "a"})
        with pytest.raises(InvalidArgument):
            await client.call("search", {})
        listing = {h["name"]: h for h in await client.call("_handlers")}
        assert set(listing) == {"_handlers", "_health", "count", "search"}
        s = listing["search"]
        assert s["kind"] == "unary"
        assert s["calls"] == 2
        assert s["errors"] == 1
        assert s["input_schema"]["properties"]["q"]["type"] == "string"
        assert s["output_schema"]["title"] == "Answer"
        assert s["latency_ms"]["p50"] is not None
        assert s["timeout_secs"] == 30.0
        assert s["effective_policy"] == "open"
        assert listing["count"]["kind"] == "server_streaming"
        health = await client.call("_health")
        assert health["calls_total"] >= 3
        assert health["errors_total"] == 1
        assert health["version"]
    value = registry.get_sample_value
    assert value("pilot_worker_calls_total", {"handler": "search", "code": "OK"}) == 1
    assert (
        value("pilot_worker_errors_total", {"handler": "search", "code": "INVALID_ARGUMENT"}) == 1
    )
    assert (
        value("pilot_worker_rejections_total", {"handler": "search", "reason": "invalid_argument"})
        == 1
    )
    assert value("pilot_worker_call_duration_seconds_count", {"handler": "search"}) == 2
    assert value("pilot_worker_in_flight_calls", {"handler": "search"}) == 0


async def test_draining_worker_refuses_new_calls() -> None:
    worker = WorkerServer(None)
    worker.register(echo)
    async with WorkerTestClient(worker) as client:
        assert await client.call("echo", 1) == 1
        assert await worker.drain(0) == 0
        with pytest.raises(Unavailable) as info:
            await client.call("echo", 1)
        assert info.value.retry_safe
        assert info.value.details["reason"] == "draining"


async def test_make_context_for_direct_calls() -> None:
    ctx = make_context("whoami", caller="carol", metadata={"a": "b"}, timeout=5)
    result = whoami(None, ctx)
    assert result["caller"] == make_peer("carol").node_id
    assert result["metadata"] == {"a": "b"}
    remaining = ctx.time_remaining()
    assert remaining is not None
    assert 0 < remaining <= 5


async def test_wire_roundtrip_catches_unencodable_results() -> None:
    @pilot_handler("weird")
    def weird(payload: Any) -> Any:
        return {1, 2}

    async with WorkerTestClient([weird]) as client:
        with pytest.raises(TypeError):
            await client.call("weird")


class RecordingCodec:
    """A codec that keeps every value the worker hands it."""

    def __init__(self) -> None:
        self.encoded: list[Any] = []
        self.decoded: list[Any] = []

    def decode_request(self, obj: Any) -> Any:
        self.decoded.append(obj)
        if isinstance(obj, dict) and obj.get("typed"):
            # A typed codec may build a model without validating it.
            return Query.model_construct(q=obj["q"], limit=obj["limit"])
        return obj

    def encode_response(self, value: Any) -> Any:
        self.encoded.append(value)
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


class Plain:
    """Not a pydantic model: only a codec that knows it can send it."""

    def __init__(self, text: str) -> None:
        self.text = text


@pilot_handler("typed_search")
async def typed_search(query: Query) -> Answer:
    return Answer(q=query.q, hits=list(range(query.limit)))


@pilot_handler("plain_result", output_model=None)
async def plain_result(payload: Any) -> Any:
    return Answer(q="p", hits=[1])


@pilot_handler("typed_stream")
async def typed_stream(n: int):
    for i in range(n):
        yield Answer(q=str(i), hits=[i])


async def test_the_codec_gets_the_handlers_own_objects() -> None:
    codec = RecordingCodec()
    async with WorkerTestClient(
        [typed_search, plain_result, typed_stream], codec=codec, wire_roundtrip=False
    ) as client:
        assert await client.call("typed_search", {"q": "a", "limit": 2}) == {
            "q": "a",
            "hits": [0, 1],
        }
        await client.call("plain_result")
        items = await client.stream("typed_stream", 2)
    assert items == [{"q": "0", "hits": [0]}, {"q": "1", "hits": [1]}]
    # Validated against output_model, but handed over as the very type returned.
    assert [type(v) for v in codec.encoded] == [Answer, Answer, Answer, Answer]
    assert codec.encoded[0] == Answer(q="a", hits=[0, 1])


async def test_invalid_output_is_still_refused_with_a_custom_codec() -> None:
    @pilot_handler("liar")
    async def liar(payload: Any) -> Answer:
        return {"q": 1}  # type: ignore[return-value]

    codec = RecordingCodec()
    async with WorkerTestClient([liar], codec=codec) as client:
        with pytest.raises(Internal) as info:
            await client.call("liar")
    assert info.value.details["reason"] == "invalid_output"
    assert codec.encoded == []


async def test_default_codec_still_sends_pydantic_models_as_json_data() -> None:
    async with WorkerTestClient([typed_search, plain_result, typed_stream]) as client:
        assert await client.call("typed_search", {"q": "a", "limit": 1}) == {"q": "a", "hits": [0]}
        # No output_model: the default codec dumps the model itself.
        assert await client.call("plain_result") == {"q": "p", "hits": [1]}
        assert await client.stream("typed_stream", 1) == [{"q": "0", "hits": [0]}]


async def test_a_model_built_without_validation_is_validated_once_at_the_worker() -> None:
    ran: list[Any] = []

    @pilot_handler("guarded")
    async def guarded(query: Query) -> str:
        ran.append(query)
        return query.q

    codec = RecordingCodec()
    async with WorkerTestClient([guarded], codec=codec, wire_roundtrip=False) as client:
        with pytest.raises(InvalidArgument) as info:
            await client.call("guarded", {"typed": True, "q": 123, "limit": "DROP TABLE"})
        locs = {tuple(e["loc"]) for e in info.value.details["errors"]}
        assert locs == {("q",), ("limit",)}
        assert ran == []
        assert await client.call("guarded", {"typed": True, "q": "ok", "limit": 3}) == "ok"
    assert ran == [Query(q="ok", limit=3)]


async def test_a_handler_ignoring_its_cancellation_is_answered_at_its_timeout() -> None:
    release = asyncio.Event()
    returned: list[str] = []

    @pilot_handler("stubborn", timeout_secs=0.05)
    async def stubborn(payload: Any) -> str:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # carries on regardless
                await release.wait()
        returned.append("returned")
        return "late"

    async with WorkerTestClient([stubborn]) as client:
        with pytest.raises(DeadlineExceeded):
            await client.call("stubborn")
        assert returned == []  # answered while the handler still runs
        entry_stats = client.worker._registry.stats["stubborn"]  # pyright: ignore[reportPrivateUsage]
        assert entry_stats.in_flight == 1  # it keeps its slot
        release.set()
        async with asyncio.timeout(10):
            while entry_stats.in_flight:
                await asyncio.sleep(0)
        assert returned == ["returned"]
        assert entry_stats.overruns == 1
        assert entry_stats.codes == {"DEADLINE_EXCEEDED": 1}
