"""pilot-channels pub/sub against Redis pub/sub, in one run.

Every party is its own process on this machine:

- ``pilot-channels``: a broker worker (``python -m pilot_worker --plugin
  channels``) on ``tcp://127.0.0.1`` with mutual TLS 1.3, one publisher
  process (``PilotPublisher``) and N subscriber processes (``PilotChannel``,
  ``block`` slow-consumer policy so that nothing is dropped and the publisher
  runs at the pace of the slowest subscriber).
- ``redis``: Debian's ``redis-server`` started here on a free loopback port
  (plaintext, no persistence), one publisher and N subscribers using redis-py's
  asyncio client.

Workload: 100-byte payloads carrying the publish time. *Throughput*: the
publisher sends as fast as it can with up to 256 publishes in flight (ours are
grouped into requests by ``PilotPublisher``; Redis gets pipelines of the same
size); deliveries/s = N x events / (last delivery - first publish). *Latency*:
a paced phase (one publish at a time at a fixed rate) gives publish-to-delivery
p50/p99 over every delivery. *Durable* (ours only): throughput of a durable
topic (SQLite log) with one subscriber, then a subscriber is killed with
SIGKILL, a backlog is published, and the subscriber is restarted with its last
offset: we report the time to its first resumed event and to catching up, and
check that nothing was lost or delivered twice.

The machine is small and shared: absolute numbers are noisy, ratios are what
count.

Usage: ``uv run python integration-tests/benchmarks/bench_channels.py [--quick]``
(needs ``redis-server`` on PATH: ``apt-get install -y redis-server``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pilot_worker.testing import WorkerProcess

PAYLOAD_SIZE = 100
TOPIC = "bench.events"
DURABLE_TOPIC = "durable.events"
IN_FLIGHT = 256
LINE_LIMIT = 64 * 1024 * 1024  # a result line carries every latency of one subscriber
_TS = struct.Struct("<dB")
KIND_DATA, KIND_END, KIND_WARM_UP = 0, 1, 2


def payload(kind: int = KIND_DATA) -> bytes:
    head = _TS.pack(time.time(), kind)
    return head + b"p" * (PAYLOAD_SIZE - len(head))


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- children


class Receiver:
    """Collects latencies of data events until the end marker."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.first: float | None = None
        self.last = 0.0

    def on(self, data: bytes) -> bool:
        now = time.time()
        sent, kind = _TS.unpack_from(data)
        if kind == KIND_END:
            return False
        if kind == KIND_WARM_UP:
            return True
        if self.first is None:
            self.first = now
        self.last = now
        self.latencies.append(round(now - sent, 6))
        return True

    def report(self) -> None:
        emit("result", count=len(self.latencies), first=self.first, last=self.last,
             latencies=self.latencies)  # fmt: skip


async def child_sub_pilot(args: argparse.Namespace) -> None:
    from pilot_channels import PilotChannel, SubscribeOptions
    from pilot_transport import open_transport

    options = SubscribeOptions(queue_size=8192, policy="block")
    async with (
        open_transport("tcp://127.0.0.1:0", identity=args.identity, trust=args.trust) as t,
        PilotChannel(t, TOPIC, peer="broker", options=options) as channel,
    ):
        emit("ready")
        for _phase in range(2):
            receiver = Receiver()
            async for event in channel:
                if not receiver.on(event.payload):
                    break
            receiver.report()


async def child_sub_redis(args: argparse.Namespace) -> None:
    import redis.asyncio as redis

    client = redis.Redis(host="127.0.0.1", port=args.redis_port)
    pubsub = client.pubsub()
    await pubsub.subscribe(TOPIC)
    emit("ready")
    for _phase in range(2):
        receiver = Receiver()
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            if not receiver.on(message["data"]):
                break
        receiver.report()
    await pubsub.aclose()
    await client.aclose()


async def paced(send: Any, count: int, rate: float) -> None:
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(payload())


async def child_pub_pilot(args: argparse.Namespace) -> None:
    from pilot_channels import PilotPublisher, PublisherOptions
    from pilot_transport import open_transport

    async with (
        open_transport("tcp://127.0.0.1:0", identity=args.identity, trust=args.trust) as t,
        PilotPublisher(t, peer="broker", options=PublisherOptions(timeout_secs=120)) as pub,
    ):
        topic = args.topic
        await pub.publish(topic, payload(KIND_WARM_UP))  # connection set-up, not timed
        emit("ready")
        sys.stdin.readline()
        sem = asyncio.Semaphore(IN_FLIGHT)

        async def one() -> None:
            async with sem:
                await pub.publish(topic, payload())

        started = time.time()
        await asyncio.gather(*(one() for _ in range(args.count)))
        ended = time.time()
        await pub.publish(topic, payload(KIND_END))
        emit("burst", started=started, ended=ended)
        if args.paced:
            sys.stdin.readline()
            await paced(lambda p: pub.publish(topic, p), args.paced, args.rate)
            await pub.publish(topic, payload(KIND_END))
            emit("paced")


async def child_pub_redis(args: argparse.Namespace) -> None:
    import redis.asyncio as redis

    client = redis.Redis(host="127.0.0.1", port=args.redis_port)
    await client.ping()
    emit("ready")
    sys.stdin.readline()
    started = time.time()
    left = args.count
    while left:
        n = min(IN_FLIGHT, left)
        pipe = client.pipeline(transaction=False)
        for _ in range(n):
            pipe.publish(TOPIC, payload())
        await pipe.execute()
        left -= n
    ended = time.time()
    await client.publish(TOPIC, payload(KIND_END))
    emit("burst", started=started, ended=ended)
    sys.stdin.readline()
    await paced(lambda p: client.publish(TOPIC, p), args.paced, args.rate)
    await client.publish(TOPIC, payload(KIND_END))
    emit("paced")
    await client.aclose()


async def child_durable_sub(args: argparse.Namespace) -> None:
    """Durable subscriber: reports its ready time, first event and catch-up."""
    from pilot_channels import PilotChannel, SubscribeOptions
    from pilot_transport import open_transport

    spawned = float(args.spawned)
    options = SubscribeOptions(resume_after=args.resume_after, queue_size=4096)
    async with open_transport("tcp://127.0.0.1:0", identity=args.identity, trust=args.trust) as t:
        opened = time.time()
        async with PilotChannel(t, DURABLE_TOPIC, peer="broker", options=options) as channel:
            ready = time.time()
            emit("ready", last_offset=channel.last_offset)
            offsets: list[int] = []
            first = None
            while len(offsets) < args.count:
                event = await channel.recv(timeout=120)
                if first is None:
                    first = time.time()
                assert event.offset is not None
                offsets.append(event.offset)
            done = time.time()
            consecutive = offsets == list(range(offsets[0], offsets[0] + len(offsets)))
            emit("result", spawned=spawned, opened=opened, ready=ready, first=first,
                 done=done, offsets=[offsets[0], offsets[-1]], consecutive=consecutive)  # fmt: skip


def child_main(args: argparse.Namespace) -> None:
    role = {
        "sub-pilot": child_sub_pilot,
        "sub-redis": child_sub_redis,
        "pub-pilot": child_pub_pilot,
        "pub-redis": child_pub_redis,
        "durable-sub": child_durable_sub,
    }[args.role]
    asyncio.run(role(args))


# --------------------------------------------------------------------------- parent


class Child:
    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name

    @classmethod
    async def start(cls, name: str, log: Path, *argv: str) -> Child:
        with open(log, "ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, *argv, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=stderr, limit=LINE_LIMIT,
            )  # fmt: skip
        return cls(process, name)

    async def line(self, timeout: float = 180.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not raw:
            raise RuntimeError(f"{self.name} exited without output (see its log)")
        return json.loads(raw)

    async def expect(self, event: str, timeout: float = 180.0) -> dict[str, Any]:
        while True:
            msg = await self.line(timeout)
            if msg["event"] == event:
                return msg

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Bench:
    def __init__(self, workdir: Path, quick: bool, subscribers: int) -> None:
        self.dir = workdir
        self.quick = quick
        self.subs = subscribers
        self.count = 2000 if quick else 20000
        self.paced = 150 if quick else 1000
        self.rate = 300.0 if quick else 500.0
        self.children: list[Child] = []
        self.broker: WorkerProcess | None = None
        self.script = str(Path(__file__).resolve())

    async def child(self, name: str, *argv: str) -> Child:
        c = await Child.start(name, self.dir / f"{name}.log", self.script, *argv)
        self.children.append(c)
        return c

    async def close(self) -> None:
        for c in reversed(self.children):
            await c.stop(signal.SIGKILL)
        await self.stop_broker()

    async def run_pubsub(self, sub_argv: list[list[str]], pub_argv: list[str]) -> dict[str, float]:
        subs = await asyncio.gather(
            *(self.child(f"sub{i}", *argv) for i, argv in enumerate(sub_argv))
        )
        for s in subs:
            await s.expect("ready")
        pub = await self.child("pub", *pub_argv)
        await pub.expect("ready")
        pub.go()
        burst = await pub.expect("burst")
        results = [await s.expect("result") for s in subs]
        delivered = sum(r["count"] for r in results)
        last = max(r["last"] for r in results)
        out = {
            "deliveries_per_s": delivered / (last - burst["started"]),
            "expected": self.count * len(subs),
            "delivered": delivered,
            "burst_p50_ms": 1000 * pct([x for r in results for x in r["latencies"]], 0.5),
            "burst_p99_ms": 1000 * pct([x for r in results for x in r["latencies"]], 0.99),
        }
        pub.go()
        await pub.expect("paced")
        paced = [await s.expect("result") for s in subs]
        lat = [x for r in paced for x in r["latencies"]]
        out["p50_ms"] = 1000 * pct(lat, 0.5)
        out["p99_ms"] = 1000 * pct(lat, 0.99)
        out["paced_delivered"] = len(lat)
        for c in [pub, *subs]:
            await c.stop()
            self.children.remove(c)
        return out

    async def start_broker(self, peers: Any, port: int) -> None:
        from pilot_worker.testing import start_worker_process

        broker = start_worker_process(
            [
                "--transport", f"tcp://127.0.0.1:{port}",
                "--identity", str(peers["broker"].identity_path),
                "--trust", str(peers["broker"].trust_path),
                "--plugin", "channels", "--channels-durable", "durable.>",
                "--channels-db", str(self.dir / "events.db"),
                "--no-call-log", "--log-level", "WARNING",
            ],
            ready_file=self.dir / "broker.ready",
            log_file=self.dir / "broker.log",
            name="broker",
        )  # fmt: skip
        self.broker = broker
        await broker.wait_ready(120)

    async def stop_broker(self) -> None:
        if self.broker is not None:
            await self.broker.stop(20)
            self.broker = None

    async def pilot(self) -> tuple[dict[str, float], dict[str, Any]]:
        from pilot_transport.testing import create_test_peers

        port = free_port()
        names = ["broker", "pub", *(f"sub{i}" for i in range(self.subs))]
        peers = create_test_peers(
            self.dir / "peers", names, endpoints={"broker": f"127.0.0.1:{port}"}
        )

        def ident(name: str) -> list[str]:
            return ["--identity", str(peers[name].identity_path),
                    "--trust", str(peers[name].trust_path)]  # fmt: skip

        await self.start_broker(peers, port)
        pubsub = await self.run_pubsub(
            [["--role", "sub-pilot", *ident(f"sub{i}")] for i in range(self.subs)],
            ["--role", "pub-pilot", *ident("pub"), "--count", str(self.count),
             "--paced", str(self.paced), "--rate", str(self.rate), "--topic", TOPIC],
        )  # fmt: skip
        durable = await self.durable(ident)
        return pubsub, durable

    async def durable(self, ident: Any) -> dict[str, Any]:
        n = self.count // 2
        backlog = self.count // 4
        # 1. Throughput of a durable topic with one live subscriber.
        # It receives the publisher's warm-up event, n events and the end marker.
        sub = await self.child("dsub", "--role", "durable-sub", *ident("sub0"),
                               "--count", str(n + 2), "--spawned", str(time.time()))  # fmt: skip
        await sub.expect("ready")
        pub = await self.child("dpub", "--role", "pub-pilot", *ident("pub"),
                               "--count", str(n), "--topic", DURABLE_TOPIC)  # fmt: skip
        await pub.expect("ready")
        pub.go()
        burst = await pub.expect("burst")
        live = await sub.expect("result")
        publish_rate = n / (burst["ended"] - burst["started"])
        delivery_rate = n / (live["done"] - burst["started"])
        last_offset = live["offsets"][1]
        # 2. Kill the subscriber, publish a backlog, restart it from its last offset.
        await sub.stop(signal.SIGKILL)
        self.children.remove(sub)
        await pub.stop()
        self.children.remove(pub)
        pub = await self.child("dpub2", "--role", "pub-pilot", *ident("pub"),
                               "--count", str(backlog), "--topic", DURABLE_TOPIC)  # fmt: skip
        await pub.expect("ready")
        pub.go()
        await pub.expect("burst")
        spawned = time.time()
        sub = await self.child("dsub2", "--role", "durable-sub", *ident("sub0"),
                               "--count", str(backlog + 2), "--spawned", str(spawned),
                               "--resume-after", str(last_offset))  # fmt: skip
        resumed = await sub.expect("result")
        for c in (pub, sub):
            await c.stop()
            self.children.remove(c)
        return {
            "events": n,
            "publish_per_s": publish_rate,
            "delivery_per_s": delivery_rate,
            "backlog": backlog + 2,
            "first_after_spawn_ms": 1000 * (resumed["first"] - spawned),
            "first_after_subscribe_ms": 1000 * (resumed["first"] - resumed["opened"]),
            "catch_up_ms": 1000 * (resumed["done"] - resumed["first"]),
            "no_loss_no_dup": resumed["consecutive"] and resumed["offsets"][0] == last_offset + 1,
        }

    async def redis(self) -> dict[str, float]:
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit(
                "redis-server is not installed (the anchor): apt-get install -y redis-server"
            )
        port = free_port()
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - closed below
        process = await asyncio.create_subprocess_exec(
            server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), stdout=log, stderr=log,
        )  # fmt: skip
        try:
            import redis.asyncio as redis

            client = redis.Redis(host="127.0.0.1", port=port)
            async with asyncio.timeout(30):
                while True:
                    try:
                        await client.ping()
                        break
                    except (OSError, redis.ConnectionError):
                        await asyncio.sleep(0.05)
            await client.aclose()
            rp = ["--redis-port", str(port)]
            return await self.run_pubsub(
                [["--role", "sub-redis", *rp] for _ in range(self.subs)],
                ["--role", "pub-redis", *rp, "--count", str(self.count),
                 "--paced", str(self.paced), "--rate", str(self.rate)],
            )  # fmt: skip
        finally:
            process.terminate()
            await process.wait()
            log.close()


def table(ours: dict[str, float], anchor: dict[str, float], durable: dict[str, Any], n: int) -> str:
    rows = [
        ("", "pilot-channels", "redis pub/sub", "ratio"),
        ("deliveries/s (burst)", f"{ours['deliveries_per_s']:,.0f}",
         f"{anchor['deliveries_per_s']:,.0f}",
         f"{ours['deliveries_per_s'] / anchor['deliveries_per_s']:.2f}"),
        ("delivered / expected", f"{ours['delivered']}/{ours['expected']}",
         f"{anchor['delivered']}/{anchor['expected']}", ""),
        ("burst latency p50 ms", f"{ours['burst_p50_ms']:.1f}", f"{anchor['burst_p50_ms']:.1f}",
         ""),
        ("burst latency p99 ms", f"{ours['burst_p99_ms']:.1f}", f"{anchor['burst_p99_ms']:.1f}",
         ""),
        ("paced latency p50 ms", f"{ours['p50_ms']:.2f}", f"{anchor['p50_ms']:.2f}",
         f"{ours['p50_ms'] / anchor['p50_ms']:.1f}x"),
        ("paced latency p99 ms", f"{ours['p99_ms']:.2f}", f"{anchor['p99_ms']:.2f}",
         f"{ours['p99_ms'] / anchor['p99_ms']:.1f}x"),
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"durable topic ({durable['events']} events, 1 subscriber, SQLite log):")
    lines.append(f"  publish {durable['publish_per_s']:,.0f} events/s, "
                 f"delivered {durable['delivery_per_s']:,.0f} events/s "
                 f"({durable['delivery_per_s'] / (ours['deliveries_per_s'] / n):.2f} "
                 "of one non-durable subscriber's share)")  # fmt: skip
    lines.append(f"  resume after kill -9 with a backlog of {durable['backlog']}: first event "
                 f"{durable['first_after_spawn_ms']:.0f} ms after process spawn "
                 f"({durable['first_after_subscribe_ms']:.0f} ms after opening the channel), "
                 f"caught up {durable['catch_up_ms']:.0f} ms later; "
                 f"no loss, no duplicate: {durable['no_loss_no_dup']}")  # fmt: skip
    return "\n".join(lines)


async def parent(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-channels-") as tmp:
        bench = Bench(Path(tmp), args.quick, args.subscribers)
        try:
            ours, durable = await bench.pilot()
            await bench.stop_broker()
            anchor = await bench.redis()
        finally:
            await bench.close()
    print(f"pilot-channels vs Redis pub/sub: 1 publisher, {args.subscribers} subscribers, "
          f"{PAYLOAD_SIZE}-byte events, separate processes, loopback "
          f"({bench.count} events burst, {bench.paced} paced at {bench.rate:.0f}/s)")  # fmt: skip
    print("ours: tcp:// + mutual TLS 1.3 + msgpack RPC; Redis: plaintext RESP")
    print(table(ours, anchor, durable, args.subscribers))
    ratio = ours["deliveries_per_s"] / anchor["deliveries_per_s"]
    print(f"\nratio deliveries/s ours/redis: {ratio:.2f} (goal >= 0.5)")
    print(f"ratio p99 paced latency ours/redis: {ours['p99_ms'] / anchor['p99_ms']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--subscribers", type=int, default=None)
    parser.add_argument("--role")
    parser.add_argument("--identity")
    parser.add_argument("--trust")
    parser.add_argument("--redis-port", type=int)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--paced", type=int, default=0)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--topic", default=TOPIC)
    parser.add_argument("--spawned", default="0")
    parser.add_argument("--resume-after", type=int, default=None)
    args = parser.parse_args()
    if args.role:
        child_main(args)
        return
    if args.subscribers is None:
        args.subscribers = 3 if args.quick else 10
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(parent(args))


if __name__ == "__main__":
    main()
