"""A graph process on a store tier (run as its own process by ``test_checkpoint_store_tier.py``).

Runs ``--threads`` threads of a one-node loop graph, ``--steps`` steps each,
with ``durability="sync"`` through ``PilotCheckpointSaver(peer=[...])``.
Every acknowledged checkpoint and write is printed as one JSON line as soon as
the store acknowledged it (with the store worker that answered first next);
the last line is the final state of every thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Annotated, Any, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import ChannelVersions, Checkpoint, CheckpointMetadata
from langgraph.graph import END, START, StateGraph
from pilot_checkpoint_sqlite import PilotCheckpointSaver, SaverOptions
from pilot_rpc import RetryPolicy


class State(TypedDict, total=False):
    seen: Annotated[list[int], lambda a, b: [*a, *b]]
    count: int


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class RecordingSaver(PilotCheckpointSaver):
    """Prints each write the store acknowledged."""

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        stored = await super().aput(config, checkpoint, metadata, new_versions)
        conf = stored.get("configurable", {})
        _emit(
            {
                "ack": "checkpoint",
                "thread": conf["thread_id"],
                "id": conf["checkpoint_id"],
                "peer": self.current_peer,
            }
        )
        return stored

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        await super().aput_writes(config, writes, task_id, task_path)
        conf = config.get("configurable", {})
        _emit(
            {
                "ack": "writes",
                "thread": conf["thread_id"],
                "id": conf["checkpoint_id"],
                "task": task_id,
                "n": len(writes),
                "peer": self.current_peer,
            }
        )


def build(saver: PilotCheckpointSaver, steps: int) -> Any:
    def step(state: State) -> dict[str, Any]:
        count = state.get("count", 0)
        return {"seen": [count], "count": count + 1}

    def route(state: State) -> str:
        return END if state.get("count", 0) >= steps else "step"

    builder = StateGraph(State)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_conditional_edges("step", route)
    return builder.compile(checkpointer=saver)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    saver = RecordingSaver(
        peer=args.peer,
        port=args.port,
        transport="tcp://127.0.0.1:0",
        identity=args.identity,
        trust=args.trust,
        options=SaverOptions(
            timeout=60.0,
            retry=RetryPolicy(max_attempts=6, initial_backoff=0.05, max_backoff=0.5),
        ),
    )
    graph = build(saver, args.steps)

    async def one(thread: str) -> dict[str, Any]:
        config: RunnableConfig = {
            "configurable": {"thread_id": thread},
            "recursion_limit": args.steps + 10,
        }
        return await graph.ainvoke({"seen": [], "count": 0}, config, durability="sync")

    try:
        threads = [f"{args.prefix}-{i}" for i in range(args.threads)]
        results = await asyncio.gather(*(one(t) for t in threads))
    finally:
        await saver.aclose()
    return {
        t: {"seen": r["seen"], "count": r["count"]} for t, r in zip(threads, results, strict=True)
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", action="append", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--trust", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    _emit({"final": asyncio.run(run(args))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
