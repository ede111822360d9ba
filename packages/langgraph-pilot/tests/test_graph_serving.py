"""Serving whole graphs: option parsing, the snapshot wire form, the host's run gates.

The host is driven in-process here (no worker); real worker processes are in
integration-tests/tests/test_langgraph_remote_graph.py.
"""

from __future__ import annotations

import asyncio
import operator
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt
from pilot_langgraph import PilotRemoteGraph, PilotUsageError
from pilot_langgraph._graph_serving import (
    GraphHost,
    GraphSource,
    handler_specs,
    load_graph,
    parse_graph_option,
    snapshot_from_wire,
    snapshot_to_wire,
)
from pilot_langgraph._remote_graph import _sanitize  # pyright: ignore[reportPrivateUsage]
from pilot_langgraph._worker_cli import graph_options
from pilot_rpc.errors import Aborted, Cancelled, InvalidArgument, NotFound
from typing_extensions import TypedDict


class S(TypedDict, total=False):
    text: str
    log: Annotated[list[str], operator.add]
    answer: str


def _step(state: S) -> dict[str, Any]:
    return {"log": [f"step:{state['text']}"]}


def _ask(state: S) -> dict[str, Any]:
    return {"answer": str(interrupt("ok?"))}


def builder() -> StateGraph[S]:
    g = StateGraph(S)
    g.add_node("step", _step)
    g.add_node("ask", _ask)
    g.add_edge(START, "step")
    g.add_edge("step", "ask")
    g.add_edge("ask", END)
    return g


_gate: dict[str, asyncio.Event] = {}


async def _hold(state: S) -> dict[str, Any]:
    await _gate[state["text"]].wait()
    return {"answer": state["text"]}


def holding() -> StateGraph[S]:
    g = StateGraph(S)
    g.add_node("hold", _hold)
    g.add_edge(START, "hold")
    g.add_edge("hold", END)
    return g


class _Ctx:
    metadata: dict[str, str] = {}


def _host() -> GraphHost:
    saver = InMemorySaver()
    return GraphHost(
        {
            "g": builder().compile(checkpointer=saver),
            "hold": holding().compile(checkpointer=saver),
        }
    )


async def _collect(it: AsyncIterator[Any]) -> list[Any]:
    return [x async for x in it]


def test_parse_graph_option() -> None:
    assert parse_graph_option("a=pkg.mod:graph") == GraphSource("a", "pkg.mod", "graph")
    assert parse_graph_option("b=/x/y.py:make") == GraphSource("b", "/x/y.py", "make")
    for bad in ("nomodule", "a=mod", "=mod:attr", "a=:attr", "a=mod:"):
        with pytest.raises(ValueError, match="--graph"):
            parse_graph_option(bad)


def test_graph_options_take_flags_out_of_the_worker_argv() -> None:
    args = ["--graph", "a=m:x", "--graph=b=m:y", "--checkpoint-db", "sqlite:///x.db", "--port", "7"]
    plugin = graph_options(args)
    assert plugin is not None
    assert plugin.name == "langgraph-graphs"
    assert args == ["--port", "7"]
    # the store plugin reads --checkpoint-db too: it stays
    args = ["--graph", "a=m:x", "--plugin", "checkpoint-sqlite", "--checkpoint-db", "u"]
    assert graph_options(args) is not None
    assert args == ["--plugin", "checkpoint-sqlite", "--checkpoint-db", "u"]
    args = ["--port", "7"]
    assert graph_options(args) is None
    with pytest.raises(ValueError, match="unique"):
        graph_options(["--graph", "a=m:x", "--graph", "a=m:y"])
    args = ["--graph", "a=m:x", "--graph-lease-ttl", "2.5", "--port", "7"]
    assert graph_options(args) is not None
    assert args == ["--port", "7"]
    for bad in ("0", "-1", "soon", "3601"):
        with pytest.raises(ValueError, match="--graph-lease-ttl"):
            graph_options(["--graph", "a=m:x", "--graph-lease-ttl", bad])


def test_load_graph_accepts_builders_compiled_graphs_and_factories() -> None:
    saver = InMemorySaver()
    mod = __name__
    for attr in ("builder", "holding"):
        graph = load_graph(GraphSource("x", mod, attr), saver)
        assert graph.checkpointer is saver
    compiled = load_graph(GraphSource("x", mod, "builder"), saver)
    globals()["_compiled"] = builder().compile()
    assert load_graph(GraphSource("x", mod, "_compiled"), saver).checkpointer is saver
    assert compiled.get_graph().nodes.keys() >= {"step", "ask"}
    with pytest.raises(TypeError, match="not a compiled graph"):
        load_graph(GraphSource("x", mod, "_not_a_graph"), saver)


_not_a_graph = 42


async def test_snapshot_round_trips_through_the_wire_form() -> None:
    app = builder().compile(checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "t"}}
    await app.ainvoke({"text": "a"}, config)
    snap = await app.aget_state(config)
    back = snapshot_from_wire(snapshot_to_wire(snap))
    assert back.values == snap.values
    assert back.next == snap.next == ("ask",)
    assert back.interrupts == snap.interrupts
    assert back.config == snap.config
    assert back.tasks[0].interrupts == snap.tasks[0].interrupts


def test_sanitize_keeps_only_plain_values() -> None:
    config: Any = {
        "configurable": {
            "thread_id": "t",
            "checkpoint_ns": "x:1",
            "__pregel_send": object(),
            "user": {"k": [1, "a", object()]},
        },
        "metadata": {"m": 1, "bad": object()},
        "tags": ["a", 3],
        "callbacks": [object()],
        "recursion_limit": 9,
    }
    assert _sanitize(config) == {
        "configurable": {"thread_id": "t", "user": {"k": [1, "a"]}},
        "metadata": {"m": 1},
        "tags": ["a"],
        "recursion_limit": 9,
    }


async def test_host_runs_streams_interrupts_and_resumes() -> None:
    host = _host()
    config = {"configurable": {"thread_id": "t1"}}
    req = {"graph": "g", "input": {"text": "x"}, "config": config, "stream_mode": ["values"]}
    items = await _collect(host.run(req, _Ctx()))  # pyright: ignore[reportArgumentType]
    assert items[0][0] == "meta"
    assert items[0][1]["thread_id"] == "t1"
    evs = [(mode, chunk) for _, _, mode, chunk in items[1:]]
    assert ("updates", {"step": {"log": ["step:x"]}}) in evs
    assert "__interrupt__" in evs[-1][1]
    resume = {**req, "input": None, "command": Command(resume="yes")}
    items = await _collect(host.run(resume, _Ctx()))  # pyright: ignore[reportArgumentType]
    finals = [chunk for _, _, mode, chunk in items[1:] if mode == "values"]
    assert finals[-1] == {"text": "x", "log": ["step:x"], "answer": "yes"}


async def test_host_rejects_bad_requests_with_typed_errors() -> None:
    host = _host()
    bad: list[Any] = [
        "not a mapping",
        {"graph": 3},
        {"graph": "g", "stream_mode": ["bogus"]},
        {"graph": "g", "multitask_strategy": "cancel-everything"},
        {"graph": "g", "run_id": "not-a-uuid"},
        {"graph": "g", "resume": "yes"},
        {"graph": "g", "command": {"resume": 1}},
        {"graph": "g", "config": []},
    ]
    for payload in bad:
        with pytest.raises(InvalidArgument):
            await _collect(host.run(payload, _Ctx()))  # pyright: ignore[reportArgumentType]
    with pytest.raises(NotFound):
        await _collect(host.run({"graph": "missing"}, _Ctx()))  # pyright: ignore[reportArgumentType]


async def test_reject_enqueue_and_cancel_by_id() -> None:
    host = _host()
    _gate["first"] = asyncio.Event()
    _gate["second"] = asyncio.Event()
    config = {"configurable": {"thread_id": "busy"}}
    first_id = str(uuid.uuid4())
    req = {"graph": "hold", "config": config, "stream_mode": ["values"]}
    first = asyncio.create_task(
        _collect(host.run({**req, "input": {"text": "first"}, "run_id": first_id}, _Ctx()))  # pyright: ignore[reportArgumentType]
    )
    while first_id not in host.runs:
        await asyncio.sleep(0)
    assert host.list_runs({"graph": "hold"})[0]["run_id"] == first_id
    with pytest.raises(Aborted):
        await _collect(host.run({**req, "input": {"text": "x"}}, _Ctx()))  # pyright: ignore[reportArgumentType]
    second = asyncio.create_task(
        _collect(
            host.run(
                {**req, "input": {"text": "second"}, "multitask_strategy": "enqueue"},
                _Ctx(),  # pyright: ignore[reportArgumentType]
            )
        )
    )
    assert (await host.cancel_run({"run_id": first_id}))["cancelled"] is True
    with pytest.raises(Cancelled):
        await first
    _gate["second"].set()
    items = await second
    assert items[-1][3]["answer"] == "second"
    assert (await host.cancel_run({"run_id": first_id}))["cancelled"] is False
    assert host.runs == {}


async def test_interrupt_cancels_the_running_run_and_rollback_needs_a_deleting_saver() -> None:
    from pilot_rpc.errors import FailedPrecondition

    host = _host()
    _gate["victim"] = asyncio.Event()
    _gate["next"] = asyncio.Event()
    _gate["next"].set()
    config = {"configurable": {"thread_id": "displaced"}}
    req = {"graph": "hold", "config": config, "stream_mode": ["values"]}
    victim_id = str(uuid.uuid4())
    victim = asyncio.create_task(
        _collect(host.run({**req, "input": {"text": "victim"}, "run_id": victim_id}, _Ctx()))  # pyright: ignore[reportArgumentType]
    )
    while victim_id not in host.runs:
        await asyncio.sleep(0)
    # InMemorySaver cannot delete a run's checkpoints: refused, the run goes on
    with pytest.raises(FailedPrecondition):
        await _collect(
            host.run({**req, "input": {"text": "next"}, "multitask_strategy": "rollback"}, _Ctx())  # pyright: ignore[reportArgumentType]
        )
    assert not victim.done()
    items = await _collect(
        host.run({**req, "input": {"text": "next"}, "multitask_strategy": "interrupt"}, _Ctx())  # pyright: ignore[reportArgumentType]
    )
    with pytest.raises(Cancelled):
        await victim
    assert items[-1][3]["answer"] == "next"
    threads = await host.list_threads({"graph": "hold", "limit": 10})
    assert [t["thread_id"] for t in threads["threads"]] == ["displaced"]
    assert threads["threads"][0]["metadata"]["run_id"] == items[0][1]["run_id"]
    with pytest.raises(InvalidArgument):
        await host.list_threads({"graph": "hold", "limit": -1})


def test_handler_specs_cover_every_operation() -> None:
    names = {spec.name for spec in handler_specs(_host())}
    assert {
        "lg.graph.run",
        "lg.graph.cancel_run",
        "lg.graph.get_state",
        "lg.graph.schemas",
    } <= names


async def test_schemas_and_drawable_graph() -> None:
    host = _host()
    schemas = host.schemas({"graph": "g"})
    assert "text" in schemas["input_schema"]["properties"]
    assert set(host.schemas(None)) == {"g", "hold"}
    drawn = await host.get_graph({"graph": "g"})
    assert {n["id"] for n in drawn["nodes"]} >= {"step", "ask"}


def test_client_rejects_bad_arguments() -> None:
    with pytest.raises(PilotUsageError):
        PilotRemoteGraph("", peer="w")
    with pytest.raises(PilotUsageError):
        PilotRemoteGraph("g", peer=[])
    remote = PilotRemoteGraph("g", peer=["a", "b"], config={"tags": ["x"]})
    bound = remote.with_config({"configurable": {"thread_id": "t"}})
    assert bound.peers == ["a", "b"]
    assert bound.config is not None
    assert bound.config.get("tags") == ["x"]
    assert bound.config.get("configurable") == {"thread_id": "t"}
