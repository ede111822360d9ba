"""Our pure-Python Pilot node (``pilotnode://``) against the Go daemon path, same run.

One network on loopback: our registry/beacon stand-in and two Go daemons from the
``pilotprotocol`` 1.18.0 wheel (``integration-tests/tests/_pilot_daemons.py``).
Figures, each measured in alternating rounds (best round reported):

- pilot-rpc (a ~200-byte unary echo; TLS 1.3 with pinned keys underneath) between two
  processes, c=1 and c=64 calls/s and bulk MB/s (64 KiB requests):
    * ``pilotnode://`` between two of our nodes (no daemon at all);
    * ``pilot://`` through two Go daemons (the anchor);
- raw streams between our node and a Go daemon (its built-in echo on port 7), c=1
  and c=64 round trips/s and bulk echo MB/s, against the same echo reached through
  two Go daemons (``pilot://`` raw stream, the anchor). pilot-rpc cannot run across
  the two kinds yet: the ``pilot://`` carrier frames its streams (credit flow control,
  half-close), ``pilotnode://`` does not.

Each figure prints its ratio to the anchor. Usage:
``uv run python integration-tests/benchmarks/bench_pilot_node.py [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pilot_node import Address, Node, NodeConfig, PilotStream, open_stream
from pilot_rpc import CallContext, ClientOptions, RpcClient, RpcServer, ServerOptions
from pilot_transport import Identity, TrustStore, open_transport
from pilot_transport._carriers.pilot import PilotCarrier
from pilot_transport.testing import create_test_peers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _pilot_daemons import PilotNet, pilot_binaries

PORT = 5000
REQUEST = {"op": "echo", "payload": "x" * 160, "n": 1}
BULK = b"b" * 65536


# ------------------------------------------------------------------ server child process


async def serve(url: str, identity_path: str, trust_path: str) -> None:
    server = RpcServer(options=ServerOptions(max_concurrent_calls_per_connection=20_000))

    @server.unary("echo")
    async def echo(request: Any, ctx: CallContext) -> Any:
        return {"ok": True, "echo": request}

    @server.unary("sink")
    async def sink(request: bytes, ctx: CallContext) -> int:
        return len(request)

    identity = Identity.load(identity_path)
    trust = TrustStore.open(trust_path)
    async with open_transport(url, identity=identity, trust=trust) as transport:
        listener = await transport.listen(PORT)
        print(f"READY {(await transport.info()).address}", flush=True)
        async with server.serve_in_background(listener, drain_timeout=0.5):
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# ------------------------------------------------------------------ measuring


async def rate(call: Callable[[], Awaitable[Any]], concurrency: int, seconds: float) -> float:
    for _ in range(20):
        await call()
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    count = 0

    async def worker() -> None:
        nonlocal count
        while loop.time() < end:
            await call()
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


async def rpc_figures(
    url: str, peers: Any, many: int, seconds: float, bulk_total: int
) -> dict[str, float]:
    client = peers["client"]
    async with (
        open_transport(url, identity=client.identity, trust=client.trust_path) as transport,
        RpcClient(transport, options=ClientOptions(max_calls_per_connection=20_000)) as rpc,
    ):

        async def call() -> Any:
            return await rpc.call("server", PORT, "echo", REQUEST)

        async def push() -> Any:
            return await rpc.call("server", PORT, "sink", BULK)

        c1 = await rate(call, 1, seconds)
        cm = await rate(call, many, seconds)
        started = time.perf_counter()
        for _ in range(bulk_total // len(BULK)):
            await push()
        mbps = bulk_total / (time.perf_counter() - started) / 1e6
    return {"c=1 calls/s": c1, f"c={many} calls/s": cm, "bulk MB/s": mbps}


async def echo_figures(
    open_echo: Callable[[], Awaitable[Any]], many: int, seconds: float, bulk_total: int
) -> dict[str, float]:
    streams = [await open_echo() for _ in range(many)]
    message = b"m" * 200

    async def round_trip(stream: Any) -> None:
        await stream.write(message)
        got = 0
        while got < len(message):
            chunk = await stream.read(65536)
            if not chunk:
                raise ConnectionError("echo ended")
            got += len(chunk)

    try:
        c1 = await rate(lambda: round_trip(streams[0]), 1, seconds)

        async def worker_rate() -> float:
            # One worker per stream: a stream is never shared.
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            count = 0

            async def one(stream: Any) -> None:
                nonlocal count
                while loop.time() < end:
                    await round_trip(stream)
                    count += 1

            started = time.perf_counter()
            await asyncio.gather(*(one(s) for s in streams))
            return count / (time.perf_counter() - started)

        cm = await worker_rate()
        stream = streams[0]
        data = b"z" * bulk_total

        async def drain() -> None:
            got = 0
            while got < bulk_total:
                got += len(await stream.read(65536))

        started = time.perf_counter()
        reader = asyncio.create_task(drain())
        await stream.write(data)
        await reader
        mbps = bulk_total / (time.perf_counter() - started) / 1e6
    finally:
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()
    return {"c=1 round trips/s": c1, f"c={many} round trips/s": cm, "bulk echo MB/s": mbps}


def start_server(url: str, root: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            url,
            "--identity",
            str(root / "server" / "identity.key"),
            "--trust",
            str(root / "server" / "trust.json"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split()[1]


def stop_server(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(Exception):
        assert proc.stdin is not None
        proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def show(
    title: str, ours: dict[str, float], anchor: dict[str, float], names: tuple[str, str]
) -> None:
    print(f"\n{title}")
    print(f"  {'figure':<24}{names[0]:>16}{names[1]:>16}{'ratio':>8}")
    for key in ours:
        ratio = ours[key] / anchor[key] if anchor[key] else float("nan")
        print(f"  {key:<24}{ours[key]:>16.1f}{anchor[key]:>16.1f}{ratio:>7.2f}x")


def best(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(r[k] for r in rounds) for k in rounds[0]}


async def main(quick: bool) -> None:
    rounds = 1 if quick else 3
    seconds = 0.3 if quick else 1.0
    many = 8 if quick else 64
    bulk_total = (1 if quick else 8) * 1024 * 1024
    with (
        tempfile.TemporaryDirectory(prefix="bench-pnode-") as tmp,
        PilotNet(Path(tmp) / "net", count=2) as net,
    ):
        root = Path(tmp) / "keys"
        peers = create_test_peers(root, ["client", "server"])
        node_url = f"pilotnode://127.0.0.1:{net.registry_port}"
        rpc_ours: list[dict[str, float]] = []
        rpc_anchor: list[dict[str, float]] = []
        for index in range(rounds):
            order = ["ours", "anchor"] if index % 2 == 0 else ["anchor", "ours"]
            for which in order:
                if which == "ours":
                    proc, address = start_server(node_url, root)
                    client_url = node_url
                else:
                    proc, address = start_server(f"pilot://{net.daemons[1].socket}", root)
                    client_url = f"pilot://{net.daemons[0].socket}"
                try:
                    peers.set_address("server", address)
                    figures = await rpc_figures(client_url, peers, many, seconds, bulk_total)
                finally:
                    stop_server(proc)
                (rpc_ours if which == "ours" else rpc_anchor).append(figures)
        echo_ours: list[dict[str, float]] = []
        echo_anchor: list[dict[str, float]] = []
        daemon_b = Address.parse(net.daemons[1].address)
        async with Node(
            NodeConfig(registry=f"127.0.0.1:{net.registry_port}", auto_approve=True)
        ) as node:
            await asyncio.to_thread(net.ctl, 1, "handshake", str(node.address), "bench")
            for _ in range(300):
                trusted = await asyncio.to_thread(net.ctl, 1, "trust")
                if any(int(p["node_id"]) == node.node_id for p in trusted.get("trusted") or []):
                    break
                await asyncio.sleep(0.1)
            carrier = PilotCarrier(net.daemons[0].socket)
            try:

                async def node_echo() -> PilotStream:
                    return await open_stream(node, daemon_b, 7, timeout=30)

                async def daemon_echo() -> Any:
                    return await carrier.open_raw_stream(net.daemons[1].address, 7)

                for index in range(rounds):
                    order = ["ours", "anchor"] if index % 2 == 0 else ["anchor", "ours"]
                    for which in order:
                        opener = node_echo if which == "ours" else daemon_echo
                        figures = await echo_figures(opener, many, seconds, bulk_total)
                        (echo_ours if which == "ours" else echo_anchor).append(figures)
            finally:
                await carrier.aclose()
        with open("/proc/loadavg", encoding="ascii") as f:
            load = f.read().split()[:3]
        print(
            f"pilot-node benchmark ({'quick' if quick else 'full'} run, best of {rounds}; "
            f"load average {' '.join(load)})"
        )
        show(
            "pilot-rpc: pilotnode:// between our nodes vs pilot:// through two Go daemons",
            best(rpc_ours),
            best(rpc_anchor),
            ("pilotnode://", "pilot:// 2 Go"),
        )
        show(
            "raw echo: our node -> Go daemon vs Go daemon -> Go daemon",
            best(echo_ours),
            best(echo_anchor),
            ("our node", "Go daemons"),
        )


def entry() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--identity", help=argparse.SUPPRESS)
    parser.add_argument("--trust", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.identity, args.trust))
        return
    if pilot_binaries() is None:
        print("the pilotprotocol wheel is not installed: nothing to compare against")
        return
    asyncio.run(main(args.quick))


if __name__ == "__main__":
    entry()
