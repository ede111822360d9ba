"""A graph process that reads a thread's state from a remote store (``app.get_state``).

Used by ``test_checkpoint_security.py``. Prints one JSON line: the message
contents it read, or the error it got. ``--permissive`` uses LangGraph's
default serializer (``allowed_msgpack_modules=True``) instead of the saver's
allowlist, to show what the allowlist prevents.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from pilot_checkpoint_sqlite import PilotCheckpointSaver
from pilot_checkpoint_sqlite.errors import CheckpointError


class State(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--trust", required=True)
    parser.add_argument("--thread", required=True)
    parser.add_argument("--permissive", action="store_true")
    args = parser.parse_args()
    saver = PilotCheckpointSaver(
        peer=args.peer,
        port=args.port,
        transport="tcp://127.0.0.1:0",
        identity=args.identity,
        trust=args.trust,
        serde=JsonPlusSerializer(allowed_msgpack_modules=True) if args.permissive else None,
    )
    builder = StateGraph(State)
    builder.add_node("noop", lambda state: {})
    builder.add_edge(START, "noop")
    builder.add_edge("noop", END)
    app = builder.compile(checkpointer=saver)
    result: dict[str, Any]
    try:
        snapshot = app.get_state({"configurable": {"thread_id": args.thread}})
        result = {"ok": True, "values": repr(snapshot.values)}
    except CheckpointError as exc:
        result = {
            "ok": False,
            "kind": type(exc).__name__,
            "message": str(exc),
            "refused": list(getattr(exc, "refused", ())),
        }
    finally:
        saver.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
