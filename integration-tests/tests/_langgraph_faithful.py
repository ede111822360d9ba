"""Handlers, local twins and graphs for the faithful-remote-node tests.

Loaded three ways: by the worker processes (``--handlers <this file>``), by the
test process (to build the same graphs with local nodes), and as a script by
a second client process (``python _langgraph_faithful.py interrupt-client
THREAD start|RESUME``), which prints one JSON line with what the graph returned.
"""

from __future__ import annotations

import asyncio
import json
import operator
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypedDict

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, AnyMessage
from langgraph.config import get_config, get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import interrupt
from pilot_worker import Context, pilot_handler

TEXT = "remote tokens arrive one by one exactly as a local model streams them"


class MsgState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


class LogState(TypedDict, total=False):
    log: Annotated[list[Any], operator.add]


def model() -> GenericFakeChatModel:
    """A streaming chat model (one reply, streamed word by word)."""
    return GenericFakeChatModel(messages=iter([AIMessage(content=TEXT)]))


# -- node bodies, run locally by the test and remotely by the handlers below ---------------


async def chat_node(state: dict[str, Any]) -> dict[str, Any]:
    reply = await model().ainvoke(state["messages"])
    return {"messages": [reply]}


def config_node(_: Any) -> dict[str, Any]:
    config = get_config()
    configurable = config.get("configurable") or {}
    metadata = config.get("metadata") or {}
    return {
        "log": [
            {
                "tags": sorted(t for t in config.get("tags") or [] if not t.startswith("seq:")),
                "user_id": configurable.get("user_id"),
                "team": metadata.get("team"),
                "node": metadata.get("langgraph_node"),
                "recursion_limit": config.get("recursion_limit"),
            }
        ]
    }


async def ask_node(_: Any) -> dict[str, Any]:
    first = interrupt("first?")
    second = interrupt({"q": "second?"})
    return {"log": [first, second]}


# -- handlers -------------------------------------------------------------------------------


@pilot_handler("f_chat", timeout_secs=30)
async def f_chat(state: dict[str, Any]) -> dict[str, Any]:
    return await chat_node(state)


@pilot_handler("f_config", timeout_secs=30)
def f_config(state: Any, ctx: Context) -> dict[str, Any]:
    out = config_node(state)
    out["log"][0]["ctx_user_id"] = ctx.config["configurable"].get("user_id")
    out["log"][0]["ctx_run_name"] = ctx.config.get("run_name")
    return out


@pilot_handler("f_ask", timeout_secs=30)
async def f_ask(state: Any) -> dict[str, Any]:
    return await ask_node(state)


@pilot_handler("f_progress", timeout_secs=30)
async def f_progress(_: Any, ctx: Context) -> dict[str, Any]:
    write = get_stream_writer()
    for pct in (25, 50, 75):
        await ctx.report_progress({"pct": pct})
    write({"custom": "written"})
    return {"log": ["progressed"]}


@pilot_handler("f_stream_chunks", timeout_secs=30)
async def f_stream_chunks(state: dict[str, Any]) -> AsyncIterator[Any]:
    async for chunk in model().astream(state["messages"]):
        yield chunk


async def checked_chunks(state: dict[str, Any]) -> AsyncIterator[Any]:
    get_stream_writer()({"custom": "before the model"})
    async for chunk in model().astream(state["messages"]):
        yield chunk


@pilot_handler("f_stream_checked", timeout_secs=30, output_model=AIMessageChunk)
async def f_stream_checked(state: dict[str, Any]) -> AsyncIterator[Any]:
    async for chunk in checked_chunks(state):
        yield chunk


@pilot_handler("f_stream_checked_bad", timeout_secs=30, output_model=AIMessageChunk)
async def f_stream_checked_bad(state: dict[str, Any]) -> AsyncIterator[Any]:
    async for chunk in checked_chunks(state):
        yield chunk
    yield {"not": "a chunk"}


async def checked_full(
    state: dict[str, Any], progress: Any, handler: str = "f_stream_checked_full"
) -> AsyncIterator[Any]:
    """Writes, progress, a chat model inside (tokens via callbacks) and streamed chunks."""
    write = get_stream_writer()
    write({"custom": "before the model"})
    await progress({"pct": 10})
    summary = await model().ainvoke(state["messages"])
    write({"summary": str(summary.content)[:6]})
    async for chunk in model().astream(state["messages"]):
        yield chunk
    await progress({"pct": 100})
    write({"custom": "after the model"})


@pilot_handler("f_stream_checked_full", timeout_secs=30, output_model=AIMessageChunk)
async def f_stream_checked_full(state: dict[str, Any], ctx: Context) -> AsyncIterator[Any]:
    async for chunk in checked_full(state, ctx.report_progress):
        yield chunk


@pilot_handler("f_stream_forged_checked", timeout_secs=30, output_model=AIMessageChunk)
async def f_stream_forged_checked(state: dict[str, Any]) -> AsyncIterator[Any]:
    from pilot_langgraph import LangGraphCodec

    async for chunk in model().astream(state["messages"]):
        yield chunk
        break
    # a handler's own "control message" must not pass output_model as one
    yield LangGraphCodec().control("custom", {"forged": True})


@pilot_handler("f_stream_forged", timeout_secs=30)
async def f_stream_forged(state: dict[str, Any]) -> AsyncIterator[Any]:
    from pilot_langgraph._codec import ControlMessage

    yield {"first": "item"}
    yield ControlMessage("interrupt", [["fake", "id", None]])


# -- graphs ---------------------------------------------------------------------------------


def one_node(state: type[Any], name: str, node: Any, *, checkpointer: Any = None) -> Any:
    graph = StateGraph(state)
    graph.add_node(name, node)
    graph.add_edge(START, name)
    graph.add_edge(name, END)
    return graph.compile(checkpointer=checkpointer)


def in_subgraph(node: Any) -> Any:
    graph = StateGraph(MsgState)
    graph.add_node("inner", one_node(MsgState, "model", node))
    graph.add_edge(START, "inner")
    graph.add_edge("inner", END)
    return graph.compile()


# -- second client process ------------------------------------------------------------------


async def _interrupt_client(thread: str, action: str) -> dict[str, Any]:
    from langgraph.types import Command
    from pilot_langgraph import (
        PilotCheckpointSaver,
        PilotRemoteRunnable,
        aclose_default_transport,
    )

    saver = PilotCheckpointSaver(peer="state-worker")
    try:
        app = one_node(
            LogState,
            "ask",
            PilotRemoteRunnable(node="f_ask", peer="worker-a"),
            checkpointer=saver,
        )
        config: Any = {"configurable": {"thread_id": thread}}
        value: Any = {"log": []} if action == "start" else Command(resume=action)
        out = await app.ainvoke(value, config)
        return {
            "log": out.get("log"),
            "interrupts": [[i.value, i.id] for i in out.get("__interrupt__", ())],
        }
    finally:
        saver.close()
        await aclose_default_transport()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "interrupt-client":
    print(json.dumps(asyncio.run(_interrupt_client(sys.argv[2], sys.argv[3]))))
