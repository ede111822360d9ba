"""Handlers of the demo workers, and the graph they form.

The same pure functions run either on remote workers (``build_graph(remote=True)``)
or in-process (``remote=False``), so the demo can compare a distributed run
(killed and resumed) with a purely local one. They are deterministic: same
input, same output, wherever they run. Each result carries a ``trace`` entry
saying which worker (and pid) produced it; traces are the only part of the
state that differs between a local and a remote run.
"""

from __future__ import annotations

import asyncio
import operator
import os
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from pilot_worker import Context, pilot_handler

from pilot_langgraph._env import PILOT_DEMO_WORKER
from pilot_langgraph._remote import FANOUT_LABEL_HEADER

__all__ = [
    "DemoState",
    "build_graph",
    "compare_states",
    "execute",
    "plan",
    "search",
    "verify",
]

# Simulated work per executor step, so a run can be interrupted mid-way.
EXECUTOR_WORK_SECS = 0.25

_TOPICS = {
    "broad": ["transport security", "worker pools", "checkpoint stores"],
    "deep": ["mutual TLS 1.3", "idempotency keys", "write-ahead logging"],
    "recent": ["peer-to-peer NAT traversal", "durable topics", "graph resumption"],
}


class DemoState(TypedDict, total=False):
    goal: str
    broad: dict[str, Any]
    deep: dict[str, Any]
    recent: dict[str, Any]
    plan: list[str]
    step: int
    results: Annotated[list[str], operator.add]
    verdicts: Annotated[list[str], operator.add]
    messages: Annotated[list[AnyMessage], add_messages]
    done: bool
    trace: Annotated[list[str], operator.add]


def _where() -> str:
    return f"{os.environ.get(PILOT_DEMO_WORKER, 'local')} (pid {os.getpid()})"


def _search(goal: str, label: str) -> dict[str, Any]:
    return {"goal": goal, "hits": _TOPICS.get(label, _TOPICS["broad"]), "by": _where()}


@pilot_handler("search", timeout_secs=10)
async def search(state: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Look up material for the goal, from the angle named by the fan-out label."""
    label = ctx.metadata.get(FANOUT_LABEL_HEADER, "broad")
    return _search(str(state.get("goal", "")), label)


def _hits(state: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("broad", "deep", "recent"):
        found = state.get(key) or {}
        out.extend(found.get("hits", []))
    return out


@pilot_handler("plan", timeout_secs=10)
async def plan(state: dict[str, Any]) -> dict[str, Any]:
    """Turn the research into a three-step plan."""
    hits = sorted(_hits(state))
    steps = [f"explain {hits[i]}" for i in range(0, min(len(hits), 9), 3)] or ["explain goal"]
    return {
        "plan": steps,
        "step": 0,
        "messages": [AIMessage(f"plan: {'; '.join(steps)}", name="planner")],
        "trace": [f"planner   on {_where()}"],
    }


@pilot_handler("execute", timeout_secs=10, idempotent=True)
async def execute(state: dict[str, Any]) -> dict[str, Any]:
    """Carry out the current plan step."""
    step = int(state.get("step", 0))
    task = state["plan"][step]
    await asyncio.sleep(EXECUTOR_WORK_SECS)  # stands in for real work (an LLM call, a tool)
    result = f"step {step + 1}: {task} -> done ({len(task)} chars of notes)"
    return {
        "results": [result],
        "messages": [AIMessage(result, name="executor")],
        "trace": [f"executor  on {_where()}"],
    }


@pilot_handler("verify", timeout_secs=10)
async def verify(state: dict[str, Any]) -> dict[str, Any]:
    """Check the latest result and move to the next step (or finish)."""
    step = int(state.get("step", 0))
    results = state.get("results", [])
    ok = len(results) == step + 1 and results[-1].startswith(f"step {step + 1}:")
    verdict = f"step {step + 1} {'verified' if ok else 'REJECTED'}"
    nxt = step + 1 if ok else step
    return {
        "step": nxt,
        "verdicts": [verdict],
        "done": nxt >= len(state["plan"]),
        "trace": [f"verifier  on {_where()}"],
    }


def _route(state: DemoState) -> str:
    return END if state.get("done") else "executor"


def build_graph(*, remote: bool) -> StateGraph[DemoState]:
    """The demo graph: research fan-out -> planner -> (executor -> verifier)*.

    With ``remote=True`` each node runs on its own worker (research fans out to
    worker-a, worker-b and worker-c); with ``remote=False`` the same functions run
    in-process.
    """
    from langchain_core.runnables import Runnable, RunnableLambda

    from pilot_langgraph._fanout import PilotFanoutRunnable
    from pilot_langgraph._remote import PilotRemoteRunnable

    graph: StateGraph[DemoState] = StateGraph(DemoState)
    nodes: dict[str, Runnable[Any, Any]]
    if remote:
        nodes = {
            "research": PilotFanoutRunnable(
                {
                    "broad": PilotRemoteRunnable(node="search", peer="worker-a"),
                    "deep": PilotRemoteRunnable(node="search", peer="worker-b"),
                    "recent": PilotRemoteRunnable(node="search", peer="worker-c"),
                }
            ),
            "planner": PilotRemoteRunnable(node="plan", peer="worker-a"),
            "executor": PilotRemoteRunnable(node="execute", peer="worker-b"),
            "verifier": PilotRemoteRunnable(node="verify", peer="worker-c"),
        }
    else:

        async def research(state: dict[str, Any]) -> dict[str, Any]:
            return {label: _search(str(state.get("goal", "")), label) for label in _TOPICS}

        nodes = {
            "research": RunnableLambda(research),
            "planner": RunnableLambda(plan),
            "executor": RunnableLambda(execute),
            "verifier": RunnableLambda(verify),
        }
    for name, node in nodes.items():
        graph.add_node(name, node)
    graph.add_edge(START, "research")
    graph.add_edge("research", "planner")
    graph.add_edge("planner", "executor")
    graph.add_edge("executor", "verifier")
    graph.add_conditional_edges("verifier", _route, ["executor", END])
    return graph


# Keys that say *where* something ran; they differ between runs by construction.
_WHERE_KEYS = ("trace",)


def comparable(state: dict[str, Any]) -> dict[str, Any]:
    """The state without the parts that record where each step ran."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in _WHERE_KEYS:
            continue
        if key in ("broad", "deep", "recent") and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "by"}  # pyright: ignore[reportUnknownVariableType]
        if key == "messages":
            value = [(type(m).__name__, m.name, m.content) for m in value]
        out[key] = value
    return out


def compare_states(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Differences between two final states (ignoring where steps ran)."""
    ca, cb = comparable(a), comparable(b)
    return [
        f"{key}: {ca.get(key)!r} != {cb.get(key)!r}"
        for key in sorted(set(ca) | set(cb))
        if ca.get(key) != cb.get(key)
    ]
