"""PilotEventSource over a pilot-channels broker served by an in-process worker."""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph
from pilot_channels import Broker, publish_once
from pilot_channels._plugin import broker_handlers
from pilot_langgraph import PilotEventSource, PilotUsageError


async def _broker(cluster: Any) -> None:
    broker = Broker(registry=None)
    await cluster.stack.enter_async_context(broker)
    await cluster.start_worker("worker-c", broker_handlers(broker))


async def test_ainvoke_waits_for_one_event(cluster: Any) -> None:
    await _broker(cluster)
    source = PilotEventSource("tasks.>", peer="worker-c", transport=cluster.client, timeout_secs=20)
    waiting = asyncio.create_task(source.ainvoke(None))
    event = None
    for i in range(200):  # until the subscription is registered and sees one
        await publish_once(cluster.client, "tasks.new", {"n": i}, peer="worker-c")
        done, _ = await asyncio.wait({waiting}, timeout=0.05)
        if done:
            event = waiting.result()
            break
    assert event is not None
    assert event.topic == "tasks.new"
    assert event.payload["n"] >= 0


async def test_astream_max_events_in_a_graph(cluster: Any) -> None:
    await _broker(cluster)

    class State(TypedDict, total=False):
        tasks: list[Any]

    source = PilotEventSource(
        "jobs.*", peer="worker-c", transport=cluster.client, payload_only=True, timeout_secs=20
    )
    collected: list[Any] = []

    async def consume() -> None:
        async for payload in source.astream(None, max_events=3):
            collected.append(payload)

    task = asyncio.create_task(consume())
    n = 0
    while not task.done() and n < 500:
        await publish_once(cluster.client, "jobs.x", n, peer="worker-c")
        n += 1
        await asyncio.wait({task}, timeout=0.02)
    await task
    assert len(collected) == 3
    assert collected == sorted(collected)

    # as a node: the first event becomes a state update
    graph = StateGraph(State)
    graph.add_node("wait", source | (lambda payload: {"tasks": [payload]}))
    graph.add_edge(START, "wait")
    graph.add_edge("wait", END)
    run = asyncio.create_task(graph.compile().ainvoke({}))
    while not run.done():
        await publish_once(cluster.client, "jobs.y", "go", peer="worker-c")
        await asyncio.wait({run}, timeout=0.02)
    assert run.result() == {"tasks": ["go"]}


def test_options_are_validated() -> None:
    with pytest.raises(PilotUsageError):
        PilotEventSource("", peer="b")
    with pytest.raises(PilotUsageError):
        PilotEventSource("a", peer="b", max_events=0)
