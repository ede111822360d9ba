"""A process doing several runs of a graph on one thread, through ``exclusive_runs``.

Used by ``test_checkpoint_exclusive.py``. Each run appends ``NAME-i`` to the
thread's ``log`` (LangGraph's ``operator.add`` reducer): without exclusion two
processes read the same checkpoint and one run's update is lost. Files
coordinate the processes so the overlap the test needs happens for sure.
Prints one JSON line: accepted run ids, rejection count and messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import operator
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from pilot_checkpoint_sqlite import PilotCheckpointSaver, exclusive_runs
from pilot_checkpoint_sqlite.errors import ThreadBusyError

WAIT = 120.0


class State(TypedDict, total=False):
    log: Annotated[list[str], operator.add]
    item: str


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)  # another process creates it; no other way to be told


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--trust", required=True)
    parser.add_argument("--thread", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--strategy", choices=("reject", "enqueue"), default="reject")
    parser.add_argument("--ttl", type=float, default=30.0)
    parser.add_argument("--enqueue-timeout", type=float, default=300.0)
    parser.add_argument("--async", dest="use_async", action="store_true")
    parser.add_argument("--in-run", help="file created when the first run's node starts")
    parser.add_argument("--hold-until", help="the first run's node waits for this file")
    parser.add_argument("--wait-for", help="wait for this file before the first run")
    parser.add_argument("--touch-before-first", help="file created just before the first run")
    parser.add_argument("--touch-on-reject", help="file created on the first rejection")
    args = parser.parse_args()

    def work(state: State) -> dict[str, Any]:
        item = state.get("item", "")
        if item == f"{args.name}-0":
            if args.in_run:
                Path(args.in_run).touch()
            if args.hold_until:
                _wait_for(Path(args.hold_until))
        return {"log": [item]}

    builder = StateGraph(State)
    builder.add_node("work", work)
    builder.add_edge(START, "work")
    builder.add_edge("work", END)
    saver = PilotCheckpointSaver(
        peer=args.peer,
        port=args.port,
        transport="tcp://127.0.0.1:0",
        identity=args.identity,
        trust=args.trust,
    )
    app = exclusive_runs(
        builder.compile(checkpointer=saver),
        saver,
        multitask_strategy=args.strategy,
        lease_ttl=args.ttl,
        enqueue_timeout=args.enqueue_timeout,
    )
    config = {"configurable": {"thread_id": args.thread}}
    accepted: list[str] = []
    rejected: list[dict[str, str]] = []
    if args.wait_for:
        _wait_for(Path(args.wait_for))
    started = time.monotonic()

    def before(i: int) -> str:
        if i == 0 and args.touch_before_first:
            Path(args.touch_before_first).touch()
        return f"{args.name}-{i}"

    def refused(exc: ThreadBusyError) -> None:
        rejected.append({"kind": type(exc).__name__, "message": str(exc)})
        if args.touch_on_reject and len(rejected) == 1:
            Path(args.touch_on_reject).touch()

    async def run_async() -> None:
        for i in range(args.runs):
            item = before(i)
            try:
                await app.ainvoke({"item": item}, config, durability="sync")
            except ThreadBusyError as exc:
                refused(exc)
            else:
                accepted.append(item)

    try:
        if args.use_async:
            asyncio.run(run_async())
        else:
            for i in range(args.runs):
                item = before(i)
                try:
                    app.invoke({"item": item}, config, durability="sync")
                except ThreadBusyError as exc:
                    refused(exc)
                else:
                    accepted.append(item)
    finally:
        saver.close()
    print(
        json.dumps(
            {
                "accepted": accepted,
                "rejected": rejected,
                "seconds": round(time.monotonic() - started, 3),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
