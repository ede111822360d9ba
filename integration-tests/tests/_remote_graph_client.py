"""A separate client process for the PilotRemoteGraph tests.

``resume GRAPH THREAD VALUE``: resume an interrupted thread, print the final state.
``cancel GRAPH RUN_ID``: cancel a run by id, print whether a worker had it.
"""

from __future__ import annotations

import asyncio
import json
import sys

from langgraph.types import Command
from pilot_langgraph import PilotRemoteGraph, aclose_default_transport


async def _main(argv: list[str]) -> None:
    action, graph, arg = argv[0], argv[1], argv[2]
    remote = PilotRemoteGraph(graph, peer="graph-worker")
    try:
        if action == "resume":
            out = await remote.ainvoke(
                Command(resume=argv[3]), {"configurable": {"thread_id": arg}}
            )
            print(json.dumps({"answer": out.get("answer")}))
        elif action == "cancel":
            print(json.dumps({"cancelled": await remote.acancel_run(arg)}))
    finally:
        await aclose_default_transport()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
