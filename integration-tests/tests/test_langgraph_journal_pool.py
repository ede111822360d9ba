"""A pool of ``pilot-langgraph-worker`` processes sharing one idempotency journal.

The journal is a SQLite file (the workers of one host) and, when
``PILOT_TEST_POSTGRES_URL`` is set (``scripts/_postgres.sh`` in CI), a fresh
PostgreSQL schema (the workers of many hosts). Two and three workers (their
own identities, on tcp:// loopback), one
``PilotRemoteRunnable`` over the pool inside a LangGraph graph, and an
``idempotent=True`` handler whose idempotency key is LangGraph's task id.
Twenty rounds each of:

(a) kill -9 of the worker running the call after its "charge" step was
    recorded: the caller's retry reaches another worker, which takes the call
    over once the dead worker's lease expired, replays the step and answers;
    the charge ran once;
(b) a completed call retried on another worker (the graph resumed from its
    checkpoint after the node failed past the remote call) is replayed with
    no second run;
(c) two concurrent duplicates of one task, on two different workers, run
    the handler once.

The workers stay up across rounds. A killed worker is replaced by a spare
process with the same identity, started rounds ahead (a worker takes a
second or more to start on a loaded machine; its start overlaps the rounds
before it is needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import operator
import os
import signal
from collections.abc import AsyncGenerator, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from pilot_checkpoint_sqlite.testing import scratch_postgres_schema
from pilot_langgraph import PilotRemoteRunnable
from pilot_transport import open_transport
from pilot_transport.testing import TestPeers, create_test_peers
from pilot_worker.testing import WorkerProcess

HANDLERS = str(Path(__file__).with_name("_journal_pool_handlers.py"))
ROUNDS = 20
WAIT = 60.0  # a failure bound only
LEASE_SECS = 1.0
# Spare processes per worker name: enough that a spare has a few rounds to
# start before it is needed (with two workers the same name is killed every
# other round): 2 spares each with two workers, 1 with three.
SPARES_ROUNDS = 4
POSTGRES_ENV = "PILOT_TEST_POSTGRES_URL"
_NEEDS_POSTGRES = [
    pytest.mark.postgres,
    pytest.mark.skipif(not os.environ.get(POSTGRES_ENV), reason=f"needs ${POSTGRES_ENV}"),
]


class State(TypedDict, total=False):
    order: str
    amount: int
    stall: bool
    work: float
    receipt: dict[str, Any]
    served_by: int
    twins: Annotated[list[dict[str, Any]], operator.add]


@dataclass
class Pool:
    """The workers of one parametrization, and what their handlers did."""

    tmp: Path
    peers: TestPeers
    names: tuple[str, ...]
    effects: Path
    journal: str
    workers: dict[str, WorkerProcess] = field(default_factory=dict[str, WorkerProcess])
    """The serving worker of each name."""
    spares: dict[str, list[WorkerProcess]] = field(default_factory=dict[str, list[WorkerProcess]])
    """More processes per name (same identity), started ahead to replace a killed one."""
    started: list[WorkerProcess] = field(default_factory=list[WorkerProcess])

    def launch(self, name: str) -> WorkerProcess:
        args = [
            "--transport",
            "tcp://127.0.0.1:0",
            "--identity",
            str(self.peers[name].identity_path),
            "--trust",
            str(self.peers[name].trust_path),
            "--handlers",
            HANDLERS,
            "--idempotency-store",
            self.journal,
            "--idempotency-lease",
            str(LEASE_SECS),
            "--no-call-log",
        ]
        proc = WorkerProcess.start(
            args,
            ready_file=self.tmp / f"{name}-{len(self.started)}.ready",
            module="pilot_langgraph._worker_cli",
            env={**os.environ, "JOURNAL_POOL_EFFECTS": str(self.effects)},
            cwd=self.tmp,
            log_file=self.tmp / f"{name}-{len(self.started)}.log",
            name=name,
        )
        self.started.append(proc)
        return proc

    def serve(self, proc: WorkerProcess) -> None:
        """Make ``proc`` (ready) the worker its name reaches."""
        self.workers[proc.name] = proc
        self.peers.set_endpoint(proc.name, proc.info["endpoint"])

    def start_spares(self) -> None:
        for name in self.names:
            count = max(1, SPARES_ROUNDS // len(self.names))
            self.spares[name] = [self.launch(name) for _ in range(count)]

    async def replace(self, name: str) -> None:
        """Swap the oldest spare of ``name`` in (once it serves) and start another."""
        spares = self.spares[name]
        spare = spares.pop(0)
        spares.append(self.launch(name))
        await spare.wait_ready(WAIT)
        self.serve(spare)

    def name_of(self, pid: int) -> str:
        return next(n for n, w in self.workers.items() if w.pid == pid)

    def lines(self, kind: str, order: str) -> list[dict[str, Any]]:
        if not self.effects.exists():
            return []
        found: list[dict[str, Any]] = []
        for line in self.effects.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by kill -9
                record = json.loads(line)
                if record["kind"] == kind and record["order"] == order:
                    found.append(record)
        return found


@contextlib.contextmanager
def journal_url(kind: str, tmp: Path) -> Generator[str]:
    """The journal the pool shares: a SQLite file, or a fresh PostgreSQL schema."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'journal.db'}"
        return
    with scratch_postgres_schema(os.environ[POSTGRES_ENV], prefix="journal_pool") as url:
        yield url


@pytest.fixture(
    scope="module",
    params=[
        pytest.param((2, "sqlite"), id="2-workers"),
        pytest.param((3, "sqlite"), id="3-workers"),
        pytest.param((2, "postgres"), id="2-workers-postgres", marks=_NEEDS_POSTGRES),
        pytest.param((3, "postgres"), id="3-workers-postgres", marks=_NEEDS_POSTGRES),
    ],
)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    size, kind = request.param
    tmp = tmp_path_factory.mktemp(f"journal-pool-{size}-{kind}")
    names = tuple(f"w{i + 1}" for i in range(size))
    with journal_url(kind, tmp) as journal:
        yield from _run_pool(tmp, names, journal)


def _run_pool(tmp: Path, names: tuple[str, ...], journal: str) -> Iterator[Pool]:
    pool = Pool(
        tmp=tmp,
        peers=create_test_peers(tmp / "peers", ["client", *names]),
        names=names,
        effects=tmp / "effects.jsonl",
        journal=journal,
    )
    try:
        first = [pool.launch(name) for name in names]
        for proc in first:
            proc.wait_ready_blocking(WAIT)
            pool.serve(proc)
        yield pool
    finally:
        for proc in pool.started:
            proc.stop_blocking()


@contextlib.asynccontextmanager
async def client_transport(pool: Pool) -> AsyncGenerator[Any]:
    client = pool.peers["client"]
    async with open_transport(
        "tcp://127.0.0.1:0", identity=client.identity_path, trust=client.trust_path
    ) as transport:
        yield transport


def remote(transport: Any, peers: Sequence[str]) -> PilotRemoteRunnable:
    return PilotRemoteRunnable(
        node="pay",
        peer=list(peers),
        transport=transport,
        max_attempts=len(peers) + 1,
        retry_backoff_secs=0.05,
        timeout_secs=WAIT,
    )


async def wait_for(condition: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.02)


# 20 worker starts per run: on a quiet machine about a second per round; a
# heavily shared one can take minutes, so the bound is wider than the default.
@pytest.mark.timeout(300)
async def test_kill_9_after_a_recorded_step_the_retry_replays_it(pool: Pool) -> None:
    async with client_transport(pool) as transport:
        graph = StateGraph(State)
        graph.add_node("pay", remote(transport, pool.names))
        graph.add_edge(START, "pay")
        graph.add_edge("pay", END)
        app = graph.compile()
        pool.start_spares()  # they start while the first rounds run
        for round_no in range(ROUNDS):
            order = f"a{len(pool.names)}-{round_no}"
            call = asyncio.create_task(app.ainvoke({"order": order, "amount": 10, "stall": True}))
            await wait_for(lambda: pool.lines("step-recorded", order) or call.done())  # noqa: B023
            assert not call.done(), call
            victim_pid = pool.lines("step-recorded", order)[0]["pid"]
            victim = pool.workers[pool.name_of(victim_pid)]
            victim.send_signal(signal.SIGKILL)
            assert await victim.wait() == -signal.SIGKILL
            out = await call
            survivor_pid = out["served_by"]
            assert survivor_pid != victim_pid
            assert pool.name_of(survivor_pid) in pool.names
            assert out["receipt"] == {"charged": 10, "by": victim_pid}
            assert len(pool.lines("charge", order)) == 1
            runs = pool.lines("run", order)
            assert [r["pid"] for r in runs] == [victim_pid, survivor_pid]
            # one call: every attempt carried the same key, derived from the task id
            assert runs[0]["key"] == runs[1]["key"]
            assert runs[0]["key"].endswith("/pay/pay")
            await pool.replace(victim.name)


async def test_a_completed_call_retried_on_another_worker_is_replayed(pool: Pool) -> None:
    saver = InMemorySaver()
    failed_once: set[str] = set()

    def fail_once(update: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        thread = str((config.get("configurable") or {})["thread_id"])
        if thread not in failed_once:
            failed_once.add(thread)
            raise ConnectionResetError("the node failed after the remote call completed")
        return update

    def build(transport: Any, peers: Sequence[str]) -> Any:
        graph = StateGraph(State)
        graph.add_node("pay", remote(transport, peers) | RunnableLambda(fail_once))
        graph.add_edge(START, "pay")
        graph.add_edge("pay", END)
        return graph.compile(checkpointer=saver)

    async with client_transport(pool) as transport:
        everywhere = build(transport, pool.names)
        for round_no in range(ROUNDS):
            order = f"b{len(pool.names)}-{round_no}"
            config: RunnableConfig = {"configurable": {"thread_id": order}}
            with pytest.raises(ConnectionResetError):
                await everywhere.ainvoke({"order": order, "amount": round_no}, config)
            [first] = pool.lines("run", order)
            # Resume the graph from its checkpoint: LangGraph runs the failed
            # task again under the same task id, here on the other workers only.
            others = [n for n in pool.names if pool.workers[n].pid != first["pid"]]
            out = await build(transport, others).ainvoke(None, config)
            assert out["receipt"] == {"charged": round_no, "by": first["pid"]}
            assert out["served_by"] == first["pid"]
            assert len(pool.lines("run", order)) == 1
            assert len(pool.lines("charge", order)) == 1


async def test_two_concurrent_duplicates_run_the_handler_once(pool: Pool) -> None:
    async with client_transport(pool) as transport:
        size = len(pool.names)
        twins = [
            (remote(transport, [pool.names[i]]), remote(transport, [pool.names[(i + 1) % size]]))
            for i in range(size)
        ]

        async def pay_twice(state: State, config: RunnableConfig) -> dict[str, Any]:
            # The same task sent twice at once, to two workers: one idempotency key.
            left, right = twins[int(str(state.get("order")).rsplit("-", 1)[1]) % size]
            results = await asyncio.gather(
                left.ainvoke(state, config), right.ainvoke(state, config)
            )
            return {"twins": list(results)}

        graph = StateGraph(State)
        graph.add_node("pay", pay_twice)
        graph.add_edge(START, "pay")
        graph.add_edge("pay", END)
        app = graph.compile()
        for round_no in range(ROUNDS):
            order = f"c{size}-{round_no}"
            out = await app.ainvoke({"order": order, "amount": 1, "work": 0.3})
            first, second = out["twins"]
            assert first == second
            assert len(pool.lines("run", order)) == 1
            assert len(pool.lines("charge", order)) == 1
