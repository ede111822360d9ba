"""A whole graph on a worker, used as a node of a local graph, with a human in the loop.

    uv run python examples/remote_graph.py

``release-worker`` serves the graph of ``remote_graph_app.py`` (``--graph``,
checkpointed to a SQLite store in the worker). The local parent graph has it
as one node (``PilotRemoteGraph``): the remote graph's ``interrupt()`` pauses
the parent, and resuming the parent resumes the remote graph where it stopped.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command
from pilot_langgraph import PilotRemoteGraph, aclose_default_transport
from pilot_langgraph.testing import LocalCluster

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from remote_graph_app import Release  # noqa: E402 - the example's own directory


def announce(state: Release) -> dict[str, Any]:
    return {"log": state["log"] + " (announced locally)"}


async def run() -> int:
    release = PilotRemoteGraph("release", peer="release-worker")
    parent = StateGraph(Release)
    parent.add_node("release", release)
    parent.add_node("announce", announce)
    parent.add_edge(START, "release")
    parent.add_edge("release", "announce")
    parent.add_edge("announce", END)
    app = parent.compile(checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "release-1"}}
    try:
        async for ns, update in app.astream(
            {"version": "1.2.0"}, config, stream_mode="updates", subgraphs=True
        ):
            where = "remote" if ns else "parent"
            print(f"[{where}] {update}")
        question = (await app.aget_state(config)).interrupts[0].value["question"]
        print(f"paused: {question}")
        out = await app.ainvoke(Command(resume="alice"), config)
        print(f"final: {out['log']}")
        return 0 if out["log"] == "1.2.0 published, approved by alice (announced locally)" else 1
    finally:
        await aclose_default_transport()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(tmp) as cluster:
        cluster.add_worker(
            "release-worker",
            extra_args=[
                "--graph",
                f"release={HERE / 'remote_graph_app.py'}:builder",
                "--checkpoint-db",
                f"sqlite:///{Path(tmp) / 'release.db'}",
            ],
        )
        cluster.start()
        return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
