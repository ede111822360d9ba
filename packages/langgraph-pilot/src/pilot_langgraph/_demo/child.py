"""A graph run in its own process (the demo kills one and resumes in another).

``python -m pilot_langgraph._demo.child run THREAD`` starts a run on THREAD;
``... resume THREAD`` continues THREAD from its last checkpoint on state-worker.
With ``--wait-for-go`` the process loads its code, prints ``ready`` and waits
for a line on stdin before it touches the network (so the demo can start it
while workers boot).
Identity, trust and transport come from ``PILOT_IDENTITY``, ``PILOT_TRUST`` and
``PILOT_TRANSPORT_URL``, exactly as in user code. Each finished step is printed as
one JSON line on stdout; the last line holds the final state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

__all__ = ["main", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """A JSON view of a state value (messages as ``[type, name, content]``)."""
    from langchain_core.messages import BaseMessage

    if isinstance(value, BaseMessage):
        return [type(value).__name__, value.name, value.content]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}  # pyright: ignore[reportUnknownVariableType]
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]  # pyright: ignore[reportUnknownVariableType]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _emit(record: dict[str, Any]) -> None:
    try:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The demo that started this process has gone (its --timeout ran out):
        # nobody is left to read, so leave quietly instead of with a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(1) from None


async def _run(mode: str, thread_id: str, goal: str) -> None:
    from pilot_langgraph import PilotCheckpointSaver, aclose_default_transport
    from pilot_langgraph._demo.graph import build_graph

    saver = PilotCheckpointSaver(peer="state-worker")
    try:
        app = build_graph(remote=True).compile(checkpointer=saver)
        config: Any = {"configurable": {"thread_id": thread_id}}
        if mode == "resume":
            snapshot = await app.aget_state(config)
            _emit(
                {
                    "event": "resume",
                    "pid": os.getpid(),
                    "next": list(snapshot.next),
                    "step": snapshot.metadata.get("step") if snapshot.metadata else None,
                }
            )
            stream_input: Any = None
        else:
            _emit({"event": "start", "pid": os.getpid()})
            stream_input = {"goal": goal}
        async for update in app.astream(
            stream_input, config, stream_mode="updates", durability="sync"
        ):
            for node, values in update.items():
                _emit({"event": "update", "node": node, "values": to_jsonable(values)})
        final = await app.aget_state(config)
        _emit({"event": "final", "state": to_jsonable(final.values)})
    finally:
        await aclose_default_transport()
        saver.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot_langgraph._demo.child")
    parser.add_argument("mode", choices=["run", "resume"])
    parser.add_argument("thread_id")
    parser.add_argument("--goal", default="explain how the pieces fit")
    parser.add_argument("--wait-for-go", action="store_true")
    args = parser.parse_args(argv)
    if args.wait_for_go:
        import importlib

        for module in ("pilot_langgraph._demo.graph", "pilot_checkpoint_sqlite"):
            importlib.import_module(module)  # load the code before saying ready

        _emit({"event": "ready", "pid": os.getpid()})
        if not sys.stdin.readline():
            return 1
    asyncio.run(_run(args.mode, args.thread_id, args.goal))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
