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

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")


async def measure_async(
    op: Callable[[int, int], Awaitable[Any]], concurrency: int, seconds: float, warmup: float
) -> Result:
    """Run ``op(worker, i)`` from ``concurrency`` tasks; count completions in the window.

    The window opens ``warmup`` seconds after the start and lasts ``seconds``;
    workers stop starting new operations when it closes.
    """
    latencies: list[float] = []
    counted = 0
    start_at = time.perf_counter() + warmup
    stop_at = start_at + seconds

    async def worker(w: int) -> None:
        nonlocal counted
        i = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await op(w, i)
            i += 1
            t1 = time.perf_counter()
            if start_at <= t1 <= stop_at:
                counted += 1
                latencies.append(t1 - t0)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return Result(counted, seconds, latencies)


def measure_threads(
    op: Callable[[int, int], Any], concurrency: int, seconds: float, warmup: float
) -> Result:
    """Thread-pool twin of :func:`measure_async` (for savers without async methods)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counted = [0]
    start_at = time.perf_counter() + warmup
    stop_at = start_at + seconds

    def worker(w: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            op(w, i)
            i += 1
            t1 = time.perf_counter()
            if start_at <= t1 <= stop_at:
                with lock:
                    counted[0] += 1
                    latencies.append(t1 - t0)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return Result(counted[0], seconds, latencies)


# ----------------------------------------------------------------- savers


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


async def graph_bench(
    saver: BaseCheckpointSaver[Any], is_async: bool, concurrency: int, seconds: float, warmup: float
) -> Result:
    graph = build_graph(saver)
    run = uuid.uuid4().hex[:8]
    inputs: State = {"payload": PAYLOAD, "steps": 0}

    def config(w: int) -> dict[str, Any]:
        return {"configurable": {"thread_id": f"{run}-{w}"}}

    if is_async:

        async def op(w: int, i: int) -> None:
            await graph.ainvoke(inputs, config(w))

        return await measure_async(op, concurrency, seconds, warmup)

    def sync_op(w: int, i: int) -> None:
        graph.invoke(inputs, config(w))

    return await asyncio.to_thread(measure_threads, sync_op, concurrency, seconds, warmup)


async def raw_bench(
    saver: BaseCheckpointSaver[Any], concurrency: int, seconds: float, warmup: float
) -> dict[str, Result]:
    run = uuid.uuid4().hex[:8]
    value = {"payload": PAYLOAD, "steps": 1}
    heads: dict[int, Any] = {}

    async def put(w: int, i: int) -> None:
        cp = empty_checkpoint()
        cp["channel_values"] = value
        cp["channel_versions"] = {"payload": i + 1, "steps": i + 1}
        parent = heads.get(w, {"configurable": {"thread_id": f"{run}-{w}", "checkpoint_ns": ""}})
        heads[w] = await saver.aput(
            parent, cp, {"source": "loop", "step": i}, cp["channel_versions"]
        )

    results = {"aput": await measure_async(put, concurrency, seconds, warmup)}

    async def get(w: int, i: int) -> None:
        await saver.aget_tuple({"configurable": {"thread_id": f"{run}-{w}", "checkpoint_ns": ""}})

    results["aget_tuple"] = await measure_async(get, concurrency, seconds, warmup)

    async def lst(w: int, i: int) -> None:
        async for _ in saver.alist(
            {"configurable": {"thread_id": f"{run}-{w}", "checkpoint_ns": ""}}, limit=5
        ):
            pass

    results["alist(limit=5)"] = await measure_async(lst, concurrency, seconds, warmup)
    return results


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="concurrent threads (default 64; quick: 8)"
    )
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument(
        "--local-only", action="store_true", help="skip the remote store worker (diagnostics)"
    )
    args = parser.parse_args(argv)
    savers = SAVERS[1:] if args.local_only else SAVERS
    ours_name = savers[0][0]
    seconds = args.seconds or (0.3 if args.quick else 10.0)
    warmup = 0.2 if args.quick else 3.0
    high = args.concurrency or (8 if args.quick else 64)
    graph_rows: dict[str, dict[int, Result]] = {}
    raw_rows: dict[str, dict[int, dict[str, Result]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        workdir = Path(tmp)
        for name, factory, is_async in savers:
            print(f"- {name}", flush=True)
            async with AsyncExitStack() as stack:
                saver = await stack.enter_async_context(factory(workdir))
                graph_rows[name] = {}
                for c in (1, high):
                    graph_rows[name][c] = await graph_bench(saver, is_async, c, seconds, warmup)
                if is_async:
                    raw_rows[name] = {}
                    for c in (1, high):
                        raw_rows[name][c] = await raw_bench(saver, c, seconds / 2, warmup / 3)

    print()
    print(
        f"3-node graph, ~1 KB state, default durability ({seconds:.1f}s per cell; "
        "2 shared cores: noisy, compare ratios)"
    )
    header = f"{'saver':34} {'c=1 inv/s':>10} {'c=1 p50 ms':>11} {f'c={high} inv/s':>12}"
    print(header)
    print("-" * len(header))
    for name, row in graph_rows.items():
        print(f"{name:34} {row[1].rate:10.1f} {row[1].p50_ms:11.2f} {row[high].rate:12.1f}")
    print()
    ops = ["aput", "aget_tuple", "alist(limit=5)"]
    header = f"{'raw calls/s':34}" + "".join(
        f" {op + ' c=' + str(c):>20}" for op in ops for c in (1, high)
    )
    print(header)
    print("-" * len(header))
    for name, by_c in raw_rows.items():
        cells = "".join(f" {by_c[c][op].rate:20.0f}" for op in ops for c in (1, high))
        print(f"{name:34}{cells}")
    print()

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if a and b else "n/a (no completion in the window)"

    ours, anchor = graph_rows[ours_name], graph_rows[ANCHOR]
    print(f"ratios ({ours_name} / AsyncSqliteSaver):")
    print(f"  inv/s at c={high}: {ratio(ours[high].rate, anchor[high].rate)} (goal >= 2x)")
    print(f"  inv/s at c=1:  {ratio(ours[1].rate, anchor[1].rate)}")
    print(
        f"  p50 latency at c=1: {ratio(ours[1].p50_ms, anchor[1].p50_ms)} of "
        "AsyncSqliteSaver's (goal <= 1.5x)"
    )
    for op in ops:
        for c in (1, high):
            mine, theirs = raw_rows[ours_name][c][op].rate, raw_rows[ANCHOR][c][op].rate
            print(f"  raw {op} calls/s at c={c}: {ratio(mine, theirs)}")
    print("RATIOS-OK")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
