"""Benchmark: LangGraph checkpointing through PilotCheckpointSaver vs local savers.

A 3-node linear LangGraph graph (about 1 KB of state), ``ainvoke`` with the
default durability, each concurrent worker on its own thread id. Savers, all
measured in this one run:

* ours (remote): PilotCheckpointSaver -> store worker in another process over
  tcp:// on loopback (TLS 1.3, mutual auth), SQLite file with synchronous=FULL;
* ours (in-process): the same saver and store without the network;
* AsyncSqliteSaver and SqliteSaver on a file (langgraph-checkpoint-sqlite);
  SqliteSaver has no async methods, so it runs ``invoke`` in threads;
* InMemorySaver.

Then raw ``aput`` / ``aget_tuple`` / ``alist`` calls/s against ours and the local
async savers. Prints a table and the ratios against AsyncSqliteSaver.

    uv run python integration-tests/benchmarks/bench_checkpoint.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from pilot_checkpoint_sqlite import PilotCheckpointSaver
from pilot_checkpoint_sqlite.testing import alocal_saver, start_store_worker

PAYLOAD = "x" * 1000


class State(TypedDict):
    payload: str
    steps: int


def _node(tag: str) -> Callable[[State], dict[str, Any]]:
    def run(state: State) -> dict[str, Any]:
        return {"payload": state["payload"][1:] + tag, "steps": state["steps"] + 1}

    return run


def build_graph(saver: BaseCheckpointSaver[Any]) -> Any:
    builder = StateGraph(State)
    builder.add_node("a", _node("a"))
    builder.add_node("b", _node("b"))
    builder.add_node("c", _node("c"))
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", "c")
    builder.add_edge("c", END)
    return builder.compile(checkpointer=saver)


@dataclass
class Result:
    ops: int
    seconds: float
    latencies: list[float] = field(default_factory=list[float])
    cpu_seconds: float = 0.0
    """CPU time of this (the client) process over the whole cell, warm-up included."""
    all_ops: int = 0
    """Operations completed over the whole cell, warm-up included."""
    store_cpu_seconds: float | None = None
    """CPU time of the store worker process over the cell (remote savers, on Linux)."""

    @property
    def cpu_ms_per_op(self) -> float:
        return self.cpu_seconds * 1000 / self.all_ops if self.all_ops else float("nan")

    @property
    def store_cpu_ms_per_op(self) -> float:
        if self.store_cpu_seconds is None or not self.all_ops:
            return float("nan")
        return self.store_cpu_seconds * 1000 / self.all_ops

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")


class _Window:
    """A measurement window that opens once every worker has finished one operation.

    A cell starts with nothing in flight; with 64 workers and a slow saver the
    first completions come late. Counting only after every worker completed
    once (and at least ``warmup`` seconds in) measures the steady state.
    """

    def __init__(self, concurrency: int, seconds: float, warmup: float) -> None:
        self.concurrency = concurrency
        self.seconds = seconds
        self.earliest = time.perf_counter() + warmup
        self.started = 0
        self.start_at: float | None = None
        self.stop_at: float | None = None
        self.lock = threading.Lock()
        self.counted = 0
        self.all_ops = 0
        self.cpu_start = time.process_time()
        self.latencies: list[float] = []

    def first_done(self) -> None:
        with self.lock:
            self.started += 1
            if self.started == self.concurrency:
                self.start_at = max(time.perf_counter(), self.earliest)
                self.stop_at = self.start_at + self.seconds

    def running(self) -> bool:
        stop = self.stop_at
        return stop is None or time.perf_counter() < stop

    def record(self, t0: float, t1: float) -> None:
        with self.lock:
            self.all_ops += 1
        start, stop = self.start_at, self.stop_at
        if start is not None and stop is not None and start <= t1 <= stop:
            with self.lock:
                self.counted += 1
                self.latencies.append(t1 - t0)

    def result(self) -> Result:
        cpu = time.process_time() - self.cpu_start
        return Result(self.counted, self.seconds, self.latencies, cpu, self.all_ops)


async def measure_async(
    op: Callable[[int, int], Awaitable[Any]], concurrency: int, seconds: float, warmup: float
) -> Result:
    """Run ``op(worker, i)`` from ``concurrency`` tasks; count completions in the window."""
    window = _Window(concurrency, seconds, warmup)

    async def worker(w: int) -> None:
        i = 0
        while window.running():
            t0 = time.perf_counter()
            await op(w, i)
            t1 = time.perf_counter()
            if i == 0:
                window.first_done()
            window.record(t0, t1)
            i += 1
            # An operation that never suspends (InMemorySaver) would otherwise
            # starve the other workers: give them a turn, as every saver does.
            await asyncio.sleep(0)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return window.result()


def measure_threads(
    op: Callable[[int, int], Any], concurrency: int, seconds: float, warmup: float
) -> Result:
    """Thread-pool twin of :func:`measure_async` (for savers without async methods)."""
    window = _Window(concurrency, seconds, warmup)

    def worker(w: int) -> None:
        i = 0
        while window.running():
            t0 = time.perf_counter()
            op(w, i)
            t1 = time.perf_counter()
            if i == 0:
                window.first_done()
            window.record(t0, t1)
            i += 1

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return window.result()


# ----------------------------------------------------------------- savers

STORE_PIDS: dict[int, int] = {}
"""id() of a remote saver -> PID of its store worker process (for its CPU time)."""


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_cell(
    saver: object,
    run: Callable[[], Awaitable[Result]],
) -> Result:
    """Run one cell; for a remote saver, add its store worker's CPU time over it."""
    pid = STORE_PIDS.get(id(saver))
    before = None if pid is None else process_cpu(pid)
    result = await run()
    after = None if pid is None else process_cpu(pid)
    if before is not None and after is not None:
        result.store_cpu_seconds = after - before
    return result


@asynccontextmanager
async def remote_saver(workdir: Path) -> AsyncIterator[PilotCheckpointSaver]:
    from pilot_transport.testing import create_test_peers

    peers = create_test_peers(workdir / "peers", ["bench-client", "bench-store"])
    worker = start_store_worker(
        identity=peers["bench-store"].identity_path,
        trust=peers["bench-store"].trust_path,
        db_url=f"sqlite:///{workdir / 'remote.db'}",
        log_dir=workdir,
    )
    try:
        peers.set_endpoint("bench-store", worker.endpoint)
        saver = PilotCheckpointSaver(
            peer="bench-store",
            port=worker.port,
            transport="tcp://127.0.0.1:0",
            identity=peers["bench-client"].identity_path,
            trust=peers["bench-client"].trust_path,
        )
        STORE_PIDS[id(saver)] = worker.pid
        try:
            yield saver
            info = await saver._acall("info", {})
            print(
                f"  store worker: {info['write_requests']} write requests in "
                f"{info['write_transactions']} transactions (group commit)"
            )
        finally:
            await saver.aclose()
    finally:
        worker.stop()


@asynccontextmanager
async def async_sqlite(workdir: Path) -> AsyncIterator[AsyncSqliteSaver]:
    async with AsyncSqliteSaver.from_conn_string(str(workdir / "async-sqlite.db")) as saver:
        yield saver


@asynccontextmanager
async def sync_sqlite(workdir: Path) -> AsyncIterator[SqliteSaver]:
    conn = sqlite3.connect(str(workdir / "sqlite.db"), check_same_thread=False)
    try:
        saver = SqliteSaver(conn)
        saver.setup()
        yield saver
    finally:
        conn.close()


@asynccontextmanager
async def in_memory(workdir: Path) -> AsyncIterator[InMemorySaver]:
    del workdir
    yield InMemorySaver()


@asynccontextmanager
async def ours_in_process(workdir: Path) -> AsyncIterator[PilotCheckpointSaver]:
    async with alocal_saver(f"sqlite:///{workdir / 'local.db'}") as saver:
        yield saver


SAVERS: list[tuple[str, Callable[[Path], Any], bool]] = [
    # name, factory, async-capable
    ("ours: remote store over tcp://", remote_saver, True),
    ("ours: in-process store", ours_in_process, True),
    ("AsyncSqliteSaver (file)", async_sqlite, True),
    ("SqliteSaver (file, threads)", sync_sqlite, False),
    ("InMemorySaver", in_memory, True),
]
ANCHOR = "AsyncSqliteSaver (file)"


# ----------------------------------------------------------------- workloads


def graph_op(saver: BaseCheckpointSaver[Any], is_async: bool) -> Callable[[int, int], Any]:
    """One graph invocation on the worker's own thread id."""
    graph = build_graph(saver)
    run = uuid.uuid4().hex[:8]
    inputs: State = {"payload": PAYLOAD, "steps": 0}

    if is_async:

        async def op(w: int, i: int) -> None:
            await graph.ainvoke(inputs, {"configurable": {"thread_id": f"{run}-{w}"}})

        return op

    def sync_op(w: int, i: int) -> None:
        graph.invoke(inputs, {"configurable": {"thread_id": f"{run}-{w}"}})

    return sync_op


def raw_ops(saver: BaseCheckpointSaver[Any]) -> dict[str, Callable[[int, int], Awaitable[Any]]]:
    run = uuid.uuid4().hex[:8]
    value = {"payload": PAYLOAD, "steps": 1}
    heads: dict[int, Any] = {}

    def config(w: int) -> Any:
        return {"configurable": {"thread_id": f"{run}-{w}", "checkpoint_ns": ""}}

    async def put(w: int, i: int) -> None:
        cp = empty_checkpoint()
        cp["channel_values"] = value
        cp["channel_versions"] = {"payload": i + 1, "steps": i + 1}
        heads[w] = await saver.aput(
            heads.get(w, config(w)), cp, {"source": "loop", "step": i}, cp["channel_versions"]
        )

    async def get(w: int, i: int) -> None:
        await saver.aget_tuple(config(w))

    async def lst(w: int, i: int) -> None:
        async for _ in saver.alist(config(w), limit=5):
            pass

    # aput first: the reads then find the checkpoints it wrote.
    return {"aput": put, "aget_tuple": get, "alist(limit=5)": lst}


def fmt_ms(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "-"


def merge(into: dict[str, Result], name: str, result: Result) -> None:
    total = into.setdefault(name, Result(0, 0.0))
    total.ops += result.ops
    total.seconds += result.seconds
    total.latencies.extend(result.latencies)
    total.cpu_seconds += result.cpu_seconds
    total.all_ops += result.all_ops
    if result.store_cpu_seconds is not None:
        total.store_cpu_seconds = (total.store_cpu_seconds or 0.0) + result.store_cpu_seconds


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="concurrent threads (default 64; quick: 8)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per cell (default 5; quick: 1)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="window per saver and round (default 2)"
    )
    parser.add_argument(
        "--local-only", action="store_true", help="skip the remote store worker (diagnostics)"
    )
    args = parser.parse_args(argv)
    savers = SAVERS[1:] if args.local_only else SAVERS
    ours_name = savers[0][0]
    seconds = args.seconds or (0.3 if args.quick else 2.0)
    warmup = 0.2 if args.quick else 0.5
    rounds = args.rounds or (1 if args.quick else 5)
    high = args.concurrency or (8 if args.quick else 64)
    graph_rows: dict[int, dict[str, Result]] = {1: {}, high: {}}
    raw_rows: dict[tuple[int, str], dict[str, Result]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        workdir = Path(tmp)
        async with AsyncExitStack() as stack:
            opened: list[tuple[str, BaseCheckpointSaver[Any], bool]] = []
            for name, factory, is_async in savers:
                opened.append((name, await stack.enter_async_context(factory(workdir)), is_async))
            # Every cell runs each saver in turn, in a rotating order, for
            # several short rounds: load swings on the shared machine then hit
            # every saver alike.
            for c in (1, high):
                ops = {name: graph_op(saver, is_async) for name, saver, is_async in opened}
                for r in range(rounds):
                    order = opened[r % len(opened) :] + opened[: r % len(opened)]
                    for name, saver, is_async in order:
                        if is_async:
                            result = await measure_cell(
                                saver,
                                lambda name=name: measure_async(ops[name], c, seconds, warmup),  # noqa: B023
                            )
                        else:
                            result = await asyncio.to_thread(
                                measure_threads, ops[name], c, seconds, warmup
                            )
                        merge(graph_rows[c], name, result)
                print(f"- graph c={c} done", flush=True)
            async_savers = [(n, s) for n, s, is_async in opened if is_async]
            per_saver = {name: raw_ops(saver) for name, saver in async_savers}
            for op_name in ("aput", "aget_tuple", "alist(limit=5)"):
                for c in (1, high):
                    cell = raw_rows.setdefault((c, op_name), {})
                    for r in range(rounds):
                        order = (
                            async_savers[r % len(async_savers) :]
                            + async_savers[: r % len(async_savers)]
                        )
                        for name, _ in order:
                            op = per_saver[name][op_name]
                            merge(cell, name, await measure_async(op, c, seconds / 2, warmup))
                print(f"- raw {op_name} done", flush=True)

    print()
    print(
        f"3-node graph, ~1 KB state, default durability ({rounds} rounds x {seconds:.1f}s "
        "per cell; 2 shared cores: noisy, compare ratios)"
    )
    header = (
        f"{'saver':34} {'c=1 inv/s':>10} {'c=1 p50 ms':>11} {f'c={high} inv/s':>12}"
        f" {f'c={high} CPU ms/inv':>17} {'store CPU ms/inv':>17}"
    )
    print(header)
    print("-" * len(header))
    for name, _, _ in opened:
        one, many = graph_rows[1][name], graph_rows[high][name]
        print(
            f"{name:34} {one.rate:10.1f} {one.p50_ms:11.2f} {many.rate:12.1f}"
            f" {many.cpu_ms_per_op:17.2f} {fmt_ms(many.store_cpu_ms_per_op):>17}"
        )
    print(
        "  (CPU ms/inv: this process's CPU time per graph invocation; for the remote"
        " saver the client-side cost. store CPU ms/inv: the store worker process's)"
    )
    print()
    op_names = ["aput", "aget_tuple", "alist(limit=5)"]
    header = f"{'raw calls/s':34}" + "".join(
        f" {op + ' c=' + str(c):>20}" for op in op_names for c in (1, high)
    )
    print(header)
    print("-" * len(header))
    for name, _ in async_savers:
        cells = "".join(
            f" {raw_rows[(c, op)][name].rate:20.0f}" for op in op_names for c in (1, high)
        )
        print(f"{name:34}{cells}")
    print()

    def ratio(a: float, b: float) -> str:
        if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b):
            return f"{a / b:.2f}x"
        return "n/a (no completion in the window)"

    ours_1, anchor_1 = graph_rows[1][ours_name], graph_rows[1][ANCHOR]
    ours_n, anchor_n = graph_rows[high][ours_name], graph_rows[high][ANCHOR]
    print(f"ratios ({ours_name} / AsyncSqliteSaver):")
    print(f"  inv/s at c={high}: {ratio(ours_n.rate, anchor_n.rate)} (goal >= 2x)")
    print(f"  inv/s at c=1:  {ratio(ours_1.rate, anchor_1.rate)}")
    print(
        f"  p50 latency at c=1: {ratio(ours_1.p50_ms, anchor_1.p50_ms)} of "
        "AsyncSqliteSaver's (goal <= 1.5x)"
    )
    for op in op_names:
        for c in (1, high):
            mine, theirs = raw_rows[(c, op)][ours_name].rate, raw_rows[(c, op)][ANCHOR].rate
            print(f"  raw {op} calls/s at c={c}: {ratio(mine, theirs)}")
    print("RATIOS-OK")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
