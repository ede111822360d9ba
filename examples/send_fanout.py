"""Dynamic fan-out with LangGraph's ``Send``: one remote task per item.

    scripts/uv run python examples/send_fanout.py

(`scripts/uv` is uv: the machine's own, or the one the README's commands
install into `.tools/`; with uv on PATH, `uv run ...` is the same.)

The ``square`` node is a ``PilotRemoteRunnable`` over a pool of three workers:
LangGraph sends one task per input item, and the calls spread over the pool
(round robin, skipping a worker that is down).
"""

from __future__ import annotations

import operator
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send
from pilot_langgraph import PilotRemoteRunnable

HERE = Path(__file__).resolve().parent
POOL = ["worker-a", "worker-b", "worker-c"]


class State(TypedDict, total=False):
    numbers: list[int]
    squares: Annotated[list[dict[str, Any]], operator.add]
    total: int


def fan_out(state: State) -> list[Send]:
    return [Send("square", {"n": n}) for n in state["numbers"]]


def reduce(state: State) -> dict[str, Any]:
    return {"total": sum(item["square"] for item in state["squares"])}


def build() -> Any:
    graph = StateGraph(State)
    graph.add_node("square", PilotRemoteRunnable(node="square", peer=POOL))
    graph.add_node("reduce", reduce)
    graph.add_conditional_edges(START, fan_out, ["square"])
    graph.add_edge("square", "reduce")
    graph.add_edge("reduce", END)
    return graph.compile()


async def run() -> dict[str, Any]:
    return await build().ainvoke({"numbers": list(range(1, 13))})


def main() -> int:
    import asyncio

    from pilot_langgraph import aclose_default_transport
    from pilot_langgraph.testing import LocalCluster

    async def go() -> dict[str, Any]:
        try:
            return await run()
        finally:
            await aclose_default_transport()

    with tempfile.TemporaryDirectory() as tmp, LocalCluster(tmp) as cluster:
        for name in POOL:
            cluster.add_worker(
                name, handlers=[str(HERE / "research_handlers.py")], env={"EXAMPLE_WORKER": name}
            )
        cluster.start()
        result = asyncio.run(go())
    spread = Counter(item["worker"].split("/")[0] for item in result["squares"])
    print(f"{len(result['squares'])} Send tasks, total of squares = {result['total']}")
    print("tasks per worker: " + ", ".join(f"{w}={n}" for w, n in sorted(spread.items())))
    return 0 if result["total"] == sum(n * n for n in range(1, 13)) else 1


if __name__ == "__main__":
    sys.exit(main())
