"""pilot-rpc's per-call write path at c=1: synchronous ``try_write`` against the writer task.

One process, one event loop (``SelectorEventLoop`` with a selector that counts
its ``select`` calls), an ``RpcServer`` and an ``RpcClient`` over
``open_transport`` (TLS 1.3 mutual auth) on ``memory://`` and loopback
``tcp://``, sequential unary calls of a ~200-byte ``bytes`` echo:

- ``sync write``: what the client does now: a lone caller's frames go to the
  stream's ``try_write`` (encrypted and handed to the carrier without
  suspending);
- ``writer task`` (the anchor): the same stream with ``try_write`` hidden, so
  the client uses its previous path: on Python 3.11 it wakes the connection's
  writer task (one more event-loop iteration per call), on 3.12+ it writes
  from an eagerly started task.

Figures per call, client and server together (they share the process): CPU
time (``time.process_time``), wall time, and event-loop iterations (exact, not
timed). Variants alternate for several rounds; the best round of each is kept.

Usage: ``uv run python integration-tests/benchmarks/bench_rpc_write_path.py [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import selectors
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pilot_rpc import ClientOptions, RpcClient, RpcServer
from pilot_transport import Transport, open_transport
from pilot_transport.testing import TestPeers, create_test_peers

PORT = 5000
PAYLOAD = os.urandom(200)
_hub = itertools.count()


class _CountingSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.selects = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.selects += 1
        return super().select(timeout)


class _NoTryWrite:
    """A stream with ``try_write`` hidden: the client's previous write path."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.peer = stream.peer

    async def read(self, max_bytes: int = 65536, /) -> bytes:
        return await self._stream.read(max_bytes)

    async def write(self, data: bytes, /) -> None:
        await self._stream.write(data)

    async def write_eof(self) -> None:
        await self._stream.write_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _WriterTaskTransport:
    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    @property
    def url(self) -> str:
        return self._transport.url

    async def connect(self, peer: str, port: int, *, timeout: float | None = None) -> Any:
        return _NoTryWrite(await self._transport.connect(peer, port, timeout=timeout))


async def _run(
    peers: TestPeers, carrier: str, variant: str, calls: int, selector: _CountingSelector
) -> tuple[float, float, float]:
    url = f"memory://bench-write-{next(_hub)}" if carrier == "memory" else "tcp://127.0.0.1:0"
    server_t = await open_transport(
        url, identity=peers["server"].identity, trust=peers["server"].trust
    )
    client_t = await open_transport(
        url, identity=peers["client"].identity, trust=peers["client"].trust
    )
    try:
        listener = await server_t.listen(PORT)
        if carrier == "tcp":
            info = await server_t.info()
            assert info.endpoint is not None
            peers.set_endpoint("server", info.endpoint)
        server = RpcServer()

        @server.unary("echo")
        async def echo(request: Any, ctx: Any) -> Any:
            return request

        transport: Any = client_t if variant == "sync write" else _WriterTaskTransport(client_t)
        options = ClientOptions(keepalive_interval=None)
        async with server.serve_in_background(listener), RpcClient(transport, options=options) as c:
            for _ in range(50):
                await c.call("server", PORT, "echo", PAYLOAD, timeout=10)
            selects = selector.selects
            cpu = time.process_time()
            wall = time.perf_counter()
            for _ in range(calls):
                await c.call("server", PORT, "echo", PAYLOAD, timeout=10)
            wall = time.perf_counter() - wall
            cpu = time.process_time() - cpu
            loops = selector.selects - selects
        return cpu / calls * 1e6, wall / calls * 1e6, loops / calls
    finally:
        await client_t.aclose()
        await server_t.aclose()


def _measure(
    peers: TestPeers, carrier: str, variant: str, calls: int
) -> tuple[float, float, float]:
    selector = _CountingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    try:
        return loop.run_until_complete(_run(peers, carrier, variant, calls, selector))
    finally:
        loop.close()


def main(quick: bool, rounds: int) -> None:
    calls = 300 if quick else 3000
    variants = ("writer task", "sync write")
    with tempfile.TemporaryDirectory(prefix="bench-write-") as tmp:
        peers = create_test_peers(Path(tmp), ["client", "server"])
        best: dict[tuple[str, str], tuple[float, float, float]] = {}
        for carrier in ("memory", "tcp"):
            for r in range(rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for variant in order:
                    cpu, wall, loops = _measure(peers, carrier, variant, calls)
                    old = best.get((carrier, variant))
                    best[(carrier, variant)] = (
                        (cpu, wall, loops)
                        if old is None
                        else (min(old[0], cpu), min(old[1], wall), min(old[2], loops))
                    )
    print(
        f"pilot-rpc c=1 write path ({'quick' if quick else 'full'}; best of {rounds} alternating "
        f"round(s) x {calls} sequential unary calls; Python {sys.version.split()[0]}; "
        "client and server in one process, TLS 1.3 mutual auth)"
    )
    print(f"{'':24}{'CPU us/call':>12}{'wall us/call':>14}{'loop iterations/call':>22}")
    for carrier in ("memory", "tcp"):
        for variant in variants:
            cpu, wall, loops = best[(carrier, variant)]
            print(f"  {carrier + ' ' + variant:22}{cpu:>12.1f}{wall:>14.1f}{loops:>22.2f}")
    print("ratios (sync write / writer task):")
    for carrier in ("memory", "tcp"):
        new, old = best[(carrier, "sync write")], best[(carrier, "writer task")]
        print(
            f"  {carrier:7} CPU/call = {new[0] / old[0]:.2f}  wall/call = {new[1] / old[1]:.2f}  "
            f"loop iterations/call: {old[2]:.2f} -> {new[2]:.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (best kept)")
    args = parser.parse_args()
    main(args.quick, args.rounds or (2 if args.quick else 5))
