"""pilot-transport over tcp:// against raw asyncio TLS 1.3, side by side.

Two processes each time (this one is the client, a child serves), the same
Ed25519 certificates and the same length-prefixed framing code on both sides:

- anchor: ``asyncio.start_server`` / ``asyncio.open_connection`` with TLS 1.3
  mutual-auth SSL contexts;
- ours: ``open_transport("tcp://127.0.0.1:0")``, ``listen`` / ``connect``.

Figures: 200-byte ping-pong round trips per second, bulk MB/s with 64 KiB
writes, and new-connection setup time (connect + handshake + first round
trip; closing is not timed). Anchor and ours alternate for several rounds;
the best round of each is reported with the ratio ours/anchor.

Usage: ``uv run python integration-tests/benchmarks/bench_transport.py [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from pilot_transport import Identity, SecureStream, TrustStore, open_transport
from pilot_transport._tls import TLSConfig
from pilot_transport.testing import create_test_peers

PORT = 4000
PING_SIZE = 200
BULK_WRITE = 64 * 1024
_LEN = struct.Struct(">I")
_BULK_DONE = 0xFFFFFFFF


# -- one framing layer for both sides ---------------------------------------------------


class Conn:
    """Length-prefixed frames over any read(n)/write(data) pair of coroutines."""

    def __init__(
        self,
        read: Callable[[int], Awaitable[bytes]],
        write: Callable[[bytes], Awaitable[None]],
        close: Callable[[], Awaitable[None]],
    ) -> None:
        self._read = read
        self._write = write
        self.close = close
        self._buffer = bytearray()

    async def read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = await self._read(262144)
            if not data:
                raise EOFError
            self._buffer += data
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    async def read_frame(self) -> bytes:
        (size,) = _LEN.unpack(await self.read_exactly(4))
        if size == _BULK_DONE:
            return b""
        return await self.read_exactly(size)

    async def write_frame(self, payload: bytes) -> None:
        await self._write(_LEN.pack(len(payload)) + payload)


def anchor_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Conn:
    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def close() -> None:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    return Conn(reader.read, write, close)


def ours_conn(stream: SecureStream) -> Conn:
    return Conn(stream.read, stream.write, stream.aclose)


async def serve_conn(conn: Conn) -> None:
    """Echo ping frames; for a bulk transfer count bytes and answer with the total."""
    try:
        while True:
            (size,) = _LEN.unpack(await conn.read_exactly(4))
            if size == _BULK_DONE:
                (total,) = struct.unpack(">Q", await conn.read_exactly(8))
                received = 0
                while received < total:
                    (chunk,) = _LEN.unpack(await conn.read_exactly(4))
                    await conn.read_exactly(chunk)
                    received += chunk
                await conn.write_frame(struct.pack(">Q", received))
                continue
            await conn.write_frame(await conn.read_exactly(size))
    except (EOFError, ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


# -- server process -----------------------------------------------------------------------


async def serve(kind: str, directory: Path) -> None:
    identity = Identity.load(directory / "bench-server" / "identity.key")
    trust = TrustStore.open(directory / "bench-server" / "trust.json")
    tasks: set[asyncio.Task[None]] = set()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if kind == "anchor":
        _, server_context = TLSConfig(identity, trust).contexts()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await serve_conn(anchor_conn(reader, writer))

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        print(f"READY 127.0.0.1:{port}", flush=True)
        await stop.wait()
        server.close()
        return
    async with open_transport("tcp://127.0.0.1:0", identity=identity, trust=trust) as transport:
        listener = await transport.listen(PORT)
        print(f"READY {(await transport.info()).endpoint}", flush=True)

        async def accept_loop() -> None:
            async for stream in listener:
                task = asyncio.create_task(serve_conn(ours_conn(stream)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        acceptor = asyncio.create_task(accept_loop())
        await stop.wait()
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()


# -- client side ---------------------------------------------------------------------------


@dataclass
class Figures:
    pingpong: float = 0.0  # round trips per second (higher is better)
    bulk: float = 0.0  # MB/s (higher is better)
    setup: float = float("inf")  # seconds per new connection (lower is better)


class Side:
    def __init__(self, kind: str, directory: Path, endpoint: str) -> None:
        self.kind = kind
        self.directory = directory
        self.endpoint = endpoint
        self.identity = Identity.load(directory / "bench-client" / "identity.key")
        self.trust = TrustStore.open(directory / "bench-client" / "trust.json")
        self.client_context, _ = TLSConfig(self.identity, self.trust).contexts()
        self.transport = None

    async def __aenter__(self) -> Side:
        if self.kind == "ours":
            self.transport = await open_transport(
                "tcp://127.0.0.1:0", identity=self.identity, trust=self.trust
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.transport is not None:
            await self.transport.aclose()

    async def connect(self) -> Conn:
        if self.transport is not None:
            return ours_conn(await self.transport.connect("bench-server", PORT))
        host, port = self.endpoint.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=self.client_context, server_hostname="bench-server"
        )
        return anchor_conn(reader, writer)


async def measure(side: Side, figures: Figures, *, pings: int, bulk_mb: int, setups: int) -> None:
    payload = os.urandom(PING_SIZE)
    conn = await side.connect()
    for _ in range(50):  # warm up
        await conn.write_frame(payload)
        await conn.read_frame()
    start = time.perf_counter()
    for _ in range(pings):
        await conn.write_frame(payload)
        await conn.read_frame()
    figures.pingpong = max(figures.pingpong, pings / (time.perf_counter() - start))

    chunk = os.urandom(BULK_WRITE - 4)
    total = bulk_mb * 1024 * 1024 // len(chunk) * len(chunk)
    frame = _LEN.pack(len(chunk)) + chunk
    start = time.perf_counter()
    await conn._write(_LEN.pack(_BULK_DONE) + struct.pack(">Q", total))
    for _ in range(total // len(chunk)):
        await conn._write(frame)
    (received,) = struct.unpack(">Q", await conn.read_frame())
    assert received == total
    figures.bulk = max(figures.bulk, total / (time.perf_counter() - start) / 1e6)
    await conn.close()

    timed = 0.0
    for _ in range(setups):
        start = time.perf_counter()
        fresh = await side.connect()
        await fresh.write_frame(payload)
        await fresh.read_frame()
        timed += time.perf_counter() - start
        await fresh.close()  # not timed: asyncio's TLS close waits for the peer's close
    figures.setup = min(figures.setup, timed / setups)


def start_server(kind: str, directory: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--dir", str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("READY "):
        process.kill()
        process.wait()
        raise RuntimeError(f"{kind} server did not start: {line!r}")
    return process, line.split(" ", 1)[1]


def stop_server(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def run(quick: bool) -> None:
    rounds = 2 if quick else 5
    pings = 1000 if quick else 10000
    bulk_mb = 16 if quick else 256
    setups = 20 if quick else 200
    results = {"anchor": Figures(), "ours": Figures()}
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        directory = Path(tmp)
        peers = create_test_peers(directory, ["bench-client", "bench-server"])
        servers = {kind: start_server(kind, directory) for kind in ("anchor", "ours")}
        try:
            peers.set_endpoint("bench-server", servers["ours"][1])
            for _ in range(rounds):
                for kind in ("anchor", "ours"):
                    async with Side(kind, directory, servers[kind][1]) as side:
                        await measure(
                            side, results[kind], pings=pings, bulk_mb=bulk_mb, setups=setups
                        )
        finally:
            for process, _ in servers.values():
                stop_server(process)
    anchor, ours = results["anchor"], results["ours"]
    mode = "quick" if quick else "full"
    print(
        f"pilot-transport tcp:// vs raw asyncio TLS 1.3 mutual auth ({mode}: {rounds} rounds, "
        f"best of each; {pings} pings, {bulk_mb} MB bulk, {setups} setups per round)"
    )
    print(f"{'metric':<34}{'anchor':>12}{'ours':>12}{'ratio':>9}  goal")
    rows = [
        ("ping-pong 200 B (round trips/s)", anchor.pingpong, ours.pingpong, ">= 0.8", False),
        ("bulk, 64 KiB writes (MB/s)", anchor.bulk, ours.bulk, ">= 0.8", False),
        (
            "new connection + 1 round trip (ms)",
            anchor.setup * 1e3,
            ours.setup * 1e3,
            "<= 1.2",
            True,
        ),
    ]
    for name, base, value, goal, _lower_is_better in rows:
        print(f"{name:<34}{base:>12.1f}{value:>12.1f}{value / base:>9.2f}  {goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--serve", choices=["anchor", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.dir))
    else:
        asyncio.run(run(args.quick))


if __name__ == "__main__":
    main()
