"""A graph with a remote node, a remote checkpoint saver and an event source opens ONE transport.

One real worker process serves a handler, the checkpoint-sqlite plugin and the
channels plugin. The graph waits for an event (``PilotEventSource``), runs a
node remotely (``PilotRemoteRunnable``) and checkpoints every step
(``PilotCheckpointSaver``); every transport this process opens is counted by
wrapping ``pilot_transport.open_transport``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypedDict

import pilot_transport
import pytest
from langgraph.graph import END, START, StateGraph
from pilot_channels import SubscribeOptions, publish_once
from pilot_langgraph import (
    PilotCheckpointSaver,
    PilotEventSource,
    PilotRemoteRunnable,
    aclose_default_transport,
)
from pilot_langgraph.testing import LocalCluster
from pilot_rpc import PilotClient, default_client

HANDLERS = str(Path(__file__).with_name("_langgraph_handlers.py"))
WORKER = "hub"


class State(TypedDict, total=False):
    query: str
    result: dict[str, Any]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("one-transport")
    with LocalCluster(root / "keys") as c:
        c.add_worker(
            WORKER,
            handlers=[HANDLERS],
            plugins=["checkpoint-sqlite", "channels"],
            extra_args=[
                "--checkpoint-db",
                f"sqlite:///{root / 'checkpoints.db'}",
                "--channels-db",
                str(root / "channels.db"),
                "--channels-durable",
                "tasks.>",
            ],
            env={"LG_WORKER": WORKER, "LG_TEST_DIR": str(root)},
        )
        c.start()
        yield c


class Counter:
    """Counts every transport this process opens through pilot_transport.open_transport."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str | None] = []
        self._lock = threading.Lock()
        original = pilot_transport.open_transport

        def counting(url: str | None = None, **kwargs: Any) -> Any:
            with self._lock:
                self.opened.append(url)
            return original(url, **kwargs)

        monkeypatch.setattr(pilot_transport, "open_transport", counting)


def _graph(topic: str) -> Any:
    graph = StateGraph(State)
    events = PilotEventSource(
        topic,
        peer=WORKER,
        payload_only=True,
        options=SubscribeOptions(start="earliest"),
        timeout_secs=60,
    )
    graph.add_node("wait", events | (lambda payload: {"query": payload}))
    graph.add_node(
        "search",
        PilotRemoteRunnable(node="search", peer=WORKER) | (lambda reply: {"result": reply}),
    )
    graph.add_edge(START, "wait")
    graph.add_edge("wait", "search")
    graph.add_edge("search", END)
    return graph


async def _publish(cluster: LocalCluster, topic: str, payload: str) -> None:
    # Published with a client of its own, before counting starts.
    key, trust = cluster.identity_path(cluster.client), cluster.trust_path(cluster.client)
    async with PilotClient(identity=key, trust=trust) as client:
        assert await publish_once(client, topic, payload, peer=WORKER) is not None


@pytest.fixture
async def fresh_default() -> AsyncIterator[None]:
    await aclose_default_transport()
    yield
    await aclose_default_transport()


async def test_async_graph_opens_one_transport(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, fresh_default: None
) -> None:
    await _publish(cluster, "tasks.async", "from an event")
    counter = Counter(monkeypatch)
    saver = PilotCheckpointSaver(peer=WORKER)
    app = _graph("tasks.async").compile(checkpointer=saver)
    config: Any = {"configurable": {"thread_id": "one-transport-async"}}
    out = await app.ainvoke({}, config)
    assert out["query"] == "from an event"
    assert out["result"]["query"] == "from an event"
    snapshot = await app.aget_state(config)
    assert snapshot.values["result"]["query"] == "from an event"
    assert len(counter.opened) == 1, counter.opened
    assert saver.client is default_client()
    assert default_client().transports_opened == 1
    await saver.aclose()


def test_sync_graph_opens_one_transport(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(aclose_default_transport())
    asyncio.run(_publish(cluster, "tasks.sync", "sync event"))
    counter = Counter(monkeypatch)
    with PilotCheckpointSaver(peer=WORKER) as saver:
        app = _graph("tasks.sync").compile(checkpointer=saver)
        config: Any = {"configurable": {"thread_id": "one-transport-sync"}}
        out = app.invoke({}, config)
        assert out["result"]["query"] == "sync event"
        assert app.get_state(config).values["query"] == "sync event"
    try:
        assert len(counter.opened) == 1, counter.opened
        assert default_client().transports_opened == 1
    finally:
        default_client().close()
