"""The seed example: a fan-out node over two workers, checkpoints on a third.

    scripts/uv run python examples/seed_fanout_checkpoint.py

(`scripts/uv` is uv: the machine's own, or the one the README's commands
install into `.tools/`; with uv on PATH, `uv run ...` is the same.)

For a self-contained run this script starts the workers itself on loopback
(``pilot_langgraph.testing.LocalCluster``); in a deployment they are
``pilot-langgraph-worker`` processes on other machines and only the graph code
below remains.
"""

from __future__ import annotations

import operator
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from pilot_langgraph import PilotCheckpointSaver, PilotFanoutRunnable, PilotRemoteRunnable
from pilot_langgraph.testing import LocalCluster

HERE = Path(__file__).resolve().parent


class State(TypedDict, total=False):
    query: str
    broad: dict[str, Any]
    deep: dict[str, Any]
    summary: Annotated[list[str], operator.add]


def summarize(state: State) -> dict[str, Any]:
    broad, deep = state["broad"], state["deep"]
    return {
        "summary": [
            f"{len(broad['hits'])} topics found by {broad['worker']}",
            f"{len(deep['hits'])} passages read by {deep['worker']}",
        ]
    }


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(tmp) as cluster:
        handlers = str(HERE / "research_handlers.py")
        for name in ("worker-a", "worker-b"):
            cluster.add_worker(name, handlers=[handlers], env={"EXAMPLE_WORKER": name})
        cluster.add_worker(
            "state-worker",
            plugins=["checkpoint-sqlite"],
            extra_args=["--checkpoint-db", f"sqlite:///{tmp}/checkpoints.db"],
        )
        cluster.start()

        # --- the seed, verbatim -------------------------------------------------
        graph = StateGraph(State)
        graph.add_node("research", PilotFanoutRunnable({
            "broad": PilotRemoteRunnable(node="search", peer="worker-a"),
            "deep":  PilotRemoteRunnable(node="search", peer="worker-b"),
        }))  # fmt: skip
        graph.add_node("summarize", summarize)
        graph.add_edge(START, "research")
        graph.add_edge("research", "summarize")
        graph.add_edge("summarize", END)
        saver = PilotCheckpointSaver(peer="state-worker")
        app = graph.compile(checkpointer=saver)
        # -------------------------------------------------------------------------

        config: Any = {"configurable": {"thread_id": "seed-1"}}
        result = app.invoke({"query": "checkpoints trust"}, config)
        for line in result["summary"]:
            print(line)
        history = list(app.get_state_history(config))
        print(f"{len(history)} checkpoints of thread 'seed-1' are stored on state-worker")
        saver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
