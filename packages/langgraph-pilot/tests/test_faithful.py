"""Remote nodes behave like local ones: callbacks, config, custom stream, interrupts.

Workers here run in-process on a memory:// hub with :class:`LangGraphMiddleware`
installed (as ``pilot-langgraph-worker`` does); the real-process versions of
these checks live in ``integration-tests/tests/test_langgraph_remote.py``.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypedDict

import ormsgpack
import pytest
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import RunnableLambda
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.config import get_config, get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, interrupt
from pilot_langgraph import LangGraphCodec, PilotRemoteRunnable
from pilot_langgraph._codec import ENVELOPE_KEY
from pilot_worker import Context, pilot_handler
from pydantic import BaseModel

TEXT = "the quick brown fox jumps over the lazy dog"


class MsgState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


class LogState(TypedDict, total=False):
    log: Annotated[list[Any], operator.add]


def _model() -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content=TEXT)]))


async def chat_node(state: dict[str, Any]) -> dict[str, Any]:
    reply = await _model().ainvoke(state["messages"])
    return {"messages": [reply]}


@pilot_handler("chat")
async def chat(state: dict[str, Any]) -> dict[str, Any]:
    return await chat_node(state)


@pilot_handler("config_echo")
async def config_echo(_: Any, ctx: Context) -> dict[str, Any]:
    config = get_config()
    return {
        "log": [
            {
                "tags": list(config.get("tags") or []),
                "user": (config.get("configurable") or {}).get("user_id"),
                "meta": (config.get("metadata") or {}).get("team"),
                "node": (config.get("metadata") or {}).get("langgraph_node"),
                "ctx_user": ctx.config["configurable"].get("user_id"),
                "ctx_run_name": ctx.config.get("run_name"),
                "has_run_id": ctx.config.get("run_id") is not None,
                "recursion_limit": config.get("recursion_limit"),
            }
        ]
    }


@pilot_handler("writer")
async def writer(_: Any, ctx: Context) -> dict[str, Any]:
    write = get_stream_writer()
    write({"step": 1})
    await ctx.report_progress({"pct": 50})
    write({"step": 2})
    return {"log": ["done"]}


@pilot_handler("sync_writer")
def sync_writer(_: Any) -> dict[str, Any]:
    write = get_stream_writer()
    for i in range(3):
        write({"sync": i})
    return {"log": [get_config()["metadata"].get("langgraph_node")]}


@pilot_handler("ask_twice")
async def ask_twice(_: Any) -> dict[str, Any]:
    first = interrupt("first?")
    second = interrupt({"q": "second?"})
    return {"log": [first, second]}


@pilot_handler("stream_tokens")
async def stream_tokens(state: dict[str, Any]) -> AsyncIterator[Any]:
    async for chunk in _model().astream(state["messages"]):
        yield chunk.content


def _msg_graph(node: Any) -> Any:
    graph = StateGraph(MsgState)
    graph.add_node("model", node)
    graph.add_edge(START, "model")
    graph.add_edge("model", END)
    return graph.compile()


async def _messages(app: Any, **kwargs: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    async for item in app.astream(
        {"messages": [HumanMessage("hi")]}, stream_mode="messages", **kwargs
    ):
        if kwargs.get("subgraphs"):
            _ns, item = item
        chunk, meta = item
        out.append((str(chunk.content), str(meta.get("langgraph_node"))))
    return out


async def test_messages_stream_has_the_same_tokens_as_a_local_node(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [chat])
    remote = PilotRemoteRunnable(node="chat", peer="worker-a", transport=cluster.client)
    local = await _messages(_msg_graph(RunnableLambda(chat_node)))
    got = await _messages(_msg_graph(remote))
    assert len(local) > 5
    assert got == local


async def test_messages_from_a_remote_node_inside_a_subgraph(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [chat])
    remote = PilotRemoteRunnable(node="chat", peer="worker-a", transport=cluster.client)

    def parent(node: Any) -> Any:
        graph = StateGraph(MsgState)
        graph.add_node("inner", _msg_graph(node))
        graph.add_edge(START, "inner")
        graph.add_edge("inner", END)
        return graph.compile()

    local = await _messages(parent(RunnableLambda(chat_node)), subgraphs=True)
    got = await _messages(parent(remote), subgraphs=True)
    assert len(local) > 5
    assert got == local


async def test_astream_events_show_the_remote_chat_model(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [chat])
    remote = PilotRemoteRunnable(node="chat", peer="worker-a", transport=cluster.client)

    async def events(app: Any) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        async for ev in app.astream_events({"messages": [HumanMessage("hi")]}, version="v2"):
            if ev["event"].startswith("on_chat_model"):
                chunk = ev["data"].get("chunk")
                out.append((ev["event"], str(chunk.content) if chunk is not None else ""))
        return out

    local = await events(_msg_graph(RunnableLambda(chat_node)))
    got = await events(_msg_graph(remote))
    assert got[0][0] == "on_chat_model_start"
    assert got[-1][0] == "on_chat_model_end"
    assert got == local


async def test_remote_runs_are_parented_under_the_node_run(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [chat])
    remote = PilotRemoteRunnable(node="chat", peer="worker-a", transport=cluster.client)
    seen: list[tuple[str, Any, Any]] = []

    class Recorder(AsyncCallbackHandler):
        async def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
            seen.append((f"chain:{kw.get('name')}", kw["run_id"], kw.get("parent_run_id")))

        async def on_chat_model_start(self, serialized: Any, messages: Any, **kw: Any) -> None:
            seen.append(("chat_model", kw["run_id"], kw.get("parent_run_id")))

    await remote.ainvoke({"messages": [HumanMessage("hi")]}, {"callbacks": [Recorder()]})
    (pilot_run,) = [r for r in seen if r[0] == "chain:Pilot:chat"]
    (model_run,) = [r for r in seen if r[0] == "chat_model"]
    assert model_run[2] == pilot_run[1]


async def test_config_reaches_get_config_and_ctx_config(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="pilot_langgraph.remote")
    await cluster.start_worker("worker-a", [config_echo])
    remote = PilotRemoteRunnable(node="config_echo", peer="worker-a", transport=cluster.client)
    graph = StateGraph(LogState)
    graph.add_node("echo", remote)
    graph.add_edge(START, "echo")
    graph.add_edge("echo", END)
    out = await graph.compile().ainvoke(
        {"log": []},
        {
            "tags": ["t1"],
            "metadata": {"team": "blue", "unsendable": object()},
            "configurable": {"user_id": "u-7", "lock": object()},
            "recursion_limit": 42,
        },
    )
    (seen,) = out["log"]
    assert "t1" in seen["tags"]
    assert seen["user"] == "u-7"
    assert seen["ctx_user"] == "u-7"
    assert seen["meta"] == "blue"
    assert seen["node"] == "echo"
    assert seen["ctx_run_name"] == "Pilot:config_echo"
    assert seen["recursion_limit"] == 42
    dropped = [r.getMessage() for r in caplog.records if "cannot be encoded" in r.getMessage()]
    assert any("'metadata'" in m and "'unsendable'" in m for m in dropped), dropped
    assert any("'configurable'" in m and "'lock'" in m for m in dropped), dropped


async def test_stream_writer_and_unary_progress_feed_custom(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [writer, sync_writer])
    t = cluster.client
    graph = StateGraph(LogState)
    graph.add_node("w", PilotRemoteRunnable(node="writer", peer="worker-a", transport=t))
    graph.add_node("s", PilotRemoteRunnable(node="sync_writer", peer="worker-a", transport=t))
    graph.add_edge(START, "w")
    graph.add_edge("w", "s")
    graph.add_edge("s", END)
    custom = [c async for c in graph.compile().astream({"log": []}, stream_mode="custom")]
    assert {"step": 1} in custom
    assert {"step": 2} in custom
    assert custom.index({"step": 1}) < custom.index({"step": 2})
    assert {"progress": {"pct": 50}, "handler": "writer"} in custom
    assert custom[-3:] == [{"sync": 0}, {"sync": 1}, {"sync": 2}]


async def test_interrupts_in_a_handler_resolve_in_order(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [ask_twice])
    remote = PilotRemoteRunnable(node="ask_twice", peer="worker-a", transport=cluster.client)

    async def ask_twice_local(_: Any) -> dict[str, Any]:
        first = interrupt("first?")
        second = interrupt({"q": "second?"})
        return {"log": [first, second]}

    async def run(node: Any) -> list[Any]:
        graph = StateGraph(LogState)
        graph.add_node("ask", node)
        graph.add_edge(START, "ask")
        graph.add_edge("ask", END)
        app = graph.compile(checkpointer=InMemorySaver())
        cfg: Any = {"configurable": {"thread_id": str(uuid.uuid4())}}
        trace: list[Any] = []
        out = await app.ainvoke({"log": []}, cfg)
        trace.append([(i.value, i.id) for i in out["__interrupt__"]])
        out = await app.ainvoke(Command(resume="A"), cfg)
        trace.append([(i.value, i.id) for i in out["__interrupt__"]])
        out = await app.ainvoke(Command(resume="B"), cfg)
        trace.append(out["log"])
        return trace

    local = await run(RunnableLambda(ask_twice_local))
    got = await run(remote)
    assert got[2] == ["A", "B"]
    assert [v for v, _ in got[0]] == ["first?"]
    assert [v for v, _ in got[1]] == [{"q": "second?"}]
    # Same ids as the same node run locally would give (they are derived from the
    # task's namespace, which differs per run, so compare their structure).
    assert got[0][0][1] != got[1][0][1]
    assert local[2] == got[2]


async def test_streaming_handler_tokens_reach_custom_and_messages(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [stream_tokens])
    remote = PilotRemoteRunnable(
        node="stream_tokens", peer="worker-a", transport=cluster.client, streaming=True
    )
    seen: list[str] = []

    class Tokens(AsyncCallbackHandler):
        async def on_llm_new_token(self, token: str, **kw: Any) -> None:
            seen.append(token)

    chunks = [c async for c in remote.astream({"messages": []}, {"callbacks": [Tokens()]})]
    assert "".join(chunks) == TEXT
    assert "".join(seen) == TEXT


class Query(BaseModel):
    q: str
    limit: int = 10


@pilot_handler("query")
async def query(payload: Query) -> dict[str, Any]:
    return {"q": payload.q, "limit": payload.limit, "type": type(payload).__name__}


def _forged_query(fields: dict[str, Any]) -> dict[str, Any]:
    """A request claiming to be a Query with ``fields`` (what a hostile peer can send)."""
    blob = ormsgpack.packb(
        ormsgpack.Ext(5, ormsgpack.packb((__name__, "Query", fields, "model_validate_json")))
    )
    return {ENVELOPE_KEY: ["msgpack", blob]}


@pytest.mark.parametrize(
    ("fields", "loc"),
    [({"q": 123, "limit": 5}, ["q"]), ({"q": "x", "limit": "DROP TABLE"}, ["limit"])],
)
async def test_invalid_model_fields_are_invalid_argument_with_locations(
    cluster: Any, fields: dict[str, Any], loc: list[str]
) -> None:
    from pilot_langgraph import _runtime
    from pilot_rpc import InvalidArgument

    await cluster.start_worker("worker-a", [query])
    client = await _runtime.get_client(cluster.client)
    with pytest.raises(InvalidArgument) as info:
        await client.call("worker-a", 5000, "query", _forged_query(fields), timeout=10)
    details = info.value.details
    assert details["reason"] == "invalid_argument"
    assert details["model"] == f"{__name__}.Query"
    assert [e["loc"] for e in details["errors"]] == [loc]
    ok = await client.call(
        "worker-a", 5000, "query", _forged_query({"q": "fine", "limit": 3}), timeout=10
    )
    assert LangGraphCodec().decode(ok) == {"q": "fine", "limit": 3, "type": "Query"}


@pilot_handler("chat_sync")
def chat_sync(state: dict[str, Any]) -> dict[str, Any]:
    """A sync handler (pool thread) calling a sync chat model."""
    return {"messages": [_model().invoke(state["messages"])]}


async def test_sync_handler_model_tokens_are_forwarded(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [chat_sync])
    remote = PilotRemoteRunnable(node="chat_sync", peer="worker-a", transport=cluster.client)
    local = await _messages(_msg_graph(RunnableLambda(chat_node)))
    got = await _messages(_msg_graph(remote))
    assert got == local


MANY = 2000
produced: list[int] = []


@pilot_handler("many_events")
async def many_events(_: Any) -> int:
    from langchain_core.callbacks.manager import adispatch_custom_event

    for i in range(MANY):
        await adispatch_custom_event("tick", {"i": i, "pad": "x" * 1000})
        produced.append(i)
    return MANY


async def test_a_slow_caller_holds_the_handler_back(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events are flow-controlled: a stuck callback handler stops the producer."""
    import asyncio

    from pilot_langgraph import _served

    blocked = asyncio.Event()
    original_put = _served._Outbox.put  # pyright: ignore[reportPrivateUsage]

    async def put(self: Any, item: Any) -> None:
        if self._items and len(self._items) >= self._size:
            blocked.set()  # the producer is about to wait for room
        await original_put(self, item)

    monkeypatch.setattr(_served._Outbox, "put", put)  # pyright: ignore[reportPrivateUsage]
    await cluster.start_worker("worker-a", [many_events])
    release = asyncio.Event()
    seen: list[int] = []

    class Stuck(AsyncCallbackHandler):
        async def on_custom_event(self, name: str, data: Any, **kw: Any) -> None:
            seen.append(data["i"])
            if len(seen) == 1:
                await release.wait()

    produced.clear()
    remote = PilotRemoteRunnable(node="many_events", peer="worker-a", transport=cluster.client)
    call = asyncio.ensure_future(remote.ainvoke(None, {"callbacks": [Stuck()]}))
    async with asyncio.timeout(30):
        await blocked.wait()

    async def settle() -> None:
        # Everything here (worker, hub, caller) runs on this one event loop:
        # letting it run its ready callbacks many times brings it to rest.
        for _ in range(3000):
            await asyncio.sleep(0)

    await settle()
    plateau = len(produced)
    await settle()
    # The caller took one event and is stuck on it; the handler is held back by its
    # outbox (64) and the RPC window (256 KiB: about 230 of these 1 KB events), far
    # short of the 2000 events it wants to send.
    assert seen == [0]
    assert len(produced) == plateau
    assert plateau < 400
    release.set()
    assert await asyncio.wait_for(call, 60) == MANY
    assert seen == list(range(MANY))


class FloodState(TypedDict, total=False):
    n: int
    log: Annotated[list[Any], operator.add]


@pilot_handler("flood")
async def flood(state: dict[str, Any]) -> dict[str, Any]:
    write = get_stream_writer()
    for i in range(state["n"]):
        write(i)  # never awaits: the writer cannot wait on the event loop
    return {"log": [state["n"]]}


async def test_a_writer_that_never_yields_is_bounded(cluster: Any) -> None:
    from pilot_langgraph import errors as e

    await cluster.start_worker("worker-a", [flood])
    remote = PilotRemoteRunnable(node="flood", peer="worker-a", transport=cluster.client)
    graph = StateGraph(FloodState)
    graph.add_node("flood", remote)
    graph.add_edge(START, "flood")
    graph.add_edge("flood", END)
    app = graph.compile()
    small = [c async for c in app.astream({"n": 100}, stream_mode="custom")]
    assert small == list(range(100))
    with pytest.raises(e.RemoteInternalError) as info:
        await app.ainvoke({"n": 100_000}, stream_mode="custom")
    assert info.value.remote_type == "StreamOverflowError"


@pilot_handler("inner_failure")
async def inner_failure(_: Any) -> str:
    def fail(_: Any) -> Any:
        raise LookupError("no such row")

    try:
        await RunnableLambda(fail, name="lookup").ainvoke(1)
    except LookupError:
        return "recovered"
    return "unreachable"


async def test_error_events_reach_the_caller_as_remote_callback_errors(cluster: Any) -> None:
    from pilot_langgraph import errors as e

    await cluster.start_worker("worker-a", [inner_failure])
    errors: list[BaseException] = []

    class Errors(AsyncCallbackHandler):
        async def on_chain_error(self, error: BaseException, **kw: Any) -> None:
            errors.append(error)

    remote = PilotRemoteRunnable(node="inner_failure", peer="worker-a", transport=cluster.client)
    assert await remote.ainvoke(None, {"callbacks": [Errors()]}) == "recovered"
    (error,) = errors
    assert isinstance(error, e.RemoteCallbackError)
    assert error.remote_type == "LookupError"
    assert "no such row" in str(error)


@pilot_handler("whose_context")
async def whose_context(_: Any) -> dict[str, Any]:
    from langgraph.runtime import get_runtime

    return {"log": [get_runtime().context]}


async def test_the_runtime_context_reaches_the_handler(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [whose_context])
    remote = PilotRemoteRunnable(node="whose_context", peer="worker-a", transport=cluster.client)
    graph = StateGraph(LogState, context_schema=dict)
    graph.add_node("who", remote)
    graph.add_edge(START, "who")
    graph.add_edge("who", END)
    out = await graph.compile().ainvoke({"log": []}, context={"user": "ada"})
    assert out["log"] == [{"user": "ada"}]


@pilot_handler("fails_after_model")
async def fails_after_model(state: dict[str, Any]) -> dict[str, Any]:
    await _model().ainvoke(state["messages"])
    raise ValueError("gave up")


async def test_events_before_a_failure_still_reach_the_caller(cluster: Any) -> None:
    from pilot_langgraph import errors as e

    await cluster.start_worker("worker-a", [fails_after_model])
    ends: list[str] = []

    class Ends(AsyncCallbackHandler):
        async def on_llm_end(self, response: Any, **kw: Any) -> None:
            ends.append(response.generations[0][0].text)

    remote = PilotRemoteRunnable(
        node="fails_after_model", peer="worker-a", transport=cluster.client
    )
    with pytest.raises(e.RemoteInternalError):
        await remote.ainvoke({"messages": [HumanMessage("hi")]}, {"callbacks": [Ends()]})
    assert ends == [TEXT]


@pilot_handler("stream_ask")
async def stream_ask(_: Any) -> AsyncIterator[Any]:
    answer = interrupt("go on?")
    yield {"log": [answer]}


async def test_interrupt_in_a_streaming_handler(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [stream_ask])
    remote = PilotRemoteRunnable(
        node="stream_ask", peer="worker-a", transport=cluster.client, streaming=True
    )
    graph = StateGraph(LogState)
    graph.add_node("ask", remote)
    graph.add_edge(START, "ask")
    graph.add_edge("ask", END)
    app = graph.compile(checkpointer=InMemorySaver())
    cfg: Any = {"configurable": {"thread_id": str(uuid.uuid4())}}
    out = await app.ainvoke({"log": []}, cfg)
    assert [i.value for i in out["__interrupt__"]] == ["go on?"]
    out = await app.ainvoke(Command(resume="yes"), cfg)
    assert out["log"] == ["yes"]


@pytest.mark.parametrize("header", ["not base64!", "AAAA", "kQE="])
async def test_a_malformed_config_header_is_invalid_argument(cluster: Any, header: str) -> None:
    from pilot_langgraph import _runtime
    from pilot_rpc import InvalidArgument

    await cluster.start_worker("worker-a", [config_echo])
    client = await _runtime.get_client(cluster.client)
    with pytest.raises(InvalidArgument) as info:
        await client.call(
            "worker-a",
            5000,
            "config_echo",
            LangGraphCodec().encode({}),
            metadata={"langgraph-config": header},
            timeout=10,
        )
    assert info.value.details["header"] == "langgraph-config"


@pilot_handler("config_mutator")
async def config_mutator(_: Any, ctx: Context) -> dict[str, Any]:
    config = get_config()
    seen = {
        "tags": list(config.get("tags") or []),
        "metadata": dict(config.get("metadata") or {}),
        "ctx_configurable": dict(ctx.config["configurable"]),
        "run_name": ctx.config.get("run_name"),
    }
    # A handler scribbling on its config must not leak into the next call.
    config["tags"].append("scribbled")
    config["metadata"]["scribbled"] = True
    ctx.config["configurable"]["scribbled"] = True
    return seen


async def test_repeated_plain_calls_each_get_a_fresh_config(cluster: Any) -> None:
    """Calls outside a graph send the same header every time; each still gets its own config."""
    await cluster.start_worker("worker-a", [config_mutator])
    remote = PilotRemoteRunnable(node="config_mutator", peer="worker-a", transport=cluster.client)
    first = await remote.ainvoke(None)
    for _ in range(3):
        assert await remote.ainvoke(None) == first
    assert first == {
        "tags": [],
        "metadata": {},
        "ctx_configurable": {},
        "run_name": "Pilot:config_mutator",
    }


class Chunk(BaseModel):
    n: int


@pilot_handler("checked_progress", output_model=Chunk)
async def checked_progress(_: Any, ctx: Context) -> AsyncIterator[Any]:
    for n in range(3):
        await ctx.report_progress({"at": n})  # no progress frames in a streaming call
        get_stream_writer()({"wrote": n})
        yield Chunk(n=n)


async def test_streaming_progress_and_writes_pass_an_output_model_in_order(
    cluster: Any,
) -> None:
    await cluster.start_worker("worker-a", [checked_progress])
    remote = PilotRemoteRunnable(
        node="checked_progress", peer="worker-a", transport=cluster.client, streaming=True
    )
    graph = StateGraph(LogState)

    async def node(state: dict[str, Any]) -> dict[str, Any]:
        got = [c async for c in remote.astream(None)]
        return {"log": [c.n for c in got]}

    graph.add_node("n", node)
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    seen = [item async for item in graph.compile().astream({"log": []}, stream_mode="custom")]
    expected: list[Any] = []
    for n in range(3):
        expected += [{"progress": {"at": n}, "handler": "checked_progress"}, {"wrote": n}]
        expected.append(Chunk(n=n))  # a remote streaming node writes its chunks there too
    assert seen == expected
    # without a custom stream or callbacks the progress goes nowhere, and nothing fails
    assert [c.n async for c in remote.astream(None)] == [0, 1, 2]
