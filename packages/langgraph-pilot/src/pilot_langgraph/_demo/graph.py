"""The demo graph: research fan-out -> planner -> (executor -> verifier)*."""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from pilot_langgraph._demo.handlers import TOPICS, execute, plan, search_locally, verify

__all__ = ["DemoState", "build_graph", "comparable", "compare_states"]


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
            return {label: search_locally(str(state.get("goal", "")), label) for label in TOPICS}

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
    from pilot_langgraph._demo.child import to_jsonable

    out: dict[str, Any] = {}
    for key, value in to_jsonable(state).items():
        if key in _WHERE_KEYS:
            continue
        if key in ("broad", "deep", "recent") and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "by"}  # pyright: ignore[reportUnknownVariableType]
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
