"""PilotRemoteRunnable against real in-process workers on a memory:// hub."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage
from pilot_langgraph import PilotEchoRunnable, PilotRemoteRunnable, PilotUsageError
from pilot_langgraph import errors as e
from pilot_langgraph._builtin_handlers import echo
from pilot_worker import pilot_handler
from pydantic import BaseModel


class Question(BaseModel):
    text: str
    top_k: int = 3


@pilot_handler("answer", timeout_secs=5)
async def answer(state: dict[str, Any]) -> dict[str, Any]:
    last = state["messages"][-1]
    assert isinstance(last, HumanMessage)
    return {"messages": [AIMessage(f"re: {last.content}")]}


@pilot_handler("boom")
async def boom(_: Any) -> Any:
    raise KeyError("missing")


@pilot_handler("ask", input_model=Question)
async def ask(q: Question) -> dict[str, Any]:
    return {"text": q.text, "top_k": q.top_k}


@pilot_handler("private", allow=["nobody"])
async def private(_: Any) -> str:
    return "secret"


@pilot_handler("count")
async def count(n: int) -> Any:
    for i in range(n):
        yield {"i": i}


async def test_messages_survive_the_round_trip(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [answer, echo])
    node = PilotRemoteRunnable(node="answer", peer="worker-a", transport=cluster.client)
    out = await node.ainvoke({"messages": [HumanMessage("hello")]})
    assert out == {"messages": [AIMessage("re: hello")]}
    assert type(out["messages"][0]) is AIMessage
    echoed = await PilotEchoRunnable(peer="worker-a", transport=cluster.client).ainvoke(
        {"m": HumanMessage("x"), "n": 1}
    )
    assert echoed == {"m": HumanMessage("x"), "n": 1}


async def test_callbacks_fire_with_run_name_tags_and_metadata(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [answer, boom])
    seen: list[tuple[str, Any]] = []

    class Recorder(AsyncCallbackHandler):
        async def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
            seen.append(("start", (kw.get("name"), kw.get("tags"), kw.get("metadata"))))

        async def on_chain_end(self, outputs: Any, **kw: Any) -> None:
            seen.append(("end", outputs))

        async def on_chain_error(self, error: BaseException, **kw: Any) -> None:
            seen.append(("error", type(error).__name__))

    node = PilotRemoteRunnable(node="answer", peer="worker-a", transport=cluster.client)
    config: Any = {
        "callbacks": [Recorder()],
        "tags": ["t1"],
        "metadata": {"m": 1},
        "run_name": "remote-answer",
    }
    await node.ainvoke({"messages": [HumanMessage("hi")]}, config)
    assert seen[0] == ("start", ("remote-answer", ["t1"], {"m": 1}))
    assert seen[1][0] == "end"
    seen.clear()
    with pytest.raises(e.RemoteInternalError):
        await PilotRemoteRunnable(node="boom", peer="worker-a", transport=cluster.client).ainvoke(
            1, {"callbacks": [Recorder()]}
        )
    assert seen[-1] == ("error", "RemoteInternalError")


async def test_error_mapping(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [boom, ask, private])
    t = cluster.client

    with pytest.raises(e.RemoteUnimplementedError) as nf:
        await PilotRemoteRunnable(node="nope", peer="worker-a", transport=t).ainvoke(1)
    assert nf.value.peer == "worker-a"
    assert nf.value.node == "nope"

    with pytest.raises(e.RemoteInternalError) as internal:
        await PilotRemoteRunnable(node="boom", peer="worker-a", transport=t).ainvoke(1)
    assert internal.value.remote_type == "KeyError"

    with pytest.raises(e.RemotePermissionDeniedError):
        await PilotRemoteRunnable(node="private", peer="worker-a", transport=t).ainvoke(1)

    # worker-side validation
    with pytest.raises(e.RemoteInvalidArgumentError) as bad:
        await PilotRemoteRunnable(node="ask", peer="worker-a", transport=t).ainvoke({"x": 1})
    assert bad.value.peer == "worker-a"
    # caller-side validation: never leaves the process
    with pytest.raises(e.RemoteInvalidArgumentError) as local:
        await PilotRemoteRunnable(
            node="ask", peer="worker-a", transport=t, input_model=Question
        ).ainvoke({"x": 1})
    assert local.value.peer is None
    ok = await PilotRemoteRunnable(
        node="ask", peer="worker-a", transport=t, input_model=Question
    ).ainvoke(Question(text="q"))
    assert ok == {"text": "q", "top_k": 3}

    with pytest.raises(e.RemoteUnavailableError):
        await PilotRemoteRunnable(
            node="boom", peer="worker-b", transport=t, max_retries=1, retry_backoff_secs=0.01
        ).ainvoke(1)


async def test_unsendable_input_names_its_path(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [echo])
    node = PilotEchoRunnable(peer="worker-a", transport=cluster.client)
    with pytest.raises(e.PilotEncodeError) as info:
        await node.ainvoke({"docs": [{"meta": object()}]})
    assert info.value.path == "input['docs'][0]['meta']"


async def test_output_model(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [ask])
    node = PilotRemoteRunnable(
        node="ask", peer="worker-a", transport=cluster.client, output_model=Question
    )
    assert await node.ainvoke({"text": "a"}) == Question(text="a", top_k=3)


async def test_failover_spreads_and_skips_an_unavailable_peer(cluster: Any) -> None:
    seen: list[str] = []

    @pilot_handler("whoami")
    async def whoami_a(_: Any) -> str:
        seen.append("a")
        return "a"

    await cluster.start_worker("worker-a", [whoami_a])
    # worker-b is in the trust store but not serving: every call must still succeed
    node = PilotRemoteRunnable(
        node="whoami", peer=["worker-b", "worker-a"], transport=cluster.client
    )
    results = [await node.ainvoke(None) for _ in range(4)]
    assert results == ["a"] * 4


async def test_streaming_astream_and_ainvoke(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [count])
    node = PilotRemoteRunnable(
        node="count", peer="worker-a", transport=cluster.client, streaming=True
    )
    chunks = [c async for c in node.astream(3)]
    assert chunks == [{"i": 0}, {"i": 1}, {"i": 2}]
    # dicts are not addable: ainvoke returns the last chunk, like LangChain does
    assert await node.ainvoke(3) == {"i": 2}


async def test_cancellation_reaches_the_handler(cluster: Any) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @pilot_handler("slow", timeout_secs=30)
    async def slow(_: Any) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    await cluster.start_worker("worker-a", [slow])
    node = PilotRemoteRunnable(node="slow", peer="worker-a", transport=cluster.client)
    task = asyncio.create_task(node.ainvoke(None))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(cancelled.wait(), 10)


def test_options_are_validated() -> None:
    with pytest.raises(PilotUsageError):
        PilotRemoteRunnable(node="", peer="a")
    with pytest.raises(PilotUsageError):
        PilotRemoteRunnable(node="n", peer=[])
    with pytest.raises(PilotUsageError):
        PilotRemoteRunnable(node="n", peer=["a", "a"])
    with pytest.raises(PilotUsageError):
        PilotRemoteRunnable(node="n", peer="a", port=0)
    with pytest.raises(PilotUsageError):
        PilotRemoteRunnable(node="n", peer="a", timeout_secs=0)
    with pytest.raises(PilotUsageError):
        PilotRemoteRunnable(node="n", peer="a", max_retries=-1)


def test_schemas_come_from_the_models() -> None:
    node = PilotRemoteRunnable(node="ask", peer="a", input_model=Question, output_model=Question)
    assert node.get_input_schema() is Question
    assert node.get_output_schema() is Question
    plain = PilotRemoteRunnable(node="ask", peer="a")
    assert plain.get_input_schema().model_json_schema()["title"]


def test_max_attempts_is_the_total_count_of_attempts() -> None:
    assert PilotRemoteRunnable(node="n", peer="p").max_attempts == 3
    runnable = PilotRemoteRunnable(node="n", peer="p", max_attempts=1)
    assert runnable.max_attempts == 1
    assert runnable.options.max_retries == 0
    assert runnable._attempt_plan() == ["p"]
    assert PilotRemoteRunnable(node="n", peer=["p", "q"], max_attempts=4).max_attempts == 4
    with pytest.raises(PilotUsageError, match="not both"):
        PilotRemoteRunnable(node="n", peer="p", max_attempts=2, max_retries=1)
    with pytest.raises(PilotUsageError, match="max_attempts"):
        PilotRemoteRunnable(node="n", peer="p", max_attempts=0)
