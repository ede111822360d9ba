"""Benchmark: the store on PostgreSQL vs LangGraph's own AsyncPostgresSaver, same server.

The 3-node graph of ``bench_checkpoint.py`` (about 1 KB of state), ``ainvoke``
with the default durability, each concurrent task on its own thread id, at
c=1 and c=64 (quick: 8). Savers, all measured in this one run against one
PostgreSQL server, each in its own throwaway schema:

* ours: PilotCheckpointSaver -> a store worker process (``pilot-worker
  --plugin checkpoint-sqlite --checkpoint-db postgresql+psycopg://...``) over
  tcp:// on loopback (TLS 1.3, mutual auth);
* AsyncPostgresSaver (langgraph-checkpoint-postgres) on a psycopg
  ``AsyncConnectionPool`` of 16 connections (its documented set-up for
  concurrent use), in this process;
* AsyncPostgresSaver on one connection (``from_conn_string``).

Prints the table, the ratios of ours to each AsyncPostgresSaver set-up (which
of the two is faster depends on the concurrency and the load), and at c=64 the
ratio to the stronger of the two in this run: the figure the ">= 1x
AsyncPostgresSaver" goal is judged on.

    PILOT_TEST_POSTGRES_URL=postgresql+psycopg://... \\
        uv run python integration-tests/benchmarks/bench_checkpoint_postgres.py [--quick]

``--url`` overrides the environment; without either it says so and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_checkpoint import (
    STORE_PIDS,
    Result,
    fmt_ms,
    graph_op,
    measure_async,
    measure_cell,
    merge,
)
from langgraph.checkpoint.base import BaseCheckpointSaver
from pilot_checkpoint_sqlite import PilotCheckpointSaver
from pilot_checkpoint_sqlite.testing import (
    scratch_postgres_schema,
    start_store_worker,
)

POOL_SIZE = 16
OURS = "ours: store worker on PostgreSQL"
ANCHOR = f"AsyncPostgresSaver (pool of {POOL_SIZE})"
SINGLE = "AsyncPostgresSaver (one connection)"


def _libpq(url: str) -> str:
    """The SQLAlchemy URL of a scratch schema as a libpq connection string."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@asynccontextmanager
async def ours(base_url: str, workdir: Path) -> AsyncIterator[PilotCheckpointSaver]:
    from pilot_transport.testing import create_test_peers

    with scratch_postgres_schema(base_url, prefix="bench_ours") as url:
        peers = create_test_peers(workdir / "peers", ["bench-client", "bench-store"])
        worker = start_store_worker(
            identity=peers["bench-store"].identity_path,
            trust=peers["bench-store"].trust_path,
            db_url=url,
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
async def postgres_pool(base_url: str, workdir: Path) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    del workdir
    with scratch_postgres_schema(base_url, prefix="bench_lg") as url:
        async with AsyncConnectionPool(
            _libpq(url),
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            open=False,
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
        ) as pool:
            saver = AsyncPostgresSaver(pool)  # pyright: ignore[reportArgumentType]
            await saver.setup()
            yield saver


@asynccontextmanager
async def postgres_single(base_url: str, workdir: Path) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    del workdir
    with scratch_postgres_schema(base_url, prefix="bench_lg1") as url:
        async with AsyncPostgresSaver.from_conn_string(_libpq(url)) as saver:
            await saver.setup()
            yield saver


SAVERS: list[tuple[str, Callable[[str, Path], Any]]] = [
    (OURS, ours),
    (ANCHOR, postgres_pool),
    (SINGLE, postgres_single),
]


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument(
        "--url", default=None, help="PostgreSQL URL (default $PILOT_TEST_POSTGRES_URL)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=None, help="concurrent graphs (default 64; quick: 8)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per cell (default 5)")
    parser.add_argument("--seconds", type=float, default=None, help="window per saver and round")
    args = parser.parse_args(argv)
    base_url = args.url or os.environ.get("PILOT_TEST_POSTGRES_URL")
    if not base_url:
        print("no PostgreSQL: pass --url or set PILOT_TEST_POSTGRES_URL (nothing measured)")
        return 0
    seconds = args.seconds or (0.3 if args.quick else 2.0)
    warmup = 0.2 if args.quick else 0.5
    rounds = args.rounds or (1 if args.quick else 5)
    high = args.concurrency or (8 if args.quick else 64)
    rows: dict[int, dict[str, Result]] = {1: {}, high: {}}
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-pg-") as tmp:
        workdir = Path(tmp)
        async with AsyncExitStack() as stack:
            opened: list[tuple[str, BaseCheckpointSaver[Any]]] = []
            for name, factory in SAVERS:
                opened.append((name, await stack.enter_async_context(factory(base_url, workdir))))
            for c in (1, high):
                ops = {name: graph_op(saver, True) for name, saver in opened}
                for r in range(rounds):
                    # Rotating order: load swings on a shared machine hit every saver alike.
                    for name, saver in opened[r % len(opened) :] + opened[: r % len(opened)]:
                        result = await measure_cell(
                            saver,
                            lambda name=name: measure_async(ops[name], c, seconds, warmup),  # noqa: B023
                        )
                        merge(rows[c], name, result)
                print(f"- graph c={c} done", flush=True)

    print()
    print(
        f"3-node graph, ~1 KB state, default durability, PostgreSQL ({rounds} rounds x "
        f"{seconds:.1f}s per cell; shared cores: noisy, compare ratios)"
    )
    header = (
        f"{'saver':38} {'c=1 inv/s':>10} {'c=1 p50 ms':>11} {f'c={high} inv/s':>12}"
        f" {f'c={high} CPU ms/inv':>17} {'store CPU ms/inv':>17}"
    )
    print(header)
    print("-" * len(header))
    for name, _ in opened:
        one, many = rows[1][name], rows[high][name]
        print(
            f"{name:38} {one.rate:10.1f} {one.p50_ms:11.2f} {many.rate:12.1f}"
            f" {many.cpu_ms_per_op:17.2f} {fmt_ms(many.store_cpu_ms_per_op):>17}"
        )
    print(
        "  (CPU ms/inv: the benchmark process's CPU per invocation; store CPU ms/inv: the"
        " store worker process's; PostgreSQL's own CPU is in neither)"
    )
    print()

    def ratio(a: float, b: float) -> str:
        if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b):
            return f"{a / b:.2f}x"
        return "n/a (no completion in the window)"

    for anchor in (ANCHOR, SINGLE):
        print(f"ratios ({OURS} / {anchor}):")
        print(
            f"  inv/s at c={high}: {ratio(rows[high][OURS].rate, rows[high][anchor].rate)}"
            " (goal >= 1x)"
        )
        print(f"  inv/s at c=1:  {ratio(rows[1][OURS].rate, rows[1][anchor].rate)}")
        print(f"  p50 latency at c=1: {ratio(rows[1][OURS].p50_ms, rows[1][anchor].p50_ms)}")
    strongest = max((ANCHOR, SINGLE), key=lambda name: rows[high][name].rate)
    print(
        f"at c={high} against the stronger anchor ({strongest}): "
        f"{ratio(rows[high][OURS].rate, rows[high][strongest].rate)} (goal >= 1x)"
    )
    print("RATIOS-OK")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
