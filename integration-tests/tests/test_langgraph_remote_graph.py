"""PilotRemoteGraph against a real ``pilot-langgraph-worker --graph`` process.

The served graphs live in ``_remote_graphs.py``; the same module is imported
here to run the local twin of each graph, so every comparison is remote vs
local on the very same code. A second client process (``_remote_graph_client.py``)
resumes and cancels runs, to show any trusted process can.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, Interrupt
from pilot_langgraph import PilotRemoteGraph, RunRejectedError, aclose_default_transport
from pilot_langgraph import errors as e
from pilot_langgraph.testing import LocalCluster

HERE = Path(__file__).parent
GRAPHS = str(HERE / "_remote_graphs.py")
CLIENT = str(HERE / "_remote_graph_client.py")


def _load_graphs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_remote_graphs_local", GRAPHS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # LangGraph resolves the state's annotations there
    spec.loader.exec_module(module)
    return module


G = _load_graphs()


def _wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


async def _await_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


def _close_background_transport() -> None:
    """Close the shared default clients (and the transports sync calls use), so the
    next one reads this cluster's environment."""
    closer = threading.Thread(target=asyncio.run, args=(aclose_default_transport(),))
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "closing the default clients hung"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rg-shared")


@pytest.fixture(scope="module")
def store_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rg-store") / "store.db"


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, shared: Path, store_db: Path
) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("rg-cluster")
    graphs = ["planner", "nested", "approval", "double_approval", "slow"]
    args: list[str] = []
    for name in graphs:
        args += ["--graph", f"{name}={GRAPHS}:{name}"]
    args += ["--checkpoint-db", f"sqlite:///{root / 'graphs.db'}"]
    _close_background_transport()  # opened by an earlier module for its own cluster
    with LocalCluster(root / "keys") as c:
        c.add_worker("graph-worker", extra_args=args, env={"LG_TEST_DIR": str(shared)})
        # the same database file: runs on one thread exclude each other across both
        c.add_worker("twin-worker", extra_args=args, env={"LG_TEST_DIR": str(shared)})
        spare = [*args[:-1], f"sqlite:///{root / 'spare.db'}"]
        c.add_worker("spare-worker", extra_args=spare, env={"LG_TEST_DIR": str(shared)})
        c.add_worker(
            "state-worker",
            plugins=["checkpoint-sqlite"],
            extra_args=["--checkpoint-db", f"sqlite:///{store_db}"],
        )
        c.add_worker(
            "peer-graph-worker",
            extra_args=[
                "--graph",
                f"planner={GRAPHS}:planner",
                "--checkpoint-peer",
                "state-worker",
            ],
        )
        # a pool: two workers serving the same graph over one store file
        pool = ["--graph", f"steps={GRAPHS}:steps", "--graph", f"slow={GRAPHS}:slow"]
        pool += ["--checkpoint-db", f"sqlite:///{root / 'pool.db'}"]
        for name in ("pool-a", "pool-b"):
            c.add_worker(name, extra_args=pool, env={"LG_TEST_DIR": str(shared)})
        # and a pool over one store worker shared by every identity
        c.add_worker(
            "shared-state-worker",
            plugins=["checkpoint-sqlite"],
            extra_args=[
                "--checkpoint-db",
                f"sqlite:///{root / 'shared-store.db'}",
                "--checkpoint-shared",
                "true",
            ],
        )
        # the default thread lease TTL (6 s): a resumed run takes it over at once
        peer_pool = ["--graph", f"steps={GRAPHS}:steps"]
        peer_pool += ["--checkpoint-peer", "shared-state-worker"]
        for name in ("peer-pool-a", "peer-pool-b"):
            c.add_worker(name, extra_args=peer_pool, env={"LG_TEST_DIR": str(shared)})
        c.start()
        try:
            yield c
        finally:
            _close_background_transport()


@pytest.fixture(autouse=True)
async def _close_default_transport() -> AsyncIterator[None]:
    yield
    await aclose_default_transport()


def _thread() -> dict[str, Any]:
    return {"configurable": {"thread_id": f"t-{uuid.uuid4().hex[:12]}"}}


def _client(cluster: LocalCluster, *args: str) -> dict[str, Any]:
    env = {**os.environ, **cluster.client_env}
    proc = subprocess.run(
        [sys.executable, CLIENT, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _local(name: str) -> Any:
    obj = getattr(G, name)
    if callable(obj) and not isinstance(obj, StateGraph) and not hasattr(obj, "astream"):
        obj = obj()
    if isinstance(obj, StateGraph):
        return obj.compile(checkpointer=InMemorySaver())  # pyright: ignore[reportUnknownMemberType]
    return obj.copy({"checkpointer": InMemorySaver()})


def _strip_ns(ns: tuple[str, ...]) -> tuple[str, ...]:
    # task ids in namespaces differ between two runs; node names do not
    return tuple(part.split(":")[0] for part in ns)


def _normal(item: Any, modes: Any, subgraphs: bool) -> Any:
    """An item with run-specific parts (task/checkpoint ids, timestamps) taken out."""
    single = isinstance(modes, str)
    ns: tuple[str, ...] = ()
    if subgraphs:
        ns, item = item[0], item[1:] if not single else item[1]
        ns = _strip_ns(ns)
    if single:
        mode, chunk = modes, item
    else:
        mode, chunk = item if subgraphs else (item[0], item[1])
    if mode == "messages":
        message, meta = chunk
        chunk = (type(message).__name__, message.content, meta.get("langgraph_node"))
    elif mode == "debug":
        payload = chunk["payload"]
        chunk = (
            chunk["type"],
            chunk["step"],
            payload.get("name"),
            json.dumps(payload.get("input", None), default=str)
            if chunk["type"] == "task"
            else None,
        )
    return (ns, mode, chunk)


async def test_planner_returns_the_same_final_state_as_local(cluster: LocalCluster) -> None:
    remote = PilotRemoteGraph("planner", peer="graph-worker")
    local = _local("planner")
    want = await local.ainvoke({"task": "ship"}, _thread())
    got = await remote.ainvoke({"task": "ship"}, _thread())
    assert got == want
    assert got["verdict"] == "ok"
    assert got["results"] == ["SHIP:STEP0", "SHIP:STEP1", "SHIP:STEP2"]


def test_sync_invoke_and_stream(cluster: LocalCluster) -> None:
    remote = PilotRemoteGraph("planner", peer="graph-worker")
    config = _thread()
    out = remote.invoke({"task": "sync"}, config)
    assert out["answer"] == "all three steps verified"
    assert [next(iter(u)) for u in remote.stream({"task": "s"}, _thread())] == [
        "planner",
        "executor",
        "verifier",
    ]
    assert remote.get_state(config).values == out


@pytest.mark.parametrize(
    ("graph", "modes", "subgraphs"),
    [
        ("planner", "values", False),
        ("planner", "updates", False),
        ("planner", "custom", False),
        ("planner", "messages", False),
        ("planner", "debug", False),
        ("planner", ["values", "updates", "custom", "messages"], False),
        ("nested", "updates", True),
        ("nested", ["values", "updates", "custom"], True),
        ("nested", "updates", False),
    ],
)
async def test_stream_modes_match_local(
    cluster: LocalCluster, graph: str, modes: Any, subgraphs: bool
) -> None:
    remote = PilotRemoteGraph(graph, peer="graph-worker")
    local = _local(graph)
    want = [
        _normal(i, modes, subgraphs)
        async for i in local.astream(
            {"task": "s"}, _thread(), stream_mode=modes, subgraphs=subgraphs
        )
    ]
    got = [
        _normal(i, modes, subgraphs)
        async for i in remote.astream(
            {"task": "s"}, _thread(), stream_mode=modes, subgraphs=subgraphs
        )
    ]
    assert got == want
    assert got  # the graph did stream something


async def test_stream_v2_parts_match_local(cluster: LocalCluster) -> None:
    remote = PilotRemoteGraph("planner", peer="graph-worker")
    local = _local("planner")
    modes = ["values", "updates"]
    want = [
        p async for p in local.astream({"task": "v"}, _thread(), stream_mode=modes, version="v2")
    ]
    got = [
        p async for p in remote.astream({"task": "v"}, _thread(), stream_mode=modes, version="v2")
    ]
    assert got == want


async def test_state_history_update_and_introspection(cluster: LocalCluster) -> None:
    remote = PilotRemoteGraph("planner", peer="graph-worker")
    config = _thread()
    await remote.ainvoke({"task": "h"}, config)
    state = await remote.aget_state(config)
    assert state.values["verdict"] == "ok"
    assert state.next == ()
    history = [s async for s in remote.aget_state_history(config)]
    assert [s.metadata["step"] for s in history if s.metadata] == [3, 2, 1, 0, -1]
    new_config = await remote.aupdate_state(config, {"verdict": "overruled"}, as_node="verifier")
    assert new_config["configurable"]["thread_id"] == config["configurable"]["thread_id"]
    assert (await remote.aget_state(config)).values["verdict"] == "overruled"
    drawn = await remote.aget_graph()
    assert {"planner", "executor", "verifier"} <= set(drawn.nodes)
    assert ("planner", "executor") in {(x.source, x.target) for x in drawn.edges}
    schemas = await remote.aschemas()
    assert "task" in schemas["input_schema"]["properties"]
    bound = remote.with_config(config)
    assert (await bound.aget_state({})).values["verdict"] == "overruled"


async def test_interrupt_pauses_and_another_process_resumes(cluster: LocalCluster) -> None:
    remote = PilotRemoteGraph("approval", peer="graph-worker")
    config = _thread()
    out = await remote.ainvoke({"task": "deploy"}, config)
    (intr,) = out["__interrupt__"]
    assert isinstance(intr, Interrupt)
    assert intr.value == {"question": "approve deploy?"}
    updates = [u async for u in remote.astream({"task": "x"}, _thread(), stream_mode="updates")]
    assert "__interrupt__" in updates[-1]
    state = await remote.aget_state(config)
    assert state.next == ("approve",)
    assert state.interrupts[0].value == intr.value
    thread_id = config["configurable"]["thread_id"]
    reply = await asyncio.to_thread(_client, cluster, "resume", "approval", thread_id, "yes")
    assert reply == {"answer": "deploy approved=yes"}
    assert (await remote.aget_state(config)).values["approved"] == "yes"


@pytest.mark.parametrize("graph", ["approval", "double_approval"])
async def test_nested_interrupt_then_parent_resume_completes(
    cluster: LocalCluster, graph: str
) -> None:
    remote = PilotRemoteGraph(graph, peer="graph-worker")

    def after(state: dict[str, Any]) -> dict[str, Any]:
        return {"answer": state["answer"] + " (seen by parent)"}

    parent = StateGraph(G.PlanState)
    parent.add_node("remote", remote)
    parent.add_node("after", after)
    parent.add_edge(START, "remote")
    parent.add_edge("remote", "after")
    parent.add_edge("after", END)
    app = parent.compile(checkpointer=InMemorySaver())
    config = _thread()
    first = await app.ainvoke({"task": "nest"}, config)
    assert first["__interrupt__"][0].value == {"question": "approve nest?"}
    answers = ["yes", "sure"] if graph == "double_approval" else ["yes"]
    out: dict[str, Any] = {}
    for i, answer in enumerate(answers):
        out = await app.ainvoke(Command(resume=answer), config)
        if i + 1 < len(answers):
            assert out["__interrupt__"][0].value == {"question": "really nest?"}
    want = "nest approved=yes" + (" again=sure" if graph == "double_approval" else "")
    assert out["answer"] == want + " (seen by parent)"
    assert "__interrupt__" not in out
    # resuming the parent resumed the one remote thread tied to the task: it ran once
    snapshot = await app.aget_state(config)
    assert snapshot.next == ()


def test_nested_in_a_sync_parent_interrupt_then_resume(cluster: LocalCluster) -> None:
    parent = StateGraph(G.PlanState)
    parent.add_node("remote", PilotRemoteGraph("approval", peer="graph-worker"))
    parent.add_edge(START, "remote")
    parent.add_edge("remote", END)
    app = parent.compile(checkpointer=InMemorySaver())
    config = _thread()
    first = app.invoke({"task": "sync-nest"}, config)
    assert first["__interrupt__"][0].value == {"question": "approve sync-nest?"}
    out = app.invoke(Command(resume="ok"), config)
    assert out["answer"] == "sync-nest approved=ok"


async def test_chat_model_tokens_stream_through_messages(cluster: LocalCluster) -> None:
    remote = PilotRemoteGraph("planner", peer="graph-worker")
    tokens = [
        message.content
        async for message, meta in remote.astream(
            {"task": "tok"}, _thread(), stream_mode="messages"
        )
        if meta["langgraph_node"] == "verifier"
    ]
    assert len(tokens) > 1  # token by token, not one message
    assert "".join(tokens) == "all three steps verified"


async def test_nested_interrupt_streams_inner_steps_to_parent(cluster: LocalCluster) -> None:
    remote = PilotRemoteGraph("planner", peer="graph-worker")
    parent = StateGraph(G.PlanState)
    parent.add_node("remote", remote)
    parent.add_edge(START, "remote")
    parent.add_edge("remote", END)
    app = parent.compile(checkpointer=InMemorySaver())
    items = [
        i
        async for i in app.astream({"task": "p"}, _thread(), stream_mode="updates", subgraphs=True)
    ]
    inner = [next(iter(chunk)) for ns, chunk in items if ns]
    assert inner == ["planner", "executor", "verifier"]
    assert all(_strip_ns(ns) == ("remote",) for ns, _ in items if ns)
    assert items[-1][0] == ()
    assert items[-1][1]["remote"]["verdict"] == "ok"


async def test_cancel_by_id_from_another_process_stops_the_node(
    cluster: LocalCluster, shared: Path
) -> None:
    remote = PilotRemoteGraph("slow", peer="graph-worker")
    run_id = str(uuid.uuid4())
    task = asyncio.create_task(remote.ainvoke({"task": "c1"}, _thread(), run_id=run_id))
    await _await_for(lambda: (shared / "c1.started").exists())
    reply = await asyncio.to_thread(_client, cluster, "cancel", "slow", run_id)
    assert reply == {"cancelled": True}
    with pytest.raises(e.RemoteCancelledError):
        await task
    assert (shared / "c1.cancelled").exists()
    assert not await remote.acancel_run(run_id)  # gone: safe to repeat


async def test_breaking_off_a_stream_cancels_the_remote_run(
    cluster: LocalCluster, shared: Path
) -> None:
    remote = PilotRemoteGraph("slow", peer="graph-worker")
    stream = remote.astream({"task": "b1"}, _thread(), stream_mode="values")
    assert await anext(stream) == {"task": "b1", "results": []}
    await _await_for(lambda: (shared / "b1.started").exists())
    await stream.aclose()  # pyright: ignore[reportAttributeAccessIssue]
    await _await_for(lambda: (shared / "b1.cancelled").exists())


async def test_reject_and_enqueue_under_two_concurrent_callers(
    cluster: LocalCluster, shared: Path
) -> None:
    remote = PilotRemoteGraph("slow", peer="graph-worker")
    config = _thread()
    first_id = str(uuid.uuid4())
    first = asyncio.create_task(remote.ainvoke({"task": "r1"}, config, run_id=first_id))
    await _await_for(lambda: (shared / "r1.started").exists())
    with pytest.raises(RunRejectedError):
        await remote.ainvoke({"task": "r2"}, config)
    assert not (shared / "r2.started").exists()
    second_id = str(uuid.uuid4())
    second = asyncio.create_task(
        remote.ainvoke({"task": "r3"}, config, run_id=second_id, multitask_strategy="enqueue")
    )
    assert await remote.acancel_run(first_id)
    with pytest.raises(e.RemoteCancelledError):
        await first
    # the enqueued run starts once the thread is free
    await _await_for(lambda: (shared / "r3.started").exists())
    assert await remote.acancel_run(second_id)
    with pytest.raises(e.RemoteCancelledError):
        await second


async def test_reject_across_two_workers_sharing_a_store(
    cluster: LocalCluster, shared: Path
) -> None:
    here = PilotRemoteGraph("slow", peer="graph-worker")
    there = PilotRemoteGraph("slow", peer="twin-worker")
    config = _thread()
    run_id = str(uuid.uuid4())
    first = asyncio.create_task(here.ainvoke({"task": "x1"}, config, run_id=run_id))
    await _await_for(lambda: (shared / "x1.started").exists())
    with pytest.raises(RunRejectedError):
        await there.ainvoke({"task": "x2"}, config)
    assert not (shared / "x2.started").exists()
    # another thread on the twin is not affected
    other = str(uuid.uuid4())
    second = asyncio.create_task(there.ainvoke({"task": "x3"}, _thread(), run_id=other))
    await _await_for(lambda: (shared / "x3.started").exists())
    assert await here.acancel_run(run_id)
    assert await there.acancel_run(other)
    for task in (first, second):
        with pytest.raises(e.RemoteCancelledError):
            await task


async def test_unknown_graph_and_bad_modes_are_typed_errors(cluster: LocalCluster) -> None:
    with pytest.raises(e.RemoteNotFoundError):
        await PilotRemoteGraph("nope", peer="graph-worker").ainvoke({}, _thread())
    with pytest.raises(e.PilotUsageError):
        await anext(
            PilotRemoteGraph("planner", peer="graph-worker").astream({}, stream_mode="bogus")
        )


async def test_failover_to_the_next_peer_when_one_is_down(cluster: LocalCluster) -> None:
    cluster.kill("spare-worker")
    with pytest.raises(e.RemoteUnavailableError):
        await PilotRemoteGraph("planner", peer="spare-worker").ainvoke({"task": "f"}, _thread())
    remote = PilotRemoteGraph("planner", peer=["spare-worker", "graph-worker"])
    out = await remote.ainvoke({"task": "f"}, _thread())
    assert out["verdict"] == "ok"
    assert (await remote.aget_state(_thread())).values == {}


async def test_checkpoints_on_a_store_peer(cluster: LocalCluster, store_db: Path) -> None:
    remote = PilotRemoteGraph("planner", peer="peer-graph-worker")
    config = _thread()
    out = await remote.ainvoke({"task": "stored"}, config)
    assert out["verdict"] == "ok"
    assert (await remote.aget_state(config)).values == out
    # the checkpoints went to state-worker's database (scoped to the graph worker)
    thread_id = config["configurable"]["thread_id"].encode()
    files = [p for p in store_db.parent.iterdir() if p.name.startswith(store_db.name)]
    assert any(thread_id in p.read_bytes() for p in files)


def _counts(shared: Path, task: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for line in (shared / f"{task}.count").read_text().splitlines():
        step, pid = line.split()
        out.setdefault(step, []).append(int(pid))
    return out


@pytest.mark.parametrize(
    ("task", "pool"),
    [("k1", ("pool-a", "pool-b")), ("k2", ("peer-pool-a", "peer-pool-b"))],
    ids=["shared-sqlite-file", "shared-store-worker"],
)
async def test_a_run_survives_kill_9_of_its_worker(
    cluster: LocalCluster, shared: Path, task: str, pool: tuple[str, str]
) -> None:
    (shared / f"{task}.hold").write_text("")
    remote = PilotRemoteGraph("steps", peer=list(pool))
    config = _thread()
    seen: list[Any] = []

    async def run() -> None:
        async for mode, chunk in remote.astream(
            {"task": task}, config, stream_mode=["updates", "values"]
        ):
            seen.append((mode, chunk))

    runner = asyncio.create_task(run())
    pid_file = shared / f"{task}.two.pid"
    await _await_for(lambda: pid_file.exists() and bool(pid_file.read_text()))
    pid = int(pid_file.read_text())
    # LangGraph saves a step's checkpoint in the background while the next step
    # starts: kill once step one's checkpoint is in the store
    survivor_view = PilotRemoteGraph("steps", peer=pool[1])

    async def checkpointed() -> bool:
        return (await survivor_view.aget_state(config)).next == ("two",)

    deadline = time.monotonic() + 60
    while not await checkpointed():
        assert time.monotonic() < deadline, "step one's checkpoint never reached the store"
        await asyncio.sleep(0.02)
    victim = next(n for n in pool if cluster.workers[n].proc.pid == pid)
    survivor = pool[1] if victim == pool[0] else pool[0]
    log_start = len(cluster.workers[survivor].logs)
    cluster.kill(victim)
    await asyncio.wait_for(runner, timeout=120)
    # the resumed run took the dead worker's live lease over (same run id) instead
    # of waiting for it to expire: the survivor says so
    thread_id = config["configurable"]["thread_id"]
    line = await cluster.workers[survivor].wait_for_log(
        f"took over the lease of thread {thread_id!r}", timeout=60, start=log_start
    )
    assert "a resume of the same run" in line

    local = await _local("steps").ainvoke({"task": task}, _thread())
    final = [c for m, c in seen if m == "values"][-1]
    assert final == local
    assert (await remote.aget_state(config)).values == local
    counts = _counts(shared, task)
    # the completed step before the last checkpoint ran once; the interrupted one again
    assert counts["one"] == [pid]
    assert counts["two"][0] == pid
    assert len(counts["two"]) == 2
    assert counts["two"][1] == counts["three"][0] == cluster.workers[survivor].proc.pid
    assert len(counts["three"]) == 1
    # each node's update reached the caller once
    assert [next(iter(c)) for m, c in seen if m == "updates"] == ["one", "two", "three"]
    threads = await PilotRemoteGraph("steps", peer=survivor).alist_threads(limit=1000)
    assert config["configurable"]["thread_id"] in [t["thread_id"] for t in threads["threads"]]


async def _held_run(
    remote: PilotRemoteGraph, shared: Path, task: str, config: dict[str, Any]
) -> asyncio.Task[Any]:
    """A run of ``steps`` that waits in step two (after step one's checkpoint)."""
    (shared / f"{task}.hold").write_text("")
    first = asyncio.create_task(remote.ainvoke({"task": task}, config))
    await _await_for(lambda: (shared / f"{task}.two.pid").exists())
    return first


async def test_interrupt_strategy_cancels_the_running_run_and_keeps_its_state(
    cluster: LocalCluster, shared: Path
) -> None:
    remote = PilotRemoteGraph("steps", peer="pool-b")  # pool-a is killed above
    config = _thread()
    first = await _held_run(remote, shared, "i1", config)
    second = await remote.ainvoke({"task": "i1"}, config, multitask_strategy="interrupt")
    with pytest.raises(e.RemoteCancelledError):
        await first
    # started from the state the cancelled run left: step one's result is there twice
    assert second["results"] == ["one", "one", "two", "three"]
    assert not await remote.alist_runs()


async def test_rollback_strategy_deletes_the_cancelled_runs_checkpoints(
    cluster: LocalCluster, shared: Path
) -> None:
    remote = PilotRemoteGraph("steps", peer="pool-b")  # pool-a is killed above
    config = _thread()
    first = await _held_run(remote, shared, "rb1", config)
    runs = await remote.alist_runs()
    assert [r["thread_id"] for r in runs] == [config["configurable"]["thread_id"]]
    second = await remote.ainvoke({"task": "rb1"}, config, multitask_strategy="rollback")
    with pytest.raises(e.RemoteCancelledError):
        await first
    assert second["results"] == ["one", "two", "three"]
    page = await remote.alist_threads(limit=1)
    assert len(page["threads"]) == 1
    assert page["total"] >= 1
    assert page["threads"][0]["thread_id"] == config["configurable"]["thread_id"]
    assert page["threads"][0]["metadata"]["step"] == 3
    history = [s async for s in remote.aget_state_history(config)]
    assert {s.metadata["run_id"] for s in history if s.metadata} == {  # pyright: ignore[reportTypedDictNotRequiredAccess]
        history[0].metadata["run_id"]  # pyright: ignore[reportOptionalSubscript, reportTypedDictNotRequiredAccess]
    }


def test_discover_prints_served_graphs_with_their_schemas(cluster: LocalCluster) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pilot_langgraph._cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **cluster.client_env},
            check=False,
        )

    table = cli("discover", "pool-b")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = lines.index("2 graph(s) served (pilot_langgraph.PilotRemoteGraph):")
    assert lines[header + 1].split() == ["GRAPH", "INPUT", "OUTPUT", "CONTEXT"]
    steps_row = next(ln for ln in lines[header:] if ln.startswith("steps "))
    assert "task" in steps_row
    assert "verdict" in steps_row
    as_json = cli("discover", "pool-b", "--json")
    assert as_json.returncode == 0, as_json.stderr
    entry = next(h for h in json.loads(as_json.stdout) if h["name"] == "lg.graph.schemas")
    local = _local("steps")
    assert sorted(entry["graphs"]) == ["slow", "steps"]
    assert entry["graphs"]["steps"]["input_schema"] == local.get_input_jsonschema()
    assert entry["graphs"]["steps"]["output_schema"] == local.get_output_jsonschema()
    # a worker serving no graphs prints no graph section
    plain = cli("discover", "state-worker")
    assert plain.returncode == 0, plain.stderr
    assert "graph(s) served" not in plain.stdout
