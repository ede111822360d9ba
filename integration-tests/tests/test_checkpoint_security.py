"""Checkpoint reads run no code named by stored data, across real processes.

A store worker in shared mode (``--checkpoint-shared true``) serves two
trusted peers. One writes, over the wire, a checkpoint whose channel value
names ``os.system``; another process reads the thread with ``app.get_state()``.
With the saver's default allowlist nothing runs and the reader gets
``CheckpointTypeRefusedError`` naming the type; with LangGraph's permissive
serializer the same checkpoint runs the command in the reader (the attack this
prevents). Legitimate types (LangChain messages, ``Send``, the graph's own
pydantic state types once registered) still round-trip between the peers.
"""

from __future__ import annotations

import json
import operator
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import ormsgpack
import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Send
from pilot_checkpoint_sqlite import PilotCheckpointSaver
from pilot_checkpoint_sqlite.errors import CheckpointTypeRefusedError
from pilot_checkpoint_sqlite.testing import StoreWorker, start_store_worker
from pilot_transport.testing import TestPeers, create_test_peers
from pydantic import BaseModel

READER = Path(__file__).with_name("_checkpoint_reader_app.py")
EXT_CONSTRUCTOR_SINGLE_ARG = 0  # LangGraph's msgpack extension: module, name, one argument


class _Payload:
    """Stands for the attacker's value; encoded as a call of os.system."""

    def __init__(self, command: str) -> None:
        self.command = command


class _AttackerSerializer(JsonPlusSerializer):
    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        if isinstance(obj, _Payload):
            call = ormsgpack.packb(("os", "system", obj.command))
            return "msgpack", ormsgpack.packb(ormsgpack.Ext(EXT_CONSTRUCTOR_SINGLE_ARG, call))
        return super().dumps_typed(obj)


@pytest.fixture
def peers(tmp_path: Path) -> TestPeers:
    return create_test_peers(tmp_path / "peers", ["attacker", "reader", "store"])


@pytest.fixture
def store(peers: TestPeers, tmp_path: Path) -> Iterator[StoreWorker]:
    worker = start_store_worker(
        identity=peers["store"].identity_path,
        trust=peers["store"].trust_path,
        db_url=f"sqlite:///{tmp_path / 'shared.db'}",
        extra_args=["--checkpoint-shared", "true"],
        log_dir=tmp_path,
    )
    try:
        peers.set_endpoint("store", worker.endpoint)
        yield worker
    finally:
        worker.stop()


def _saver(peers: TestPeers, store: StoreWorker, who: str, **kw: Any) -> PilotCheckpointSaver:
    return PilotCheckpointSaver(
        peer="store",
        port=store.port,
        transport="tcp://127.0.0.1:0",
        identity=peers[who].identity_path,
        trust=peers[who].trust_path,
        **kw,
    )


def _read(peers: TestPeers, store: StoreWorker, thread: str, *extra: str) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            str(READER),
            "--peer",
            "store",
            "--port",
            str(store.port),
            "--identity",
            str(peers["reader"].identity_path),
            "--trust",
            str(peers["reader"].trust_path),
            "--thread",
            thread,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_peer_cannot_run_code_in_a_reader_through_a_shared_thread(
    peers: TestPeers, store: StoreWorker, tmp_path: Path
) -> None:
    marker = tmp_path / "ran-in-reader"
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"messages": _Payload(f"touch {marker}")}
    checkpoint["channel_versions"] = {"messages": "1"}
    with _saver(peers, store, "attacker", serde=_AttackerSerializer()) as attacker:
        attacker.put(
            {"configurable": {"thread_id": "victim", "checkpoint_ns": ""}},
            checkpoint,
            {"source": "input", "step": -1},
            {"messages": "1"},
        )

    refused = _read(peers, store, "victim")
    assert refused["ok"] is False
    assert refused["kind"] == "CheckpointTypeRefusedError"
    assert refused["refused"] == ["os.system"]
    assert "allowed_types=" in refused["message"]
    assert not marker.exists()

    # The same checkpoint read with LangGraph's permissive default runs the
    # attacker's command in the reader: what the allowlist prevents.
    _read(peers, store, "victim", "--permissive")
    assert marker.exists()


class Task(BaseModel):
    n: int


class Profile(BaseModel):
    name: str
    tasks: list[Task] = []


class State(BaseModel):
    messages: Annotated[list[AnyMessage], add_messages] = []
    profile: Profile | None = None
    done: Annotated[list[int], operator.add] = []


def _graph(saver: PilotCheckpointSaver) -> Any:
    def plan(state: State) -> dict[str, Any]:
        return {
            "messages": [AIMessage(content="planned", id="ai-1")],
            "profile": Profile(name="ada", tasks=[Task(n=1), Task(n=2)]),
        }

    def fan_out(state: State) -> list[Send]:
        assert state.profile is not None
        return [Send("work", t) for t in state.profile.tasks]

    def work(task: Task) -> dict[str, Any]:
        return {"done": [task.n]}

    builder = StateGraph(State)
    builder.add_node("plan", plan)
    builder.add_node("work", work)
    builder.add_edge(START, "plan")
    builder.add_conditional_edges("plan", fan_out, ["work"])
    builder.add_edge("work", END)
    return builder.compile(checkpointer=saver, interrupt_before=["work"])


def _sends(tup: Any) -> list[Send]:
    found = [v for _, _, v in tup.pending_writes if isinstance(v, Send)]
    for value in tup.checkpoint["channel_values"].values():
        if isinstance(value, list):
            found.extend(v for v in value if isinstance(v, Send))
    return found


def test_legitimate_types_round_trip_between_peers(peers: TestPeers, store: StoreWorker) -> None:
    config = {"configurable": {"thread_id": "team"}}
    with _saver(peers, store, "attacker", allowed_types=[State]) as writer:
        app = _graph(writer)
        app.invoke({"messages": [HumanMessage(content="hi", id="h-1")]}, config)

    # Another peer, with the graph's state schema registered, sees the same types.
    with _saver(peers, store, "reader", allowed_types=[State]) as reader:
        app = _graph(reader)
        snapshot = app.get_state(config)
        messages = snapshot.values["messages"]
        assert [type(m) for m in messages] == [HumanMessage, AIMessage]
        assert snapshot.values["profile"] == Profile(name="ada", tasks=[Task(n=1), Task(n=2)])
        tup = reader.get_tuple(config)
        assert tup is not None
        assert sorted(s.arg.n for s in _sends(tup)) == [1, 2]
        assert all(isinstance(s.arg, Task) for s in _sends(tup))
        final = app.invoke(None, config)
        assert sorted(final["done"]) == [1, 2]

    # Without the state schema registered, the reader is told what to allow.
    with (
        _saver(peers, store, "reader") as strict,
        pytest.raises(CheckpointTypeRefusedError, match="Profile"),
    ):
        _graph(strict).get_state(config)
