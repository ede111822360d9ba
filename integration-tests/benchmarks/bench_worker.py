"""pilot-worker handler calls against a bare pilot-rpc method doing the same work.

Three servers, each a child process serving over ``tcp://127.0.0.1`` with
mutual TLS 1.3 (pilot-transport), this process being the client:

- ``bare rpc``: an ``RpcServer`` with one ``async`` unary method (the anchor);
- ``worker (all features)``: ``pilot-worker`` serving the same function as an
  ``async`` handler with an ACL allow-list naming the client, a sliding-window
  ``rate_per_caller`` (high enough never to refuse), ``max_concurrent`` (never
  reached), ``timeout_secs``, Prometheus metrics, a JSON log line per call
  (written to a file), and an OpenTelemetry server span (API only, no SDK);
- ``worker (sync handler)``: the same, with a ``def`` handler (thread pool);
  shown for information.

The request and the reply are ~220 bytes of msgpack. Figures: unary calls/s
at concurrency 1 (with p50) and 64, the ratio worker/bare (the features'
cost is ``1 - ratio``), and each server's idle RSS right after start.

The machine is shared and small: absolute numbers are noisy, ratios are what
count. The full run alternates servers over several rounds and reports the
median round.

Usage: ``uv run python integration-tests/benchmarks/bench_worker.py [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: the bare server (this script) must stay lean
    from pilot_worker.testing import WorkerProcess

PORT = 5000
REQUEST = {
    "id": 123456,
    "method": "search",
    "query": "q" * 120,
    "tags": ["alpha", "beta", "gamma"],
    "limit": 10,
    "score": 0.75,
}


def work(request: dict[str, Any]) -> dict[str, Any]:
    """The work both servers do: a ~220-byte reply derived from the request."""
    return {
        "id": request["id"],
        "query": request["query"],
        "hits": [request["limit"], 2, 3],
        "score": request["score"] * 2,
        "status": "ok",
    }


HANDLERS = """
from pilot_worker import pilot_handler

CLIENT = {client!r}


def _work(request):
    return {{
        "id": request["id"],
        "query": request["query"],
        "hits": [request["limit"], 2, 3],
        "score": request["score"] * 2,
        "status": "ok",
    }}


@pilot_handler("work", allow=[CLIENT], rate_per_caller=10_000_000, rate_window_secs=60,
               max_concurrent=4096, timeout_secs=30)
async def work(request):
    return _work(request)


@pilot_handler("work_sync", allow=[CLIENT], rate_per_caller=10_000_000, rate_window_secs=60,
               max_concurrent=4096, timeout_secs=30)
def work_sync(request):
    return _work(request)
"""


# ------------------------------------------------------------------ bare server


async def serve_bare(identity: str, trust: str, ready_file: str) -> None:
    from pilot_rpc import RpcServer
    from pilot_transport import open_transport

    server = RpcServer()

    @server.unary("work")
    async def _work(request: Any, ctx: Any) -> Any:
        return work(request)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with open_transport("tcp://127.0.0.1:0", identity=identity, trust=trust) as transport:
        listener = await transport.listen(PORT)
        async with server.serve_in_background(listener, drain_timeout=1.0):
            info = await transport.info()
            tmp = ready_file + ".tmp"
            Path(tmp).write_text(json.dumps({"endpoint": info.endpoint, "pid": os.getpid()}))
            os.replace(tmp, ready_file)
            await stop.wait()


# ------------------------------------------------------------------- the client


@dataclass
class Server:
    name: str
    peer: str
    method: str
    process: WorkerProcess
    rss_idle_mb: float


def _cpu_secs(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid``."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.asynccontextmanager
async def start_servers(tmp: Path) -> AsyncIterator[tuple[Any, list[Server]]]:
    from pilot_transport.testing import create_test_peers
    from pilot_worker.testing import run_worker_process

    peers = create_test_peers(tmp, ["client", "bare", "worker"])
    handlers = tmp / "bench_worker_handlers.py"
    handlers.write_text(HANDLERS.format(client=peers["client"].identity.node_id))
    # Both servers through pilot-worker's one launcher (the bare one runs this script).
    bare_args = [str(peers["bare"].identity_path), str(peers["bare"].trust_path)]
    worker_args = [
        "--transport",
        "tcp://127.0.0.1:0",
        "--identity",
        str(peers["worker"].identity_path),
        "--trust",
        str(peers["worker"].trust_path),
        "--handlers",
        str(handlers),
        "--metrics-port",
        "0",
        "--log-format",
        "json",
    ]
    async with (
        run_worker_process(
            bare_args,
            command=[sys.executable, __file__, "--serve-bare"],
            ready_file=tmp / "bare.ready",
            log_file=tmp / "bare.log",
            capture=False,
            ready_timeout=120,
            stop_timeout=20,
        ) as bare,
        run_worker_process(
            worker_args,
            ready_file=tmp / "worker.ready",
            log_file=tmp / "worker.log",
            capture=False,  # the worker writes its call log straight to the file
            ready_timeout=120,
            stop_timeout=20,
        ) as worker,
    ):
        peers.set_endpoint("bare", bare.info["endpoint"])
        peers.set_endpoint("worker", worker.info["endpoint"])
        # Let both settle after imports before reading the idle RSS.
        await asyncio.sleep(0.5)
        bare_rss, worker_rss = _rss_mb(bare.pid), _rss_mb(worker.pid)
        yield (
            peers,
            [
                Server("bare rpc", "bare", "work", bare, bare_rss),
                Server("worker (all features)", "worker", "work", worker, worker_rss),
                Server("worker (sync handler)", "worker", "work_sync", worker, worker_rss),
            ],
        )


async def run_c1(client: Any, server: Server, calls: int) -> tuple[float, float, float]:
    """(calls/s, p50 us, server CPU us per call) at concurrency 1."""
    latencies: list[float] = []
    cpu0 = _cpu_secs(server.process.pid)
    started = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        await client.call(server.peer, PORT, server.method, REQUEST, timeout=30)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    cpu = (_cpu_secs(server.process.pid) - cpu0) / calls * 1e6
    return calls / elapsed, statistics.median(latencies) * 1e6, cpu


async def run_cn(client: Any, server: Server, calls: int, concurrency: int) -> tuple[float, float]:
    """(calls/s, server CPU us per call) at ``concurrency``."""
    remaining = calls

    async def one() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await client.call(server.peer, PORT, server.method, REQUEST, timeout=30)

    cpu0 = _cpu_secs(server.process.pid)
    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return calls / elapsed, (_cpu_secs(server.process.pid) - cpu0) / calls * 1e6


async def bench(quick: bool) -> None:
    from pilot_rpc import RpcClient
    from pilot_transport import open_transport

    rounds = 1 if quick else 3
    c1_calls = 300 if quick else 3000
    cn_calls = 2000 if quick else 20000
    warmup = 100 if quick else 500
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp_dir:
        tmp = Path(tmp_dir)
        async with start_servers(tmp) as (peers, servers):
            client_peer = peers["client"]
            async with open_transport(
                "tcp://127.0.0.1:0", identity=client_peer.identity, trust=client_peer.trust
            ) as transport:
                client = RpcClient(transport)
                try:
                    reply = await client.call("bare", PORT, "work", REQUEST, timeout=30)
                    assert reply == work(REQUEST)
                    for server in servers:
                        got = await client.call(server.peer, PORT, server.method, REQUEST)
                        assert got == reply, server.name
                        for _ in range(warmup):
                            await client.call(server.peer, PORT, server.method, REQUEST)
                    results: dict[str, dict[str, list[float]]] = {
                        s.name: {"c1": [], "p50": [], "cpu1": [], "c64": [], "cpu64": []}
                        for s in servers
                    }
                    for _ in range(rounds):
                        for server in servers:
                            rate, p50, cpu = await run_c1(client, server, c1_calls)
                            results[server.name]["c1"].append(rate)
                            results[server.name]["p50"].append(p50)
                            results[server.name]["cpu1"].append(cpu)
                        for server in servers:
                            rate, cpu = await run_cn(client, server, cn_calls, 64)
                            results[server.name]["c64"].append(rate)
                            results[server.name]["cpu64"].append(cpu)
                finally:
                    await client.aclose()
            log_lines = sum(1 for _ in (tmp / "worker.log").open("rb"))
    report(servers, results, quick=quick, rounds=rounds, log_lines=log_lines)


def report(
    servers: list[Server],
    results: dict[str, dict[str, list[float]]],
    *,
    quick: bool,
    rounds: int,
    log_lines: int,
) -> None:
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    anchor = med["bare rpc"]
    print(
        f"pilot-worker vs bare pilot-rpc ({'quick' if quick else 'full'} run, "
        f"median of {rounds} round(s); {os.cpu_count()} CPUs, shared: ratios are what count)"
    )
    print(
        f"{'server':<24}{'c=1 p50':>10}{'c=1 calls/s':>13}{'c=64 calls/s':>14}"
        f"{'CPU/call c=64':>15}{'idle RSS':>11}"
    )
    for server in servers:
        m = med[server.name]
        print(
            f"{server.name:<24}{m['p50']:>8.0f}us{m['c1']:>13.0f}{m['c64']:>14.0f}"
            f"{m['cpu64']:>13.0f}us{server.rss_idle_mb:>9.1f}MB"
        )
    print("ratios (worker / bare rpc; feature cost = 1 - ratio):")
    for server in servers[1:]:
        m = med[server.name]
        r1 = m["c1"] / anchor["c1"]
        r64 = m["c64"] / anchor["c64"]
        cpu = anchor["cpu64"] / m["cpu64"]
        print(
            f"  {server.name:<22} c=1 {r1:.2f} (cost {1 - r1:+.0%})   "
            f"c=64 {r64:.2f} (cost {1 - r64:+.0%})   "
            f"server CPU/call bare/worker {cpu:.2f}"
        )
    print(f"worker call log lines written: {log_lines}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--serve-bare", nargs=2, metavar=("IDENTITY", "TRUST"))
    parser.add_argument("--ready-file", help="with --serve-bare: where to say it serves")
    args = parser.parse_args()
    if args.serve_bare:
        if not args.ready_file:
            parser.error("--serve-bare needs --ready-file")
        asyncio.run(serve_bare(*args.serve_bare, args.ready_file))
        return
    asyncio.run(bench(args.quick))


if __name__ == "__main__":
    main()
