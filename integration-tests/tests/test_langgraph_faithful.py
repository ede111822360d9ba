"""A node moved to a worker process behaves as it did in-process (issue 12).

Real ``pilot-langgraph-worker`` processes on tcp:// loopback (``worker-a``
serving ``_langgraph_faithful.py``, ``state-worker`` keeping checkpoints),
each with its own identity; the test process is the client. Every check runs
the same graph twice, once with the node local and once remote, and compares
what LangGraph's streams show item by item.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.runnables import RunnableLambda
from pilot_langgraph import (
    LangGraphCodec,
    PilotCheckpointSaver,
    PilotRemoteRunnable,
    aclose_default_transport,
)
from pilot_langgraph import errors as e
from pilot_langgraph.testing import LocalCluster

HANDLERS = Path(__file__).with_name("_langgraph_faithful.py")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lg_faithful_local", HANDLERS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


F = _load()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("lg-faithful")
    with LocalCluster(root / "keys") as c:
        c.add_worker("worker-a", handlers=[str(HANDLERS)])
        c.add_worker(
            "state-worker",
            plugins=["checkpoint-sqlite"],
            extra_args=["--checkpoint-db", f"sqlite:///{root / 'checkpoints.db'}"],
        )
        c.start()
        yield c


@pytest.fixture(autouse=True)
async def _close_default_transport() -> AsyncIterator[None]:
    yield
    await aclose_default_transport()


def remote(node: str, **kwargs: Any) -> PilotRemoteRunnable:
    return PilotRemoteRunnable(node=node, peer="worker-a", timeout_secs=30, **kwargs)


async def messages(app: Any, *, subgraphs: bool = False) -> list[tuple[str, str, str]]:
    """(token, graph node, type) of every ``stream_mode="messages"`` item."""
    out: list[tuple[str, str, str]] = []
    async for item in app.astream(
        {"messages": [HumanMessage("hi")]}, stream_mode="messages", subgraphs=subgraphs
    ):
        if subgraphs:
            _ns, item = item
        chunk, meta = item
        out.append((str(chunk.content), str(meta["langgraph_node"]), type(chunk).__name__))
    return out


async def test_messages_stream_token_by_token_like_a_local_node(cluster: LocalCluster) -> None:
    local = await messages(F.one_node(F.MsgState, "model", RunnableLambda(F.chat_node)))
    got = await messages(F.one_node(F.MsgState, "model", remote("f_chat")))
    assert len(local) == len(F.TEXT.split(" ")) * 2 - 1  # words and the spaces between
    assert got == local
    assert {t for _, _, t in got} == {"AIMessageChunk"}


async def test_messages_stream_from_a_remote_node_inside_a_subgraph(
    cluster: LocalCluster,
) -> None:
    local = await messages(F.in_subgraph(RunnableLambda(F.chat_node)), subgraphs=True)
    got = await messages(F.in_subgraph(remote("f_chat")), subgraphs=True)
    assert len(local) > 10
    assert got == local


async def test_astream_events_show_the_remote_chat_model(cluster: LocalCluster) -> None:
    async def chat_events(app: Any) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        async for ev in app.astream_events({"messages": [HumanMessage("hi")]}, version="v2"):
            if ev["event"].startswith("on_chat_model_"):
                data = ev["data"]
                value = data.get("chunk") or data.get("output")
                out.append((ev["event"], str(getattr(value, "content", ""))))
        return out

    local = await chat_events(F.one_node(F.MsgState, "model", RunnableLambda(F.chat_node)))
    got = await chat_events(F.one_node(F.MsgState, "model", remote("f_chat")))
    assert got[0] == ("on_chat_model_start", "")
    assert got[-1] == ("on_chat_model_end", F.TEXT)
    assert got == local


async def test_runnable_config_reaches_get_config_and_ctx_config(cluster: LocalCluster) -> None:
    config: Any = {
        "tags": ["blue-team"],
        "metadata": {"team": "blue", "not_sendable": object()},
        "configurable": {"user_id": "u-42", "lock": object()},
        "recursion_limit": 17,
    }
    local = await F.one_node(F.LogState, "cfg", RunnableLambda(F.config_node)).ainvoke(
        {"log": []}, config
    )
    got = await F.one_node(F.LogState, "cfg", remote("f_config")).ainvoke({"log": []}, config)
    (seen,) = got["log"]
    assert seen.pop("ctx_user_id") == "u-42"
    assert seen.pop("ctx_run_name") == "Pilot:f_config"
    assert seen == local["log"][0]
    assert seen["user_id"] == "u-42"
    assert seen["team"] == "blue"
    assert "blue-team" in seen["tags"]


async def test_unary_progress_and_stream_writer_feed_custom(cluster: LocalCluster) -> None:
    app = F.one_node(F.LogState, "work", remote("f_progress"))
    custom = [c async for c in app.astream({"log": []}, stream_mode="custom")]
    progress = [c for c in custom if isinstance(c, dict) and "progress" in c]
    assert progress == [{"progress": {"pct": p}, "handler": "f_progress"} for p in (25, 50, 75)]
    assert {"custom": "written"} in custom


async def _client(cluster: LocalCluster, thread: str, action: str) -> dict[str, Any]:
    """Run one graph step in a separate client process (same client identity)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HANDLERS),
        "interrupt-client",
        thread,
        action,
        env={**os.environ, **cluster.client_env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(120):
            stdout, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    return json.loads(stdout.decode().strip().splitlines()[-1])


async def test_interrupt_in_a_handler_resumed_from_other_processes(
    cluster: LocalCluster,
) -> None:
    from langgraph.types import Command, _interrupt_id  # pyright: ignore[reportPrivateUsage]

    thread = f"ask-{uuid.uuid4().hex[:8]}"
    first = await _client(cluster, thread, "start")  # process 1: pauses at the first question
    assert [v for v, _ in first["interrupts"]] == ["first?"]

    saver = PilotCheckpointSaver(peer="state-worker")
    try:
        app = F.one_node(F.LogState, "ask", remote("f_ask"), checkpointer=saver)
        config: Any = {"configurable": {"thread_id": thread}}
        snapshot = await app.aget_state(config)
        (task,) = snapshot.tasks
        ns = f"{task.name}:{task.id}"
        # The id is LangGraph's own for the task's first interrupt.
        assert first["interrupts"][0][1] == _interrupt_id(ns, 0)
        out = await app.ainvoke(Command(resume="A"), config)  # this process: answers it
        (second,) = out["__interrupt__"]
        assert second.value == {"q": "second?"}
        assert second.id == _interrupt_id(ns, 1)
    finally:
        saver.close()

    last = await _client(cluster, thread, "B")  # process 2: answers the second question
    assert last["log"] == ["A", "B"]
    assert last["interrupts"] == []


async def test_forged_invalid_model_is_invalid_argument_with_locations(
    cluster: LocalCluster,
) -> None:
    import ormsgpack
    from pilot_langgraph import _runtime
    from pilot_rpc import InvalidArgument

    # A LangChain Document as a hostile peer could send it: wrong types in both fields.
    fields = {"page_content": 123, "metadata": "DROP TABLE"}
    blob = ormsgpack.packb(
        ormsgpack.Ext(
            5,
            ormsgpack.packb(
                ("langchain_core.documents.base", "Document", fields, "model_validate_json")
            ),
        )
    )
    client = await _runtime.get_client(None)
    with pytest.raises(InvalidArgument) as info:
        await client.call("worker-a", 5000, "f_chat", {"$lg": ["msgpack", blob]}, timeout=30)
    details = info.value.details
    assert details["reason"] == "invalid_argument"
    assert details["model"] == "langchain_core.documents.base.Document"
    assert sorted(err["loc"] for err in details["errors"]) == [["metadata"], ["page_content"]]
    # Through PilotRemoteRunnable the same refusal is a typed error.
    with pytest.raises(e.RemoteInvalidArgumentError):
        await remote("f_chat", codec=_Forging(blob)).ainvoke({"messages": []})


class _Forging(LangGraphCodec):
    """A caller codec that sends a prepared blob instead of the input."""

    def __init__(self, blob: bytes) -> None:
        super().__init__()
        self._blob = blob

    def encode(self, value: Any, *, root: str = "value") -> dict[str, list[Any]]:
        if root == "input":
            return {"$lg": ["msgpack", self._blob]}
        return super().encode(value, root=root)


async def test_streamed_ai_message_chunks_feed_add_messages(cluster: LocalCluster) -> None:
    def as_update(message: Any) -> dict[str, Any]:
        return {"messages": [message]}

    node = remote("f_stream_chunks", streaming=True) | RunnableLambda(as_update)
    out = await F.one_node(F.MsgState, "model", node).ainvoke({"messages": [HumanMessage("hi")]})
    # The streamed AIMessageChunks arrive as chunks (before the fix: dicts, and
    # add_messages raised "Unexpected message type"); their sum goes through
    # add_messages, which turns a chunk into its message, as it does locally.
    last = out["messages"][-1]
    assert type(last) is AIMessage
    assert last.content == F.TEXT

    seen: list[Any] = []
    async for chunk in remote("f_stream_chunks", streaming=True).astream(
        {"messages": [HumanMessage("hi")]}
    ):
        seen.append(chunk)
    assert seen
    assert all(type(c) is AIMessageChunk for c in seen)
    assert "".join(str(c.content) for c in seen) == F.TEXT


async def test_a_streaming_handler_with_an_output_model_forwards_events_and_writes(
    cluster: LocalCluster,
) -> None:
    """Control messages pass a streaming handler's ``output_model``; its own items do not."""

    def as_update(message: Any) -> dict[str, Any]:
        return {"messages": [message]}

    async def observed(node: Any) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        app = F.one_node(F.MsgState, "model", node | RunnableLambda(as_update))
        async for mode, item in app.astream(
            {"messages": [HumanMessage("hi")]}, stream_mode=["custom", "messages"]
        ):
            if mode == "custom":
                if isinstance(item, dict):  # the handler's own write (chunks are written too)
                    out.append(("custom", json.dumps(item, sort_keys=True)))
            else:
                chunk, _meta = item
                out.append((type(chunk).__name__, str(chunk.content)))
        return out

    local = await observed(RunnableLambda(F.checked_chunks))
    got = await observed(remote("f_stream_checked", streaming=True))
    tokens = [text for kind, text in got if kind == "AIMessageChunk"]
    assert "".join(tokens) == F.TEXT
    assert len(tokens) == len(F.TEXT.split(" ")) * 2 - 1  # token by token, as locally
    assert got[0] == ("custom", json.dumps({"custom": "before the model"}))
    assert got == local, (got, local)

    with pytest.raises(e.RemoteInternalError) as info:
        async for _ in remote("f_stream_checked_bad", streaming=True).astream(
            {"messages": [HumanMessage("hi")]}
        ):
            pass
    assert info.value.details["reason"] == "invalid_output"


async def test_astream_events_v3_shows_the_remote_chat_model_events(
    cluster: LocalCluster,
) -> None:
    """``astream_events(version="v3")``: the remote model's content-block events, as locally."""
    import warnings

    async def v3_messages(app: Any) -> list[tuple[str, str, str]]:
        out: list[tuple[str, str, str]] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the v3 protocol is marked experimental
            run = await app.astream_events({"messages": [HumanMessage("hi")]}, version="v3")
        async for ev in run:
            if ev.get("method") != "messages":
                continue
            event, meta = ev["params"]["data"]
            delta = event.get("delta") or {}
            out.append((str(event["event"]), str(delta.get("text", "")), meta["langgraph_node"]))
        return out

    local = await v3_messages(F.one_node(F.MsgState, "model", RunnableLambda(F.chat_node)))
    got = await v3_messages(F.one_node(F.MsgState, "model", remote("f_chat")))
    assert got[0][0] == "message-start"
    assert got[-1][0] == "message-finish"
    deltas = [text for kind, text, _ in got if kind == "content-block-delta"]
    assert "".join(deltas) == F.TEXT
    assert len(deltas) == len(F.TEXT.split(" ")) * 2 - 1
    assert got == local


async def test_a_streaming_handler_with_an_output_model_is_faithful_item_by_item(
    cluster: LocalCluster,
) -> None:
    """Tokens of a model inside, stream writes and progress, as a local node shows them.

    The handler declares ``output_model=AIMessageChunk``: every chunk it yields is
    still validated, while the control messages between them (callback events,
    custom writes, progress) reach the caller's ``messages`` and ``custom`` streams.
    """

    def as_update(message: Any) -> dict[str, Any]:
        return {"messages": [message]}

    async def observed(node: Any) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        app = F.one_node(F.MsgState, "model", node | RunnableLambda(as_update))
        async for mode, item in app.astream(
            {"messages": [HumanMessage("hi")]}, stream_mode=["custom", "messages"]
        ):
            if mode == "custom":
                if isinstance(item, dict):  # the handler's own writes (chunks are written too)
                    out.append(("custom", json.dumps(item, sort_keys=True)))
            else:
                chunk, meta = item
                out.append((type(chunk).__name__, f"{meta['langgraph_node']}:{chunk.content}"))
        return out

    async def local_node(state: dict[str, Any]) -> AsyncIterator[Any]:
        from langgraph.config import get_stream_writer

        write = get_stream_writer()

        async def progress(value: Any) -> None:  # what the caller makes of report_progress
            write({"progress": value, "handler": "f_stream_checked_full"})

        async for chunk in F.checked_full(state, progress):
            yield chunk

    local = await observed(RunnableLambda(local_node))
    got = await observed(remote("f_stream_checked_full", streaming=True))
    assert got == local, (got, local)
    tokens = [text for kind, text in got if kind == "AIMessageChunk"]
    # the model inside the handler (ainvoke) and the streamed one, token by token
    assert len(tokens) == 2 * (len(F.TEXT.split(" ")) * 2 - 1)
    customs = [text for kind, text in got if kind == "custom"]
    assert customs == [
        json.dumps(v, sort_keys=True)
        for v in (
            {"custom": "before the model"},
            {"handler": "f_stream_checked_full", "progress": {"pct": 10}},
            {"summary": F.TEXT[:6]},
            {"handler": "f_stream_checked_full", "progress": {"pct": 100}},
            {"custom": "after the model"},
        )
    ]


async def _drain(items: Any, into: list[Any]) -> None:
    async for item in items:
        into.append(item)


async def test_a_handlers_own_control_message_is_never_sent_as_one(cluster: LocalCluster) -> None:
    """Only the worker middleware sends control messages: a handler's own fails the call."""
    seen: list[Any] = []
    app = F.one_node(F.MsgState, "model", remote("f_stream_forged_checked", streaming=True))
    stream = app.astream({"messages": [HumanMessage("hi")]}, stream_mode=["custom", "updates"])
    with pytest.raises(e.RemoteInternalError) as info:
        await _drain(stream, seen)
    # refused as output (it would have skipped output_model), not delivered as a write
    assert info.value.details["reason"] == "invalid_output", str(info.value)
    assert "ControlMessage" in str(info.value)
    assert not [item for mode, item in seen if mode == "custom" and isinstance(item, dict)]

    items: list[Any] = []
    with pytest.raises(e.RemoteInternalError) as info:
        await _drain(remote("f_stream_forged", streaming=True).astream({}), items)
    # without an output_model too: no fake interrupt reaches the caller
    assert info.value.details["reason"] == "invalid_output", str(info.value)
    assert items == [{"first": "item"}]
