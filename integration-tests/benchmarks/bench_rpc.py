"""pilot-rpc against grpc.aio and raw asyncio framing, side by side, over mutual TLS.

Every figure runs the server in a child process (this process is the client),
over loopback TCP with TLS 1.3 mutual authentication, with a ~200-byte
msgpack request and reply:

- ``ours``: ``RpcServer`` / ``RpcClient`` over ``open_transport("tcp://...")``
  (Ed25519 identities, pilot-transport's TLS layer);
- ``raw``: ``asyncio.start_server`` / ``open_connection`` with TLS 1.3 mutual
  auth (the same Ed25519 certificates), ``[u32 length][u32 request id]`` frames,
  request-id multiplexing with futures, msgpack decode/encode per message,
  requests answered inline (no task per request): the floor for Python;
- ``grpc``: ``grpc.aio`` with generic bytes handlers (msgpack inside), mutual
  TLS with ECDSA P-256 certificates (gRPC's TLS stack is not given Ed25519).

Figures: unary calls/s at concurrency 1 and 64 with p50/p99 latency, server
streaming items/s on one call and over 64 concurrent calls; for ours also the
server's RSS with 10,000 calls in flight, and while one subscriber stops
reading a fast stream (it must stay flat: flow control).

Usage: ``uv run python integration-tests/benchmarks/bench_rpc.py [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import psutil
from pilot_rpc import CallContext, ClientOptions, RpcClient, RpcServer, ServerOptions
from pilot_transport import Identity, TrustStore, open_transport
from pilot_transport._tls import TLSConfig
from pilot_transport.testing import create_test_peers

PORT = 5000
STREAM_ITEM = {"seq": 0, "kind": "token", "text": "x" * 160, "done": False}
REQUEST = {
    "id": 123456,
    "method": "search",
    "query": "q" * 120,
    "tags": ["alpha", "beta", "gamma"],
    "limit": 10,
    "score": 0.75,
}
_HEAD = struct.Struct(">II")


def reply_for(request: Any) -> Any:
    return {"ok": True, "echo": request}


# =================================================================================================
# Servers (child process)
# =================================================================================================


async def serve_ours(directory: Path, stop: asyncio.Event) -> None:
    server = RpcServer(options=ServerOptions(max_concurrent_calls_per_connection=20_000))

    @server.unary("echo")
    async def echo(request: Any, ctx: CallContext) -> Any:
        return reply_for(request)

    @server.unary("hold")
    async def hold(request: float, ctx: CallContext) -> Any:
        await asyncio.sleep(request)
        return None

    @server.server_streaming("items")
    async def items(request: int, ctx: CallContext) -> AsyncIterator[Any]:
        item = dict(STREAM_ITEM)
        for i in range(request):
            item["seq"] = i
            yield item

    identity = Identity.load(directory / "server" / "identity.key")
    trust = TrustStore.open(directory / "server" / "trust.json")
    async with open_transport("tcp://127.0.0.1:0", identity=identity, trust=trust) as transport:
        listener = await transport.listen(PORT)
        print(f"READY {(await transport.info()).endpoint}", flush=True)
        async with server.serve_in_background(listener, drain_timeout=0.5):
            await stop.wait()


async def serve_raw(directory: Path, stop: asyncio.Event) -> None:
    identity = Identity.load(directory / "server" / "identity.key")
    trust = TrustStore.open(directory / "server" / "trust.json")
    _, server_context = TLSConfig(identity, trust).contexts()
    unpackb = msgpack.unpackb
    packb = msgpack.packb

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        try:
            while True:
                data = await reader.read(262144)
                if not data:
                    return
                buffer += data
                out: list[bytes] = []
                pos = 0
                while len(buffer) - pos >= 8:
                    length, request_id = _HEAD.unpack_from(buffer, pos)
                    if len(buffer) - pos - 8 < length:
                        break
                    request = unpackb(buffer[pos + 8 : pos + 8 + length])
                    pos += 8 + length
                    body = packb(reply_for(request))
                    out.append(_HEAD.pack(len(body), request_id) + body)
                del buffer[:pos]
                if out:
                    writer.write(b"".join(out))
                    await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=server_context)
    print(f"READY 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


async def serve_grpc(directory: Path, stop: asyncio.Event) -> None:
    import grpc

    unpackb = msgpack.unpackb
    packb = msgpack.packb

    async def echo(request: bytes, context: Any) -> bytes:
        return packb(reply_for(unpackb(request)))

    async def items(request: bytes, context: Any) -> AsyncIterator[bytes]:
        count = unpackb(request)
        item = dict(STREAM_ITEM)
        for i in range(count):
            item["seq"] = i
            yield packb(item)

    handler = grpc.method_handlers_generic_handler(
        "bench.Bench",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Items": grpc.unary_stream_rpc_method_handler(items),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [
            (
                (directory / "grpc-server.key").read_bytes(),
                (directory / "grpc-server.crt").read_bytes(),
            )
        ],
        root_certificates=(directory / "grpc-client.crt").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    print(f"READY 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(0.5)


def serve_main(kind: str, directory: Path) -> None:
    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await {"ours": serve_ours, "raw": serve_raw, "grpc": serve_grpc}[kind](directory, stop)

    asyncio.run(run())


# =================================================================================================
# Clients (this process)
# =================================================================================================


class RawClient:
    """Request-id multiplexing over one TLS connection: futures, one reader task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        buffer = bytearray()
        unpackb = msgpack.unpackb
        while True:
            data = await self.reader.read(262144)
            if not data:
                break
            buffer += data
            pos = 0
            while len(buffer) - pos >= 8:
                length, request_id = _HEAD.unpack_from(buffer, pos)
                if len(buffer) - pos - 8 < length:
                    break
                fut = self.pending.pop(request_id)
                fut.set_result(unpackb(buffer[pos + 8 : pos + 8 + length]))
                pos += 8 + length
            del buffer[:pos]

    async def call(self, request: Any) -> Any:
        self.next_id += 1
        request_id = self.next_id
        fut = asyncio.get_running_loop().create_future()
        self.pending[request_id] = fut
        body = msgpack.packb(request)
        self.writer.write(_HEAD.pack(len(body), request_id) + body)
        transport = self.writer.transport
        if transport.get_write_buffer_size() > 262144:
            await self.writer.drain()
        return await fut

    async def aclose(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        self.writer.close()


@dataclass
class Result:
    name: str
    c1_rate: float = 0.0
    c1_p50: float = 0.0
    c1_p99: float = 0.0
    c64_rate: float = 0.0
    c64_p50: float = 0.0
    c64_p99: float = 0.0
    c1_cpu: float = 0.0
    c64_cpu: float = 0.0
    stream1_cpu: float = 0.0
    stream64_cpu: float = 0.0
    stream1: float = 0.0
    stream64: float = 0.0
    extra: dict[str, str] = field(default_factory=lambda: {})


async def measure_unary(
    call: Callable[[], Awaitable[Any]], concurrency: int, duration: float, server_pid: int
) -> tuple[float, float, float, float]:
    """(calls/s, p50 us, p99 us, CPU us per call of client + server) of ``concurrency``
    workers calling for ``duration`` s. CPU per call is the figure least moved by load
    from elsewhere on the machine."""
    for _ in range(50):
        await call()
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    perf = time.perf_counter
    server = psutil.Process(server_pid)

    async def worker() -> None:
        while loop.time() < end:
            started = perf()
            await call()
            latencies.append(perf() - started)

    server_cpu = sum(server.cpu_times()[:2])
    client_cpu = time.process_time()
    started = perf()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = perf() - started
    cpu = sum(server.cpu_times()[:2]) - server_cpu + time.process_time() - client_cpu
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1e6
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e6
    return len(latencies) / elapsed, p50, p99, cpu / len(latencies) * 1e6


async def measure_both(
    call: Callable[[], Awaitable[Any]], plan: Plan, server_pid: int, result: Result
) -> None:
    result.c1_rate, result.c1_p50, result.c1_p99, result.c1_cpu = await measure_unary(
        call, 1, plan.duration, server_pid
    )
    result.c64_rate, result.c64_p50, result.c64_p99, result.c64_cpu = await measure_unary(
        call, 64, plan.duration, server_pid
    )


async def measure_stream(
    stream: Callable[[int], Awaitable[int]], calls: int, items: int, server_pid: int
) -> tuple[float, float]:
    """(items/s, CPU us per item of client + server) of ``calls`` concurrent streaming calls
    of ``items`` items each."""
    await stream(100)
    server = psutil.Process(server_pid)
    server_cpu = sum(server.cpu_times()[:2])
    client_cpu = time.process_time()
    started = time.perf_counter()
    counts = await asyncio.gather(*(stream(items) for _ in range(calls)))
    elapsed = time.perf_counter() - started
    cpu = sum(server.cpu_times()[:2]) - server_cpu + time.process_time() - client_cpu
    total = sum(counts)
    assert total == calls * items
    return total / elapsed, cpu / total * 1e6


@dataclass
class Plan:
    duration: float
    stream_items: int
    stream64_items: int
    inflight: int
    slow_seconds: float


async def run_ours(
    directory: Path, endpoint: str, plan: Plan, server_pid: int, *, memory: bool
) -> Result:
    result = Result("pilot-rpc")
    identity = Identity.load(directory / "client" / "identity.key")
    trust = TrustStore.open(directory / "client" / "trust.json")
    options = ClientOptions(max_calls_per_connection=20_000)
    async with (
        open_transport("tcp://127.0.0.1:0", identity=identity, trust=trust) as transport,
        RpcClient(transport, options=options) as client,
    ):

        async def call() -> Any:
            return await client.call("server", PORT, "echo", REQUEST)

        async def stream(n: int) -> int:
            count = 0
            async with client.stream("server", PORT, "items", n) as items:
                async for _ in items:
                    count += 1
            return count

        await measure_both(call, plan, server_pid, result)
        result.stream1, result.stream1_cpu = await measure_stream(
            stream, 1, plan.stream_items, server_pid
        )
        result.stream64, result.stream64_cpu = await measure_stream(
            stream, 64, plan.stream64_items, server_pid
        )
        if memory:
            await measure_memory(client, server_pid, plan, result)
    return result


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1e6


async def measure_memory(client: RpcClient, server_pid: int, plan: Plan, result: Result) -> None:
    # Calls in flight: each holds its handler task until released by its own sleep.
    baseline = rss_mb(server_pid)
    hold = 3.0 if plan.inflight > 5000 else 1.5
    tasks = [
        asyncio.create_task(client.call("server", PORT, "hold", hold, timeout=60))
        for _ in range(plan.inflight)
    ]
    await asyncio.sleep(hold * 0.6)
    peak = rss_mb(server_pid)
    await asyncio.gather(*tasks)
    result.extra["rss_inflight"] = (
        f"{plan.inflight} calls in flight: server RSS {baseline:.1f} -> {peak:.1f} MB "
        f"({(peak - baseline) * 1e3 / plan.inflight:.1f} KB/call)"
    )
    # A subscriber that stops reading a fast stream.
    async with client.stream("server", PORT, "items", 10**9) as items:
        await anext(items)
        samples = []
        for _ in range(4):
            await asyncio.sleep(plan.slow_seconds / 4)
            samples.append(rss_mb(server_pid))
    result.extra["rss_slow_reader"] = (
        "stalled subscriber: server RSS "
        + " -> ".join(f"{s:.1f}" for s in samples)
        + f" MB over {plan.slow_seconds:g} s"
    )


async def run_raw(directory: Path, endpoint: str, plan: Plan, server_pid: int) -> Result:
    result = Result("raw asyncio")
    identity = Identity.load(directory / "client" / "identity.key")
    trust = TrustStore.open(directory / "client" / "trust.json")
    client_context, _ = TLSConfig(identity, trust).contexts()
    host, port = endpoint.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=client_context, server_hostname="server"
    )
    client = RawClient(reader, writer)
    try:

        async def call() -> Any:
            return await client.call(REQUEST)

        await measure_both(call, plan, server_pid, result)
    finally:
        await client.aclose()
    return result


async def run_grpc(directory: Path, endpoint: str, plan: Plan, server_pid: int) -> Result:
    import grpc

    result = Result("grpc.aio")
    creds = grpc.ssl_channel_credentials(
        root_certificates=(directory / "grpc-server.crt").read_bytes(),
        private_key=(directory / "grpc-client.key").read_bytes(),
        certificate_chain=(directory / "grpc-client.crt").read_bytes(),
    )
    async with grpc.aio.secure_channel(
        endpoint, creds, options=[("grpc.ssl_target_name_override", "server")]
    ) as channel:
        echo = channel.unary_unary("/bench.Bench/Echo")
        items_method = channel.unary_stream("/bench.Bench/Items")

        async def call() -> Any:
            return msgpack.unpackb(await echo(msgpack.packb(REQUEST)))

        async def stream(n: int) -> int:
            count = 0
            async for raw in items_method(msgpack.packb(n)):
                msgpack.unpackb(raw)
                count += 1
            return count

        await measure_both(call, plan, server_pid, result)
        result.stream1, result.stream1_cpu = await measure_stream(
            stream, 1, plan.stream_items, server_pid
        )
        result.stream64, result.stream64_cpu = await measure_stream(
            stream, 64, plan.stream64_items, server_pid
        )
    return result


# =================================================================================================
# Orchestration
# =================================================================================================


def make_grpc_certs(directory: Path) -> None:
    """Self-signed ECDSA P-256 certificates for the gRPC anchor (each side pins the other's)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        key_path = directory / f"grpc-{name}.key"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        (directory / f"grpc-{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


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
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}" if value else "-"


def fmt_us(value: float) -> str:
    return f"{value:,.0f}" if value else "-"


def report(results: dict[str, Result], plan: Plan, quick: bool, rounds: int) -> None:
    ours, raw, grpc_ = results["ours"], results["raw"], results["grpc"]
    print()
    print(
        f"pilot-rpc benchmark ({'quick' if quick else 'full'}; best of {rounds} interleaved "
        f"round(s); {plan.duration:g} s per unary figure; {os.cpu_count()} CPUs; loopback TCP, "
        "TLS 1.3 mutual auth, client and server in separate processes)"
    )
    header = (
        f"{'':14} {'c=1 calls/s':>12} {'p50 us':>8} {'p99 us':>8} {'c=64 calls/s':>13} "
        f"{'p50 us':>8} {'p99 us':>8} {'stream 1 items/s':>17} {'stream 64 items/s':>18}"
    )
    print(header)
    print("-" * len(header))
    for r in (ours, raw, grpc_):
        print(
            f"{r.name:14} {fmt_rate(r.c1_rate):>12} {fmt_us(r.c1_p50):>8} {fmt_us(r.c1_p99):>8} "
            f"{fmt_rate(r.c64_rate):>13} {fmt_us(r.c64_p50):>8} {fmt_us(r.c64_p99):>8} "
            f"{fmt_rate(r.stream1):>17} {fmt_rate(r.stream64):>18}"
        )
    print()
    print("CPU per call / per item, client + server processes (us):")
    print(f"  {'':14} {'c=1':>8} {'c=64':>8} {'stream 1':>9} {'stream 64':>10}")
    for r in (ours, raw, grpc_):
        s1 = f"{r.stream1_cpu:9,.1f}" if r.stream1_cpu else f"{'-':>9}"
        s64 = f"{r.stream64_cpu:10,.1f}" if r.stream64_cpu else f"{'-':>10}"
        print(f"  {r.name:14} {r.c1_cpu:8,.0f} {r.c64_cpu:8,.0f} {s1} {s64}")
    print()
    for line in ours.extra.values():
        print(line)
    print()
    print("ratios (goal in brackets):")
    print(f"  c=64 calls/s  ours/grpc = {ours.c64_rate / grpc_.c64_rate:5.2f}  [>= 5]")
    print(f"  c=64 calls/s  ours/raw  = {ours.c64_rate / raw.c64_rate:5.2f}  [>= 0.6]")
    print(f"  c=1  p50      ours/raw  = {ours.c1_p50 / raw.c1_p50:5.2f}  [<= 1.3]")
    print(f"  c=1  calls/s  ours/grpc = {ours.c1_rate / grpc_.c1_rate:5.2f}")
    print(f"  c=1  CPU/call ours/raw  = {ours.c1_cpu / raw.c1_cpu:5.2f}")
    print(f"  c=64 CPU/call ours/raw  = {ours.c64_cpu / raw.c64_cpu:5.2f}")
    print(f"  stream 1      ours/grpc = {ours.stream1 / grpc_.stream1:5.2f}  [>= 5]")
    print(f"  stream 64     ours/grpc = {ours.stream64 / grpc_.stream64:5.2f}  [>= 5]")
    print(f"  stream 1  CPU/item grpc/ours = {grpc_.stream1_cpu / ours.stream1_cpu:5.2f}")
    print(f"  stream 64 CPU/item grpc/ours = {grpc_.stream64_cpu / ours.stream64_cpu:5.2f}")
    print(f"  c=64 CPU/call      grpc/ours = {grpc_.c64_cpu / ours.c64_cpu:5.2f}")


def best(results: list[Result]) -> Result:
    """Per figure, the best of the rounds (rates: highest; latencies: lowest)."""
    merged = Result(results[0].name)
    for name in ("c1_rate", "c64_rate", "stream1", "stream64"):
        setattr(merged, name, max(getattr(r, name) for r in results))
    for name in (
        "c1_p50", "c1_p99", "c64_p50", "c64_p99", "c1_cpu", "c64_cpu", "stream1_cpu",
        "stream64_cpu",
    ):  # fmt: skip
        setattr(merged, name, min(getattr(r, name) for r in results))
    for r in results:
        merged.extra.update(r.extra)
    return merged


async def run_all(quick: bool, rounds: int) -> None:
    plan = (
        Plan(duration=0.6, stream_items=3000, stream64_items=100, inflight=1000, slow_seconds=1.0)
        if quick
        else Plan(
            duration=4.0,
            stream_items=50_000,
            stream64_items=1000,
            inflight=10_000,
            slow_seconds=6.0,
        )
    )
    with tempfile.TemporaryDirectory(prefix="bench-rpc-") as tmp:
        directory = Path(tmp)
        peers = create_test_peers(directory, ["client", "server"])  # directory/<name>/...
        make_grpc_certs(directory)
        results: dict[str, list[Result]] = {"ours": [], "raw": [], "grpc": []}
        # Rounds interleave the three stacks so that load from elsewhere on the machine
        # spreads over all of them; the best round of each figure is reported.
        for round_number in range(rounds):
            for kind in ("ours", "raw", "grpc"):
                process, endpoint = start_server(kind, directory)
                try:
                    if kind == "ours":
                        peers.set_endpoint("server", endpoint)
                        last = round_number == rounds - 1
                        result = await run_ours(directory, endpoint, plan, process.pid, memory=last)
                    elif kind == "raw":
                        result = await run_raw(directory, endpoint, plan, process.pid)
                    else:
                        result = await run_grpc(directory, endpoint, plan, process.pid)
                    results[kind].append(result)
                finally:
                    stop_server(process)
        report({kind: best(rs) for kind, rs in results.items()}, plan, quick, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per stack (best kept)")
    parser.add_argument("--serve", choices=["ours", "raw", "grpc"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_main(args.serve, args.dir)
        return
    rounds = args.rounds or (1 if args.quick else 3)
    asyncio.run(run_all(args.quick, rounds))


if __name__ == "__main__":
    main()
