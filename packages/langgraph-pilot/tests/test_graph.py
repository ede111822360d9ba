"""Remote nodes inside real LangGraph graphs (in-process workers, memory:// hub)."""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph
from langgraph.types import RetryPolicy, Send
from pilot_langgraph import PilotFanoutRunnable, PilotRemoteRunnable
from pilot_langgraph import errors as e
from pilot_rpc import Unavailable
from pilot_worker import Context, pilot_handler


class State(TypedDict, total=False):
    query: str
    broad: dict[str, Any]
    deep: dict[str, Any]
    items: list[int]
    squares: Annotated[list[int], operator.add]
    keys: Annotated[list[str], operator.add]


@pilot_handler("search")
async def search(state: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return {"q": state["query"], "label": ctx.metadata.get("langgraph-fanout-label")}


@pilot_handler("square")
async def square(arg: dict[str, Any]) -> dict[str, Any]:
    return {"squares": [arg["n"] * arg["n"]]}


@pilot_handler("progress_then_stream")
async def progress_then_stream(_: Any) -> Any:
    for i in range(3):
        yield {"token": i}


async def test_seed_shape_fanout_node(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [search])
    await cluster.start_worker("worker-b", [search])
    t = cluster.client
    graph = StateGraph(State)
    graph.add_node(
        "research",
        PilotFanoutRunnable(
            {
                "broad": PilotRemoteRunnable(node="search", peer="worker-a", transport=t),
                "deep": PilotRemoteRunnable(node="search", peer="worker-b", transport=t),
            }
        ),
    )
    graph.add_edge(START, "research")
    graph.add_edge("research", END)
    out = await graph.compile().ainvoke({"query": "q"})
    assert out["broad"] == {"q": "q", "label": "broad"}
    assert out["deep"] == {"q": "q", "label": "deep"}


async def test_fanout_astream_and_errors(cluster: Any) -> None:
    @pilot_handler("fail")
    async def fail(_: Any) -> Any:
        raise ValueError("nope")

    await cluster.start_worker("worker-a", [search, fail])
    t = cluster.client
    fan = PilotFanoutRunnable(
        {
            "ok": PilotRemoteRunnable(node="search", peer="worker-a", transport=t),
            "bad": {"node": "fail", "peer": "worker-a", "transport": t},
        },
        return_exceptions=True,
    )
    pairs = [p async for p in fan.astream({"query": "x"})]
    assert sorted(label for label, _ in pairs) == ["bad", "ok"]
    results = dict(pairs)
    assert isinstance(results["bad"], e.RemoteInternalError)
    strict = PilotFanoutRunnable(dict(fan.targets))
    with pytest.raises(e.RemoteInternalError):
        await strict.ainvoke({"query": "x"})


async def test_send_to_a_remote_node(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [square])
    await cluster.start_worker("worker-b", [square])
    graph = StateGraph(State)
    graph.add_node(
        "square",
        PilotRemoteRunnable(node="square", peer=["worker-a", "worker-b"], transport=cluster.client),
    )

    def fan_out(state: State) -> list[Send]:
        return [Send("square", {"n": n}) for n in state["items"]]

    graph.add_conditional_edges(START, fan_out, ["square"])
    graph.add_edge("square", END)
    out = await graph.compile().ainvoke({"items": [1, 2, 3, 4]})
    assert sorted(out["squares"]) == [1, 4, 9, 16]


async def test_stream_chunks_reach_custom_stream_mode(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [progress_then_stream])
    graph = StateGraph(State)
    node = PilotRemoteRunnable(
        node="progress_then_stream", peer="worker-a", transport=cluster.client, streaming=True
    )
    graph.add_node("gen", node | (lambda last: {"keys": [str(last)]}))
    graph.add_edge(START, "gen")
    graph.add_edge("gen", END)
    custom = [c async for c in graph.compile().astream({}, stream_mode="custom")]
    assert custom == [{"token": 0}, {"token": 1}, {"token": 2}]


async def test_langgraph_retry_reuses_the_task_idempotency_key(cluster: Any) -> None:
    keys: list[str] = []
    task_ids: list[str] = []

    @pilot_handler("flaky")
    async def flaky(_: Any, ctx: Context) -> dict[str, Any]:
        keys.append(ctx.idempotency_key or "")
        task_ids.append(ctx.metadata.get("langgraph-task-id", ""))
        if len(keys) < 3:
            raise Unavailable("try again")
        return {"keys": [ctx.idempotency_key or ""]}

    await cluster.start_worker("worker-a", [flaky])
    graph = StateGraph(State)
    graph.add_node(
        "flaky",
        PilotRemoteRunnable(node="flaky", peer="worker-a", transport=cluster.client, max_retries=0),
        retry_policy=RetryPolicy(max_attempts=5, initial_interval=0.01, jitter=False),
    )
    graph.add_edge(START, "flaky")
    graph.add_edge("flaky", END)
    out = await graph.compile().ainvoke({})
    assert len(keys) == 3
    assert len(set(keys)) == 1, keys
    assert task_ids[0]
    assert keys[0].startswith(task_ids[0])
    assert out["keys"] == [keys[0]]


async def test_progress_keeps_the_idle_timeout_alive_and_timeouts_cancel(cluster: Any) -> None:
    import asyncio

    from langgraph.errors import NodeTimeoutError
    from langgraph.types import TimeoutPolicy

    cancelled = asyncio.Event()

    @pilot_handler("long_with_progress", timeout_secs=30)
    async def long_with_progress(_: Any, ctx: Context) -> dict[str, Any]:
        for i in range(15):
            await asyncio.sleep(0.1)  # a slice of long-running work (1.5 s in all)
            await ctx.report_progress({"done": i})
        return {"keys": ["finished"]}

    @pilot_handler("long_silent", timeout_secs=30)
    async def long_silent(_: Any) -> dict[str, Any]:
        try:
            await asyncio.sleep(5)  # long work that never reports progress
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {"keys": ["finished"]}

    await cluster.start_worker("worker-a", [long_with_progress, long_silent])
    idle = TimeoutPolicy(idle_timeout=1.0, refresh_on="heartbeat")

    def one_node(name: str) -> Any:
        graph = StateGraph(State)
        graph.add_node(
            "n",
            PilotRemoteRunnable(node=name, peer="worker-a", transport=cluster.client),
            timeout=idle,
        )
        graph.add_edge(START, "n")
        graph.add_edge("n", END)
        return graph.compile()

    out = await one_node("long_with_progress").ainvoke({})
    assert out["keys"] == ["finished"]
    with pytest.raises(NodeTimeoutError):
        await one_node("long_silent").ainvoke({})
    await asyncio.wait_for(cancelled.wait(), 10)


async def test_streaming_node_directly_in_a_graph(cluster: Any) -> None:
    @pilot_handler("steps")
    async def steps(_: Any) -> Any:
        yield {"progress": 1}
        yield {"progress": 2}
        yield {"keys": ["final"]}

    await cluster.start_worker("worker-a", [steps])
    graph = StateGraph(State)
    graph.add_node(
        "gen",
        PilotRemoteRunnable(
            node="steps", peer="worker-a", transport=cluster.client, streaming=True
        ),
    )
    graph.add_edge(START, "gen")
    graph.add_edge("gen", END)
    seen = [item async for item in graph.compile().astream({}, stream_mode=["custom", "values"])]
    assert [c for m, c in seen if m == "custom"] == [
        {"progress": 1},
        {"progress": 2},
        {"keys": ["final"]},
    ]
    assert [c for m, c in seen if m == "values"][-1]["keys"] == ["final"]
