"""Graphs served by the PilotRemoteGraph integration tests (``--graph NAME=this:attr``).

Markers go to ``$LG_TEST_DIR`` when it is set, so a test can see what ran.
"""

from __future__ import annotations

import asyncio
import operator
import os
from pathlib import Path
from typing import Annotated, Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt
from typing_extensions import TypedDict  # pydantic needs it for JSON Schemas on 3.11


class PlanState(TypedDict, total=False):
    task: str
    plan: list[str]
    results: Annotated[list[str], operator.add]
    verdict: str
    answer: str
    approved: str


def _planner(state: PlanState) -> dict[str, Any]:
    get_stream_writer()({"progress": "planning"})
    return {"plan": [f"{state['task']}:step{i}" for i in range(3)]}


def _executor(state: PlanState) -> dict[str, Any]:
    get_stream_writer()({"progress": "executing"})
    return {"results": [s.upper() for s in state["plan"]]}


async def _verifier(state: PlanState) -> dict[str, Any]:
    model = GenericFakeChatModel(messages=iter([AIMessage(content="all three steps verified")]))
    reply = await model.ainvoke("verify")
    return {"verdict": "ok" if len(state["results"]) == 3 else "bad", "answer": str(reply.content)}


def _build_planner() -> StateGraph[PlanState]:
    g = StateGraph(PlanState)
    g.add_node("planner", _planner)
    g.add_node("executor", _executor)
    g.add_node("verifier", _verifier)
    g.add_edge(START, "planner")
    g.add_edge("planner", "executor")
    g.add_edge("executor", "verifier")
    g.add_edge("verifier", END)
    return g


planner = _build_planner()
"""The planner/executor/verifier graph (a StateGraph: the worker compiles it)."""


def _inner_graph() -> Any:
    g = StateGraph(PlanState)
    g.add_node("planner", _planner)
    g.add_node("executor", _executor)
    g.add_edge(START, "planner")
    g.add_edge("planner", "executor")
    g.add_edge("executor", END)
    return g.compile()


def nested() -> Any:
    """A factory: a parent whose first node is a compiled subgraph."""
    g = StateGraph(PlanState)
    g.add_node("work", _inner_graph())
    g.add_node("verifier", _verifier)
    g.add_edge(START, "work")
    g.add_edge("work", "verifier")
    g.add_edge("verifier", END)
    return g


def _approve(state: PlanState) -> dict[str, Any]:
    answer = interrupt({"question": f"approve {state['task']}?"})
    return {"approved": str(answer)}


def _finish(state: PlanState) -> dict[str, Any]:
    return {"answer": f"{state['task']} approved={state['approved']}"}


def _build_approval() -> StateGraph[PlanState]:
    g = StateGraph(PlanState)
    g.add_node("approve", _approve)
    g.add_node("finish", _finish)
    g.add_edge(START, "approve")
    g.add_edge("approve", "finish")
    g.add_edge("finish", END)
    return g


approval = _build_approval().compile()
"""A compiled graph (no checkpointer: the worker gives it one) that interrupts."""


async def _slow(state: PlanState) -> dict[str, Any]:
    marker_dir = Path(os.environ.get("LG_TEST_DIR", "."))
    (marker_dir / f"{state['task']}.started").write_text(str(os.getpid()))
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        (marker_dir / f"{state['task']}.cancelled").write_text(str(os.getpid()))
        raise
    return {"answer": "never"}


def _build_slow() -> StateGraph[PlanState]:
    g = StateGraph(PlanState)
    g.add_node("slow", _slow)
    g.add_edge(START, "slow")
    g.add_edge("slow", END)
    return g


slow = _build_slow()
"""A graph whose only node waits until it is cancelled."""


def _second_approval(state: PlanState) -> dict[str, Any]:
    again = interrupt({"question": f"really {state['task']}?"})
    return {"answer": f"{state['task']} approved={state['approved']} again={again}"}


def _build_double() -> StateGraph[PlanState]:
    g = StateGraph(PlanState)
    g.add_node("approve", _approve)
    g.add_node("again", _second_approval)
    g.add_edge(START, "approve")
    g.add_edge("approve", "again")
    g.add_edge("again", END)
    return g


double_approval = _build_double()
"""Two interrupts one after the other."""


def _step_marker(state: PlanState, step: str) -> Path | None:
    """Count one execution of ``step`` in ``$LG_TEST_DIR/<task>.count`` (if set)."""
    root = os.environ.get("LG_TEST_DIR")
    if root is None:
        return None
    with (Path(root) / f"{state['task']}.count").open("a") as out:
        out.write(f"{step} {os.getpid()}\n")
    return Path(root)


def _step_one(state: PlanState) -> dict[str, Any]:
    _step_marker(state, "one")
    return {"plan": [f"{state['task']}:a", f"{state['task']}:b"], "results": ["one"]}


async def _step_two(state: PlanState) -> dict[str, Any]:
    root = _step_marker(state, "two")
    if root is not None and (root / f"{state['task']}.hold").exists():
        pid_file = root / f"{state['task']}.two.pid"
        if not pid_file.exists():  # the first worker to get here waits to be killed
            pid_file.write_text(str(os.getpid()))
            await asyncio.Event().wait()
    return {"results": ["two"]}


def _step_three(state: PlanState) -> dict[str, Any]:
    _step_marker(state, "three")
    return {"results": ["three"], "verdict": "ok", "answer": "+".join(state["plan"])}


def _build_steps() -> StateGraph[PlanState]:
    g = StateGraph(PlanState)
    g.add_node("one", _step_one)
    g.add_node("two", _step_two)
    g.add_node("three", _step_three)
    g.add_edge(START, "one")
    g.add_edge("one", "two")
    g.add_edge("two", "three")
    g.add_edge("three", END)
    return g


steps = _build_steps()
"""Three steps; with ``<task>.hold`` present, the first worker to reach step two
writes its pid to ``<task>.two.pid`` and waits there (to be killed)."""
