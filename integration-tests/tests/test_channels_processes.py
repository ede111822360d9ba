"""pilot-channels between real processes: a broker worker (``pilot-worker --plugin
channels``) over tcp://, subscriber processes, a publisher in this process.

Covers wildcards, the topic ACL, each slow-consumer policy, durable resume after
kill -9 of a subscriber and after a restart of the broker worker, auto-reconnect
and the Pilot daemon adapter (against the daemon double).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pilot_channels import (
    ChannelPermissionError,
    PilotPublisher,
    PublisherOptions,
    ReconnectPolicy,
    publish_once,
)
from pilot_transport import open_transport
from pilot_transport.testing import TestPeers, create_test_peers
from pilot_transport.testing._daemon_double import PilotDaemonDouble
from pilot_worker.testing import WorkerProcess, start_worker_process

PROC = Path(__file__).with_name("_channels_proc.py")
WAIT = 60.0
NAMES = ["broker", "pub", "sub1", "sub2", "sub3", "sub4", "intruder"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process: JSON status lines on stdout, logs in a file."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log

    @classmethod
    async def start(cls, log: Path, *argv: str) -> Proc:
        with open(log, "ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=stderr
            )
        return cls(process, log)

    async def status(self, timeout: float = WAIT) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        assert line, f"process exited without a status line; its log:\n{self.log.read_text()}"
        return json.loads(line)

    async def wait_for_log(self, text: str, count: int = 1, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while self.log.read_text().count(text) < count:
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut short by kill -9
            events.append(json.loads(line))
    return events


async def wait_events(path: Path, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while len(events := read_events(path)) < count:
            await asyncio.sleep(0.05)
    return events


async def wait_payload(path: Path, predicate: Any, timeout: float = WAIT) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while True:
            events = read_events(path)
            if any(predicate(e) for e in events):
                return events
            await asyncio.sleep(0.05)


class Cluster:
    """A broker worker process plus the peers that talk to it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.peers: TestPeers = create_test_peers(
            tmp / "peers", NAMES, endpoints={"broker": f"127.0.0.1:{self.port}"}
        )
        self.broker: WorkerProcess | None = None
        self.procs: list[Proc] = []
        self.broker_args: list[str] = []

    async def start_broker(self, *extra: str) -> WorkerProcess:
        if extra:
            self.broker_args = list(extra)
        peer = self.peers["broker"]
        proc = start_worker_process(
            [
                "--transport",
                f"tcp://127.0.0.1:{self.port}",
                "--identity",
                str(peer.identity_path),
                "--trust",
                str(peer.trust_path),
                "--port",
                "5000",
                "--plugin",
                "channels",
                "--channels-db",
                str(self.tmp / "events.db"),
                "--no-call-log",
                "--drain-timeout",
                "1",
                *self.broker_args,
            ],
            ready_file=self.tmp / "broker.ready",
            log_file=self.tmp / "broker.log",
            name="broker",
        )
        self.broker = proc
        await proc.wait_ready(WAIT)
        return proc

    async def subscriber(
        self, name: str, pattern: str | list[str], out: Path | list[Path], *extra: str,
        expect_ready: bool = True,
    ) -> tuple[Proc, dict[str, Any]]:  # fmt: skip
        patterns = [pattern] if isinstance(pattern, str) else pattern
        outs = [out] if isinstance(out, Path) else out
        pairs = [
            arg
            for p, o in zip(patterns, outs, strict=True)
            for arg in ("--pattern", p, "--out", str(o))
        ]
        peer = self.peers[name]
        proc = await Proc.start(
            self.tmp / f"{name}.log",
            str(PROC),
            "subscribe",
            "--identity",
            str(peer.identity_path),
            "--trust",
            str(peer.trust_path),
            *pairs,
            *extra,
        )
        self.procs.append(proc)
        status = await proc.status()
        if expect_ready:
            assert status["event"] == "ready", status
        return proc, status

    def transport(self, name: str = "pub") -> Any:
        peer = self.peers[name]
        return open_transport(
            "tcp://127.0.0.1:0", identity=peer.identity_path, trust=peer.trust_path
        )

    async def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await proc.process.wait()
        if self.broker is not None:
            await self.broker.stop()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        await c.close()


def publisher(transport: Any) -> PilotPublisher:
    return PilotPublisher(transport, peer="broker", options=PublisherOptions(timeout_secs=30))


async def test_wildcards(cluster: Cluster) -> None:
    await cluster.start_broker()
    patterns = {"sub1": "agents.*", "sub2": "agents.>", "sub3": ">", "sub4": "agents.planner"}
    outs = {name: cluster.tmp / f"{name}.jsonl" for name in patterns}
    # One process, one channel per pattern (each its own subscription stream).
    await cluster.subscriber("sub1", list(patterns.values()), list(outs.values()))
    topics = ["agents.planner", "agents.planner.tasks", "agents.coder", "news.sports", "agents"]
    async with cluster.transport() as transport, publisher(transport) as pub:
        for topic in topics:
            await pub.publish(topic, topic)
        await pub.publish("agents.planner", "end")  # matches every pattern: the last one
    expected = {
        "sub1": ["agents.planner", "agents.coder"],
        "sub2": ["agents.planner", "agents.planner.tasks", "agents.coder"],
        "sub3": topics,
        "sub4": ["agents.planner"],
    }
    pub_id = cluster.peers["pub"].node_id
    for name, want in expected.items():
        events = await wait_payload(outs[name], lambda e: e["payload"] == "end")
        assert [e["topic"] for e in events[:-1]] == want, name
        assert {e["publisher"] for e in events} == {pub_id}


async def test_acl(cluster: Cluster) -> None:
    config = cluster.tmp / "broker.json"
    allowed = cluster.peers["sub1"].node_id
    publisher_id = cluster.peers["pub"].node_id
    config.write_text(
        json.dumps(
            {"acl": [{"pattern": "private.>", "publish": [publisher_id], "subscribe": [allowed]}]}
        )
    )
    await cluster.start_broker("--channels-config", str(config))
    out1, out2 = cluster.tmp / "sub1.jsonl", cluster.tmp / "intruder.jsonl"
    await cluster.subscriber("sub1", ">", out1)
    await cluster.subscriber("intruder", ">", out2)
    denied, status = await cluster.subscriber(
        "intruder", "private.plans", cluster.tmp / "denied.jsonl", expect_ready=False
    )
    assert status == {**status, "event": "error", "error": "ChannelPermissionError"}
    assert await denied.process.wait() == 3
    async with cluster.transport("intruder") as transport:
        with pytest.raises(ChannelPermissionError):
            await publish_once(transport, "private.plans", "forged", peer="broker")
    async with cluster.transport() as transport, publisher(transport) as pub:
        await pub.publish("private.plans", "secret")
        await pub.publish("public.news", "hello")
        await pub.publish("public.end", "end")
    for out, want in ((out1, ["private.plans", "public.news"]), (out2, ["public.news"])):
        events = await wait_payload(out, lambda e: e["payload"] == "end")
        assert [e["topic"] for e in events[:-1]] == want


async def run_slow_consumer(cluster: Cluster, policy: str, count: int = 3000) -> tuple[Any, Any]:
    """A stalled subscriber with ``policy`` and a fast one; ``count`` 1 KB events."""
    slow_out, fast_out = cluster.tmp / "slow.jsonl", cluster.tmp / "fast.jsonl"
    slow, _ = await cluster.subscriber(
        "sub1", "t", slow_out, "--queue", "10", "--policy", policy, "--buffer", "1",
        "--pause", "3",
    )  # fmt: skip
    await cluster.subscriber("sub2", "t", fast_out, "--queue", "8192", "--policy", "block")
    pad = "x" * 1000
    async with cluster.transport() as transport, publisher(transport) as pub:
        await pub.publish("t", {"i": 0, "pad": pad})
        await wait_events(slow_out, 1)  # the slow one now stalls for 3 s
        sem = asyncio.Semaphore(256)

        async def one(i: int) -> None:
            async with sem:
                await pub.publish("t", {"i": i, "pad": pad})

        await asyncio.gather(*(one(i) for i in range(1, count)))
        if policy == "disconnect":
            # It may be cut again while its buffers still hold the burst: keep
            # publishing markers until one published after a reconnect reaches it.
            await slow.wait_for_log("resubscribed")
            async with asyncio.timeout(WAIT):
                for marker in range(count, count + 1000):
                    await pub.publish("t", {"i": marker, "pad": pad})
                    with contextlib.suppress(TimeoutError):
                        await wait_payload(slow_out, lambda e: e["payload"]["i"] >= count, 1.0)
                        break
    fast = await wait_events(fast_out, count)
    assert [e["payload"]["i"] for e in fast[:count]] == list(range(count))
    return slow_out, fast


async def test_slow_consumer_drop_oldest(cluster: Cluster) -> None:
    await cluster.start_broker()
    slow_out, _ = await run_slow_consumer(cluster, "drop_oldest")
    events = await wait_payload(slow_out, lambda e: e["payload"]["i"] == 2999)
    seen = [e["payload"]["i"] for e in events]
    assert seen == sorted(set(seen))
    assert events[-1]["dropped"] > 0
    assert len(seen) + events[-1]["dropped"] == 3000
    assert events[-1]["reconnects"] == 0


async def test_slow_consumer_block(cluster: Cluster) -> None:
    config = cluster.tmp / "broker.json"
    config.write_text(json.dumps({"block_timeout_secs": 60}))
    await cluster.start_broker("--channels-config", str(config))
    slow_out, _ = await run_slow_consumer(cluster, "block")
    events = await wait_events(slow_out, 3000)
    assert [e["payload"]["i"] for e in events] == list(range(3000))
    assert events[-1]["dropped"] == 0


async def test_slow_consumer_disconnect_and_auto_reconnect(cluster: Cluster) -> None:
    await cluster.start_broker()
    slow_out, _ = await run_slow_consumer(cluster, "disconnect")
    events = await wait_payload(slow_out, lambda e: e["payload"]["i"] >= 3000)
    seen = [e["payload"]["i"] for e in events]
    assert seen == sorted(set(seen))
    assert len([i for i in seen if i < 3000]) < 3000  # lost while it was cut off
    assert events[-1]["reconnects"] >= 1
    assert events[-1]["dropped"] == 0


def durable_payloads(events: list[dict[str, Any]]) -> list[int]:
    return [e["payload"] for e in events if e["topic"].startswith("jobs.")]


async def test_durable_resume_after_kill_9_of_the_subscriber(cluster: Cluster) -> None:
    await cluster.start_broker("--channels-durable", "jobs.>")
    out = cluster.tmp / "durable.jsonl"
    args = ("--resume", "--start", "earliest", "--delay", "0.005")
    sub, _ = await cluster.subscriber("sub1", "jobs.>", out, *args)
    async with cluster.transport() as transport, publisher(transport) as pub:
        offsets = await asyncio.gather(*(pub.publish("jobs.a", i) for i in range(300)))
        assert sorted(o for o in offsets if o is not None) == list(range(1, 301))
        await wait_events(out, 50)
        sub.kill()
        await sub.process.wait()
        delivered_before = len(read_events(out))
        assert delivered_before < 300
        await asyncio.gather(*(pub.publish("jobs.b", i) for i in range(300, 400)))
        started = asyncio.get_running_loop().time()
        await cluster.subscriber("sub1", "jobs.>", out, *args)
        events = await wait_events(out, 400)
        resumed_in = asyncio.get_running_loop().time() - started
    assert sorted(durable_payloads(events)) == list(range(400))
    offsets_seen = [e["offset"] for e in events]
    assert offsets_seen == sorted(set(offsets_seen))
    assert resumed_in < WAIT


async def test_durable_resume_after_broker_restart(cluster: Cluster) -> None:
    await cluster.start_broker("--channels-durable", "jobs.>")
    out = cluster.tmp / "durable.jsonl"
    news = cluster.tmp / "news.jsonl"
    sub, _ = await cluster.subscriber("sub1", "jobs.>", out, "--delay", "0.005")
    news_sub, _ = await cluster.subscriber("sub2", "news", news)
    async with cluster.transport() as transport:
        policy = ReconnectPolicy(max_attempts=40, max_backoff_secs=0.5)
        options = PublisherOptions(timeout_secs=30, retry=policy)
        async with PilotPublisher(transport, peer="broker", options=options) as pub:
            await asyncio.gather(*(pub.publish("jobs.a", i) for i in range(200)))
            await wait_events(out, 20)
            assert cluster.broker is not None
            await cluster.broker.kill()
            assert len(read_events(out)) < 200
            await cluster.start_broker()
            for i in range(200, 300):
                await pub.publish("jobs.a", i)
            events = await wait_events(out, 300)
            await news_sub.wait_for_log("resubscribed")
            await pub.publish("news", "after restart")
            news_events = await wait_events(news, 1)
    assert durable_payloads(events) == list(range(300))
    assert [e["offset"] for e in events] == list(range(1, 301))
    assert events[-1]["reconnects"] >= 1
    assert news_events[0]["payload"] == "after restart"
    assert "reconnecting in" in sub.log.read_text()


async def test_daemon_adapter(cluster: Cluster, tmp_path: Path) -> None:
    sock = str(tmp_path / "pilot.sock")
    async with PilotDaemonDouble(sock) as daemon:
        out = tmp_path / "daemon.jsonl"
        sub, _ = await cluster.subscriber("sub1", "agents.>", out, "--daemon-socket", sock)
        pub = await Proc.start(
            tmp_path / "daemon-pub.log",
            str(PROC),
            "publish",
            "--daemon-socket",
            sock,
            "--topic",
            "agents.x",
            "--count",
            "5",
        )
        cluster.procs.append(pub)
        assert (await pub.status())["event"] == "done"
        events = await wait_events(out, 5)
        assert [e["payload"] for e in events] == [{"bytes": str(i)} for i in range(5)]
        assert {e["publisher"] for e in events} == {None}
        assert {e["offset"] for e in events} == {None}
        await daemon.restart()
        await sub.wait_for_log("resubscribed")
        pub = await Proc.start(
            tmp_path / "daemon-pub.log",
            str(PROC),
            "publish",
            "--daemon-socket",
            sock,
            "--topic",
            "agents.y",
            "--first",
            "5",
        )
        cluster.procs.append(pub)
        assert (await pub.status())["event"] == "done"
        events = await wait_events(out, 6)
        assert events[-1] == {**events[-1], "topic": "agents.y", "payload": {"bytes": "5"}}
        assert events[-1]["reconnects"] >= 1
    assert os.path.exists(out)


BLOCK_BOUND = 5.0  # BrokerOptions.block_timeout_secs, the documented bound
BLOCK_FAILURE_BOUND = BLOCK_BOUND + 7.0  # generous for a loaded machine


def spread_patterns(n: int) -> tuple[list[str], str, list[str]]:
    """``n`` patterns, one topic all of them match, and one topic per pattern.

    Pattern ``i`` has ``n`` segments, ``*`` at position ``i`` and ``all``
    elsewhere: ``all.all...`` matches every pattern, while the topic with
    ``only`` at position ``i`` matches pattern ``i`` alone.
    """
    patterns = [".".join("*" if j == i else "all" for j in range(n)) for i in range(n)]
    only = [".".join("only" if j == i else "all" for j in range(n)) for i in range(n)]
    return patterns, ".".join(["all"] * n), only


@pytest.mark.parametrize("stuck", [1, 4, 12])
async def test_publish_stall_is_bounded_for_any_number_of_block_subscribers(
    cluster: Cluster, stuck: int
) -> None:
    queue = 4
    await cluster.start_broker()
    patterns, common, only = spread_patterns(stuck)
    outs = [cluster.tmp / f"stuck{i}.jsonl" for i in range(stuck)]
    # One process, `stuck` subscriptions with the block policy, each of which
    # stops reading after its first event.
    await cluster.subscriber(
        "sub1", patterns, outs, "--queue", str(queue), "--policy", "block", "--buffer", "1",
        "--pause", "3600",
    )  # fmt: skip
    pad = "x" * 200_000
    options = PublisherOptions(timeout_secs=60, retry=None)
    # The subscriber's own identity: stats() shows the queue depth of its subscriptions.
    async with (
        cluster.transport("sub1") as transport,
        PilotPublisher(transport, peer="broker", options=options) as pub,
    ):
        await pub.publish(common, {"i": 0})
        for out in outs:
            await wait_events(out, 1)

        async def depths() -> dict[str, int]:
            subs = (await pub.stats())["subscriptions"]
            return {s["pattern"]: s["depth"] for s in subs}

        # Fill every stalled subscription's broker queue to the brim through
        # its own topic, publishing only while the queue has room (so no fill
        # publish waits), until two snapshots in a row show them all full.
        full_snapshots = 0
        async with asyncio.timeout(WAIT):
            while full_snapshots < 2:
                seen = await depths()
                assert set(seen) == set(patterns), seen
                short = [i for i, p in enumerate(patterns) if seen[p] < queue]
                full_snapshots = 0 if short else full_snapshots + 1
                for i in short:
                    await pub.publish(only[i], {"i": -1, "pad": pad})
        loop = asyncio.get_running_loop()
        started = loop.time()
        await pub.publish(common, {"i": 1})
        elapsed = loop.time() - started
    assert cluster.broker is not None
    broker = cluster.broker

    def disconnected() -> int:
        return sum("disconnecting slow subscriber" in line for line in broker.logs)

    async def all_disconnected() -> None:
        while disconnected() < stuck:
            await broker.wait_for_log("disconnecting slow subscriber", start=len(broker.logs))

    await asyncio.wait_for(all_disconnected(), WAIT)
    assert disconnected() == stuck
    # It really waited for the stuck subscribers, and only about the bound in
    # all (sequential waits took 20 s for 4 and about 60 s for 12).
    assert BLOCK_BOUND * 0.9 <= elapsed < BLOCK_FAILURE_BOUND, (stuck, elapsed)


async def test_subscriptions_per_peer_cap_is_a_typed_error(cluster: Cluster) -> None:
    config = cluster.tmp / "broker.json"
    config.write_text(json.dumps({"max_subscriptions_per_peer": 2}))
    await cluster.start_broker("--channels-config", str(config))
    outs = [cluster.tmp / f"cap{i}.jsonl" for i in range(3)]
    refused, status = await cluster.subscriber("sub1", ["a", "b", "c"], outs, expect_ready=False)
    assert status == {**status, "event": "error", "error": "SubscriptionLimitError"}
    assert "maximum of 2 subscriptions" in status["message"]
    assert await refused.process.wait() == 3
    # Another peer is not affected by sub1's cap.
    await cluster.subscriber("sub2", ["a", "b"], outs[:2])
