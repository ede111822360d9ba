"""Graph state survives the process that ran it.

    scripts/uv run python examples/checkpoint_survival.py

(`scripts/uv` is uv: the machine's own, or the one the README's commands
install into `.tools/`; with uv on PATH, `uv run ...` is the same.)

Process 1 runs a graph with remote nodes until a human-approval ``interrupt``
and exits. Process 2, a brand-new interpreter that shares nothing with it but
the thread id, loads the thread from ``state-worker`` and finishes the run
with ``Command(resume=...)``. (This script plays both roles: it starts the
workers, then runs itself twice as ``--part 1`` and ``--part 2``.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, interrupt
from pilot_langgraph import PilotCheckpointSaver, PilotRemoteRunnable

HERE = Path(__file__).resolve().parent
THREAD = "survival-1"


class State(TypedDict, total=False):
    topic: str
    topics: list[str]
    messages: Annotated[list[AnyMessage], add_messages]
    findings: list[dict[str, Any]]
    report: str
    approved: str


def approve(state: State) -> dict[str, Any]:
    answer = interrupt({"question": "publish this report?", "report": state["report"]})
    return {"approved": str(answer)}


def build() -> Any:
    graph = StateGraph(State)
    graph.add_node("research", PilotRemoteRunnable(node="research_topic", peer="worker-a"))
    graph.add_node("write", PilotRemoteRunnable(node="write_report", peer="worker-b"))
    graph.add_node("approve", approve)
    graph.add_edge(START, "research")
    graph.add_edge("research", "write")
    graph.add_edge("write", "approve")
    graph.add_edge("approve", END)
    return graph


def part(number: int) -> int:
    saver = PilotCheckpointSaver(peer="state-worker")
    app = build().compile(checkpointer=saver)
    config: Any = {"configurable": {"thread_id": THREAD}}
    try:
        if number == 1:
            app.invoke({"topics": ["checkpoints"], "topic": "checkpoints"}, config)
            pending = app.get_state(config)
            question = pending.tasks[0].interrupts[0].value["question"]
            print(f"[pid {os.getpid()}] paused before {list(pending.next)}: {question!r}; exiting")
        else:
            before = app.get_state(config)
            print(
                f"[pid {os.getpid()}] loaded {THREAD!r} from state-worker, next {list(before.next)}"
            )
            final = app.invoke(Command(resume="approved"), config)
            print(f"[pid {os.getpid()}] finished: approved={final['approved']!r}")
            print(final["report"].splitlines()[0])
    finally:
        saver.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", type=int, choices=[1, 2])
    args = parser.parse_args()
    if args.part:
        return part(args.part)

    from pilot_langgraph.testing import LocalCluster

    with tempfile.TemporaryDirectory() as tmp, LocalCluster(tmp) as cluster:
        handlers = str(HERE / "research_handlers.py")
        cluster.add_worker("worker-a", handlers=[handlers], env={"EXAMPLE_WORKER": "worker-a"})
        cluster.add_worker("worker-b", handlers=[handlers], env={"EXAMPLE_WORKER": "worker-b"})
        cluster.add_worker(
            "state-worker",
            plugins=["checkpoint-sqlite"],
            extra_args=["--checkpoint-db", f"sqlite:///{tmp}/checkpoints.db"],
        )
        cluster.start()
        for number in (1, 2):
            subprocess.run(
                [sys.executable, __file__, "--part", str(number)],
                check=True,
                env={**os.environ, **cluster.client_env},
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
