"""A LangGraph app whose checkpoints live in a remote store (run as its own process).

Used by ``test_checkpoint_resume.py``: ``start`` runs a 3-node graph whose
second node kills its own process with SIGKILL the first time it runs, and
pauses on ``interrupt()`` after that; ``resume`` continues the same thread in a
fresh process from the remote store (with ``--answer``: ``Command(resume=...)``).
Prints the final state as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, interrupt
from pilot_checkpoint_sqlite import PilotCheckpointSaver


class State(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    visits: Annotated[list[str], lambda a, b: [*a, *b]]
    answer: str


def build(saver: PilotCheckpointSaver, marker: Path) -> Any:
    def first(state: State) -> dict[str, Any]:
        return {"visits": ["first"], "messages": [AIMessage(content="first done")]}

    def second(state: State) -> dict[str, Any]:
        if not marker.exists():
            marker.write_text("killed once", encoding="utf-8")
            os.kill(os.getpid(), signal.SIGKILL)
        return {"visits": ["second"], "answer": interrupt({"question": "go on?"})}

    def third(state: State) -> dict[str, Any]:
        return {"visits": ["third"], "messages": [AIMessage(content="all done")]}

    builder = StateGraph(State)
    builder.add_node("first", first)
    builder.add_node("second", second)
    builder.add_node("third", third)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", "third")
    builder.add_edge("third", END)
    return builder.compile(checkpointer=saver)


def _dump(result: Any) -> str:
    messages = [{"type": m.type, "content": m.content} for m in result.get("messages", [])]
    interrupts = [i.value for i in result.get("__interrupt__", [])]
    return json.dumps(
        {
            "visits": result.get("visits", []),
            "answer": result.get("answer"),
            "messages": messages,
            "interrupts": interrupts,
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=("start", "resume"))
    parser.add_argument("--peer", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--trust", required=True)
    parser.add_argument("--thread", required=True)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--answer", default=None)
    parser.add_argument("--sync", action="store_true", help="graph.invoke instead of ainvoke")
    parser.add_argument("--transport", default="tcp://127.0.0.1:0", help="our transport URL")
    args = parser.parse_args()
    saver = PilotCheckpointSaver(
        peer=args.peer,
        port=args.port,
        transport=args.transport,
        identity=args.identity,
        trust=args.trust,
    )
    graph = build(saver, Path(args.marker))
    config = {"configurable": {"thread_id": args.thread}}
    if args.action == "start":
        inputs: Any = {"messages": [HumanMessage(content="hello")], "visits": []}
    elif args.answer is not None:
        inputs = Command(resume=args.answer)
    else:
        inputs = None
    try:
        # durability="sync": each step's checkpoint is stored before the next
        # step runs, so a SIGKILL inside a node never loses the step before it.
        if args.sync:
            result = graph.invoke(inputs, config, durability="sync")
        else:
            result = asyncio.run(graph.ainvoke(inputs, config, durability="sync"))
    finally:
        saver.close()
    print(_dump(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
