"""The graph ``examples/remote_graph.py`` serves: plan, ask a human, execute.

Served with ``pilot-langgraph-worker --graph release=examples/remote_graph_app.py:builder``.
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt
from typing_extensions import TypedDict


class Release(TypedDict, total=False):
    version: str
    plan: list[str]
    approved_by: str
    log: str


def plan(state: Release) -> dict[str, Any]:
    return {"plan": [f"build {state['version']}", "run tests", "publish"]}


def approve(state: Release) -> dict[str, Any]:
    who = interrupt({"question": f"publish {state['version']}?", "plan": state["plan"]})
    return {"approved_by": str(who)}


def execute(state: Release) -> dict[str, Any]:
    return {"log": f"{state['version']} published, approved by {state['approved_by']}"}


builder = StateGraph(Release)
builder.add_node("plan", plan)
builder.add_node("approve", approve)
builder.add_node("execute", execute)
builder.add_edge(START, "plan")
builder.add_edge("plan", "approve")
builder.add_edge("approve", "execute")
builder.add_edge("execute", END)
