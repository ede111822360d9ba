"""langgraph-pilot against real worker processes on tcp:// loopback.

One module-scoped cluster (worker-a, worker-b, worker-c, flaky, state-worker),
started with ``pilot_langgraph.testing.LocalCluster``; the test process is the
client identity.
"""

from __future__ import annotations

import asyncio
import operator
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send
from pilot_langgraph import (
    PilotEchoRunnable,
    PilotFanoutRunnable,
    PilotRemoteRunnable,
    aclose_default_transport,
)
from pilot_langgraph import errors as e
from pilot_langgraph.testing import LocalCluster
from pilot_transport import Identity, TrustedPeer, TrustStore

HANDLERS = str(Path(__file__).with_name("_langgraph_handlers.py"))


def _wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory shared by the test and the workers (markers, side-effect journal)."""
    return tmp_path_factory.mktemp("lg-shared")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("lg-cluster")
    with LocalCluster(root / "keys") as c:
        for name in ("worker-a", "worker-b", "worker-c"):
            env = {"LG_WORKER": name, "LG_TEST_DIR": str(shared)}
            c.add_worker(name, handlers=[HANDLERS], env=env)
        c.add_worker(
            "flaky",
            handlers=[HANDLERS],
            env={"LG_WORKER": "flaky", "LG_TEST_DIR": str(shared), "LG_CRASH_AFTER_EFFECT": "1"},
        )
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


class State(TypedDict, total=False):
    query: str
    broad: dict[str, Any]
    deep: dict[str, Any]
    items: list[int]
    squares: Annotated[list[int], operator.add]
    workers: Annotated[list[str], operator.add]
    text: str


async def test_seed_verbatim_with_remote_checkpoints(cluster: LocalCluster) -> None:
    from pilot_langgraph import PilotRemoteRunnable, PilotFanoutRunnable, PilotCheckpointSaver  # noqa: I001

    graph = StateGraph(State)
    graph.add_node("research", PilotFanoutRunnable({
        "broad": PilotRemoteRunnable(node="search", peer="worker-a"),
        "deep":  PilotRemoteRunnable(node="search", peer="worker-b"),
    }))  # fmt: skip
    graph.add_edge(START, "research")
    graph.add_edge("research", END)
    saver = PilotCheckpointSaver(peer="state-worker")
    app = graph.compile(checkpointer=saver)
    try:
        config: Any = {"configurable": {"thread_id": "seed-verbatim"}}
        out = await app.ainvoke({"query": "q"}, config)
        assert out["broad"]["worker"] == "worker-a"
        assert out["broad"]["label"] == "broad"
        assert out["deep"]["worker"] == "worker-b"
        assert out["broad"]["pid"] == cluster.workers["worker-a"].pid
        # the state lives on state-worker: a fresh saver (a new connection) sees it
        other = PilotCheckpointSaver(peer="state-worker")
        try:
            snapshot = await graph.compile(checkpointer=other).aget_state(config)
            assert snapshot.values["deep"]["label"] == "deep"
        finally:
            other.close()
    finally:
        saver.close()


def test_seed_sync_invoke(cluster: LocalCluster) -> None:
    graph = StateGraph(State)
    graph.add_node(
        "research",
        PilotFanoutRunnable(
            {
                "broad": PilotRemoteRunnable(node="search", peer="worker-a"),
                "deep": PilotRemoteRunnable(node="search", peer="worker-b"),
            }
        ),
    )
    graph.add_edge(START, "research")
    graph.add_edge("research", END)
    out = graph.compile().invoke({"query": "sync"})
    assert (out["broad"]["worker"], out["deep"]["worker"]) == ("worker-a", "worker-b")


async def test_messages_and_callbacks(cluster: LocalCluster) -> None:
    events: list[str] = []

    class Recorder(AsyncCallbackHandler):
        async def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
            events.append(f"start:{kw.get('name')}:{','.join(kw.get('tags') or [])}")

        async def on_chain_end(self, outputs: Any, **kw: Any) -> None:
            events.append("end")

        async def on_chain_error(self, error: BaseException, **kw: Any) -> None:
            events.append(f"error:{type(error).__name__}")

    node = PilotRemoteRunnable(node="chat", peer="worker-c")
    config: Any = {"callbacks": [Recorder()], "tags": ["remote"], "run_name": "chat-on-c"}
    out = await node.ainvoke({"messages": [HumanMessage("hello")]}, config)
    assert out == {"messages": [AIMessage("worker-c heard: hello")]}
    assert events == ["start:chat-on-c:remote", "end"]
    events.clear()
    with pytest.raises(e.RemoteInternalError):
        await PilotRemoteRunnable(node="boom", peer="worker-c").ainvoke(1, config)
    assert events == ["start:chat-on-c:remote", "error:RemoteInternalError"]
    echoed = await PilotEchoRunnable(peer="worker-a").ainvoke({"m": [HumanMessage("x")]})
    assert echoed == {"m": [HumanMessage("x")]}


async def test_cancellation_reaches_the_worker(cluster: LocalCluster, shared: Path) -> None:
    node = PilotRemoteRunnable(node="slow", peer="worker-b")
    task = asyncio.create_task(node.ainvoke("cancel-me"))
    await asyncio.to_thread(_wait_for, (shared / "cancel-me.started").exists)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(_wait_for, (shared / "cancel-me.cancelled").exists)
    assert (shared / "cancel-me.cancelled").read_text() == str(cluster.workers["worker-b"].pid)


async def test_failover_with_idempotency_runs_the_side_effect_once(
    cluster: LocalCluster, shared: Path
) -> None:
    # "flaky" performs the effect, then dies before answering; the call fails over
    # to worker-a with the same idempotency key, which finds the effect journaled.
    node = PilotRemoteRunnable(node="charge", peer=["flaky", "worker-a"], retry_backoff_secs=0.05)
    out = await node.ainvoke({"id": "order-1"})
    assert out == {"order": "order-1", "charged_by": "flaky", "replayed": True}
    lines = (shared / "effects.log").read_text().splitlines()
    assert len([ln for ln in lines if ln.startswith("order-1 ")]) == 1
    assert cluster.workers["flaky"].proc.wait(timeout=10) != 0
    # the dead peer is skipped from now on; new orders go to the live one
    out2 = await node.ainvoke({"id": "order-2"})
    assert out2["charged_by"] == "worker-a"


async def test_send_spreads_over_a_pool(cluster: LocalCluster) -> None:
    graph = StateGraph(State)
    graph.add_node(
        "square", PilotRemoteRunnable(node="square", peer=["worker-a", "worker-b", "worker-c"])
    )
    graph.add_conditional_edges(
        START, lambda s: [Send("square", {"n": n}) for n in s["items"]], ["square"]
    )
    graph.add_edge("square", END)
    out = await graph.compile().ainvoke({"items": list(range(9))})
    assert sorted(out["squares"]) == [n * n for n in range(9)]
    assert set(out["workers"]) == {"worker-a", "worker-b", "worker-c"}


async def test_streaming(cluster: LocalCluster) -> None:
    node = PilotRemoteRunnable(node="tokens", peer="worker-a", streaming=True)
    chunks = [c async for c in node.astream("a b c")]
    assert chunks == ["a ", "b ", "c "]
    assert await node.ainvoke("x y") == "x y "  # strings add up
    graph = StateGraph(State)
    graph.add_node("speak", (lambda s: s["text"]) | node | (lambda text: {"text": text}))
    graph.add_edge(START, "speak")
    graph.add_edge("speak", END)
    app = graph.compile()
    seen = [
        (mode, chunk)
        async for mode, chunk in app.astream({"text": "one two"}, stream_mode=["custom", "values"])
    ]
    assert [c for m, c in seen if m == "custom"] == ["one ", "two "]
    assert [c for m, c in seen if m == "values"][-1]["text"] == "one two "


async def test_error_mapping(cluster: LocalCluster, shared: Path) -> None:
    with pytest.raises(e.RemoteUnimplementedError) as info:
        await PilotRemoteRunnable(node="no_such_handler", peer="worker-a").ainvoke(1)
    assert (info.value.peer, info.value.node) == ("worker-a", "no_such_handler")
    with pytest.raises(e.RemoteInternalError) as internal:
        await PilotRemoteRunnable(node="boom", peer="worker-a").ainvoke(1)
    assert internal.value.remote_type == "LookupError"
    with pytest.raises(e.RemotePermissionDeniedError):
        await PilotRemoteRunnable(node="nobody_may_call", peer="worker-a").ainvoke(1)
    with pytest.raises(e.RemoteInvalidArgumentError):
        await PilotRemoteRunnable(node="validated", peer="worker-a").ainvoke({"wrong": 1})
    assert await PilotRemoteRunnable(node="validated", peer="worker-a").ainvoke({"text": "ok"}) == {
        "text": "ok",
        "limit": 2,
    }
    with pytest.raises(e.RemoteDeadlineExceededError) as late:
        await PilotRemoteRunnable(node="too_slow", peer="worker-a").ainvoke(1)
    assert isinstance(late.value, TimeoutError)
    # the caller's own deadline travels too
    with pytest.raises(e.RemoteDeadlineExceededError):
        await PilotRemoteRunnable(node="slow", peer="worker-c", timeout_secs=0.3).ainvoke("t")

    busy = PilotRemoteRunnable(node="single_file", peer="worker-c", max_retries=0)
    first = asyncio.create_task(busy.ainvoke("first"))
    await asyncio.to_thread(_wait_for, (shared / "first.busy").exists)
    with pytest.raises(e.RemoteResourceExhaustedError):
        await busy.ainvoke("second")
    assert await first == "first"

    # a name the trust store does not know is a usage error, reported at once
    with pytest.raises(e.RemoteInvalidArgumentError):
        await PilotRemoteRunnable(node="whoami", peer="no-such-peer").ainvoke(None)
    # a trusted peer that does not answer is unavailable (after the retries)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    TrustStore.open(cluster.trust_path(cluster.client)).add(
        TrustedPeer("ghost", Identity.generate().public_key, endpoint=f"127.0.0.1:{dead_port}"),
        replace=True,
    )
    with pytest.raises(e.RemoteUnavailableError) as down:
        await PilotRemoteRunnable(
            node="whoami", peer="ghost", max_retries=1, retry_backoff_secs=0.01
        ).ainvoke(None)
    assert isinstance(down.value, ConnectionError)
    assert down.value.peer == "ghost"


async def test_adiscover_builds_runnables(cluster: LocalCluster) -> None:
    nodes = await PilotRemoteRunnable.adiscover("worker-a")
    assert {"search", "chat", "tokens", "validated", "lg.echo"} <= set(nodes)
    assert not any(name.startswith("_") for name in nodes)
    assert nodes["tokens"].options.streaming
    assert not nodes["chat"].options.streaming
    assert [c async for c in nodes["tokens"].astream("p q")] == ["p ", "q "]


def test_cli_discover_and_trust(cluster: LocalCluster, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pilot_langgraph._cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **cluster.client_env},
            check=False,
        )

    table = cli("discover", "worker-a")
    assert table.returncode == 0, table.stderr
    assert "worker-a port 5000" in table.stdout
    lines = table.stdout.splitlines()
    assert lines[1].split()[:3] == ["HANDLER", "KIND", "ACL"]
    assert any(ln.startswith("tokens") and "server_streaming" in ln for ln in lines)
    assert any(ln.startswith("nobody_may_call") and "allow 1 node(s)" in ln for ln in lines)
    assert any(ln.startswith("validated") and "Query" in ln for ln in lines)
    as_json = cli("discover", "worker-a", "--json")
    assert as_json.returncode == 0, as_json.stderr
    names = {h["name"] for h in json.loads(as_json.stdout)}
    assert {"search", "_handlers", "_health"} <= names

    a, b = tmp_path / "a", tmp_path / "b"
    paired = cli(
        "trust",
        "--peer",
        f"name=alice,identity={a}.key,trust={a}.json,endpoint=127.0.0.1:7001",
        "--peer",
        f"name=bob,identity={b}.key,trust={b}.json",
    )
    assert paired.returncode == 0, paired.stderr
    assert TrustStore.open(f"{a}.json").get("bob") is not None
    alice = TrustStore.open(f"{b}.json").get("alice")
    assert alice is not None
    assert alice.endpoint == "127.0.0.1:7001"
    bad = cli("trust", "--peer", "name=alice")
    assert bad.returncode == 1
    assert "missing identity, trust" in bad.stderr
