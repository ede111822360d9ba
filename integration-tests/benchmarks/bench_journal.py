"""The cost of the shared idempotency journal per idempotent call, on SQLite.

Every configuration calls the same ``idempotent=True`` async handler through
the worker's whole call pipeline, in this process (``WorkerTestClient``, no
network: the network cost is the same with or without a journal, so leaving
it out isolates what the journal adds):

- ``no key``: calls without an idempotency key (the pipeline alone);
- ``memory cache`` (the anchor): a fresh key per call, today's in-memory
  cache of one worker process;
- ``journal``: a fresh key per call with ``IdempotencyJournal`` on a SQLite
  file (WAL, ``synchronous=NORMAL``): one claim and one outcome write;
- ``journal + 1 step``: the same, with one ``ctx.step`` (one more write);
- ``journal replay``: the keys of the ``journal`` run again (one read each);
- ``journal c=16``: 16 concurrent callers, fresh keys (per-call time is
  wall time / calls).

Printed: microseconds per call (median of the rounds), and the journal's
added cost per call = ``journal - memory cache`` (goal: under 1 ms), with the
ratio journal / memory cache.

Usage: ``uv run python integration-tests/benchmarks/bench_journal.py [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pilot_worker import Context, WorkerServer, pilot_handler
from pilot_worker.journal import IdempotencyJournal
from pilot_worker.testing import WorkerTestClient

REQUEST = {"account": "acct-123456", "amount": 42, "note": "n" * 100}


@pilot_handler("charge", idempotent=True)
async def charge(req: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return {"account": req["account"], "charged": req["amount"], "ok": True}


@pilot_handler("charge_step", idempotent=True)
async def charge_step(req: dict[str, Any], ctx: Context) -> dict[str, Any]:
    receipt = await ctx.step("charge", lambda: {"charged": req["amount"]})
    return {"account": req["account"], "receipt": receipt}


def client(journal: IdempotencyJournal | None) -> WorkerTestClient:
    worker = WorkerServer(None, idempotency_store=journal)
    worker.register(charge)
    worker.register(charge_step)
    return WorkerTestClient(worker, wire_roundtrip=False)


async def timed(calls: int, one: Callable[[int], Awaitable[Any]], concurrency: int = 1) -> float:
    """Microseconds per call."""
    started = time.perf_counter()
    if concurrency == 1:
        for i in range(calls):
            await one(i)
    else:
        next_index = iter(range(calls))

        async def lane() -> None:
            for i in next_index:
                await one(i)

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return (time.perf_counter() - started) / calls * 1e6


async def bench(quick: bool) -> None:
    rounds = 1 if quick else 5
    calls = 300 if quick else 3000
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-journal-") as tmp:
        journal = IdempotencyJournal(f"sqlite:///{Path(tmp) / 'journal.db'}")
        try:
            memory, shared = client(None), client(journal)
            for r in range(rounds):
                tag = f"r{r}"

                def plain(i: int) -> Awaitable[Any]:
                    return memory.call("charge", REQUEST)

                def cached(i: int, tag: str = tag) -> Awaitable[Any]:
                    return memory.call("charge", REQUEST, idempotency_key=f"m{tag}-{i}")

                def journaled(i: int, tag: str = tag) -> Awaitable[Any]:
                    return shared.call("charge", REQUEST, idempotency_key=f"j{tag}-{i}")

                def stepped(i: int, tag: str = tag) -> Awaitable[Any]:
                    return shared.call("charge_step", REQUEST, idempotency_key=f"s{tag}-{i}")

                def parallel(i: int, tag: str = tag) -> Awaitable[Any]:
                    return shared.call("charge", REQUEST, idempotency_key=f"p{tag}-{i}")

                await timed(min(calls, 200), lambda i, tag=tag: shared.call(  # warm-up
                    "charge", REQUEST, idempotency_key=f"w{tag}-{i}"))  # fmt: skip
                results.setdefault("no key", []).append(await timed(calls, plain))
                results.setdefault("memory cache", []).append(await timed(calls, cached))
                results.setdefault("journal", []).append(await timed(calls, journaled))
                results.setdefault("journal + 1 step", []).append(await timed(calls, stepped))
                results.setdefault("journal replay", []).append(await timed(calls, journaled))
                results.setdefault("journal c=16", []).append(
                    await timed(calls, parallel, concurrency=16)
                )
            assert journal.replays >= calls, "the replay run did not replay"
        finally:
            await journal.aclose()
    median = {name: statistics.median(values) for name, values in results.items()}
    print(
        f"pilot-worker idempotency journal on SQLite ({'quick' if quick else 'full'} run, "
        f"{rounds} round(s) x {calls} calls, in-process pipeline, median round)"
    )
    for name, value in median.items():
        print(f"  {name:<18} {value:8.1f} us/call")
    added = median["journal"] - median["memory cache"]
    step = median["journal + 1 step"] - median["journal"]
    ratio = median["journal"] / median["memory cache"]
    print(
        f"journal added cost per idempotent call: {added / 1000:.3f} ms "
        f"(goal < 1 ms); ratio journal / memory cache {ratio:.2f}"
    )
    print(f"one recorded ctx.step adds: {step / 1000:.3f} ms")
    print(f"a replayed call costs: {median['journal replay'] / 1000:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    asyncio.run(bench(args.quick))


if __name__ == "__main__":
    main()
