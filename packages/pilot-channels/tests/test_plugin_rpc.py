"""The plugin's handlers served by a real WorkerServer, clients over pilot-rpc (memory://)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pilot_channels import (
    ChannelPermissionError,
    InvalidTopicError,
    PilotChannel,
    PilotPublisher,
    ReconnectPolicy,
    SlowConsumerError,
    SubscribeOptions,
    plugin,
    publish_once,
)
from pilot_transport import open_transport
from pilot_transport.testing import create_test_peers
from pilot_worker import PluginContext, WorkerConfig, WorkerServer
from prometheus_client import CollectorRegistry

FAST = ReconnectPolicy(initial_backoff_secs=0.02, max_backoff_secs=0.1)


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    peers = create_test_peers(tmp_path, ["broker", "alice", "bob"])
    hub = f"memory://channels-{uuid.uuid4().hex}"
    config = tmp_path / "broker.json"
    alice_id = peers["alice"].node_id
    config.write_text(
        json.dumps(
            {
                "acl": [{"pattern": "private.>", "publish": [alice_id], "subscribe": [alice_id]}],
                "durable": ["jobs.>"],
            }
        )
    )
    registry = CollectorRegistry()
    async with (
        open_transport(hub, identity=peers["broker"].identity, trust=peers["broker"].trust) as bt,
        open_transport(hub, identity=peers["alice"].identity, trust=peers["alice"].trust) as at,
        open_transport(hub, identity=peers["bob"].identity, trust=peers["bob"].trust) as bobt,
    ):
        worker = WorkerServer(bt, WorkerConfig(port=5000), metrics_registry=registry)
        await plugin.setup(  # type: ignore[misc]
            PluginContext(
                worker=worker,
                options={
                    "channels_config": str(config),
                    "channels_db": str(tmp_path / "events.db"),
                    "channels_durable": None,
                    "channels_policy": None,
                    "channels_queue": None,
                },
                transport=bt,
                metrics_registry=registry,
            )
        )
        await worker.start()
        try:
            yield {"alice": at, "bob": bobt, "registry": registry, "worker": worker}
        finally:
            await worker.aclose()


async def test_publish_subscribe_over_rpc(net: dict[str, Any]) -> None:
    alice, bob = net["alice"], net["bob"]
    async with (
        PilotChannel(bob, "agents.>", peer="broker") as channel,
        PilotPublisher(alice, peer="broker") as pub,
    ):
        await asyncio.gather(*(pub.publish(f"agents.{i % 2}", {"i": i}) for i in range(50)))
        got = [e async for e in channel.events(50, timeout=5)]
        assert sorted(e.payload["i"] for e in got) == list(range(50))
        assert {e.publisher for e in got} == {alice.identity.node_id}
        assert await publish_once(alice, "agents.once", b"x", peer="broker") is None
        assert (await channel.recv(timeout=5)).payload == b"x"
        with pytest.raises(InvalidTopicError):
            await pub.publish("agents.*", 1)
        stats = await pub.stats()
        assert stats["subscribers"] == 1
    registry = net["registry"]
    assert registry.get_sample_value("pilot_channels_events_in_total", {"durable": "false"}) == 51


async def test_acl_over_rpc(net: dict[str, Any]) -> None:
    alice, bob = net["alice"], net["bob"]
    with pytest.raises(ChannelPermissionError):
        await PilotChannel(bob, "private.x", peer="broker").open()
    with pytest.raises(ChannelPermissionError):
        await publish_once(bob, "private.x", 1, peer="broker")
    async with PilotChannel(bob, ">", peer="broker") as everything:
        await publish_once(alice, "private.x", "secret", peer="broker")
        await publish_once(alice, "public.x", "hello", peer="broker")
        event = await everything.recv(timeout=5)
        assert event.topic == "public.x"


async def test_durable_over_rpc_with_resume(net: dict[str, Any]) -> None:
    alice, bob = net["alice"], net["bob"]
    async with PilotPublisher(alice, peer="broker") as pub:
        offsets = [await pub.publish("jobs.a", i) for i in range(5)]
        assert offsets == [1, 2, 3, 4, 5]
        opts = SubscribeOptions(resume_after=2)
        async with PilotChannel(bob, "jobs.>", peer="broker", options=opts) as channel:
            got = [await channel.recv(timeout=5) for _ in range(3)]
            assert [e.offset for e in got] == [3, 4, 5]
            assert channel.last_offset == 5


async def test_disconnect_policy_reconnects(net: dict[str, Any]) -> None:
    alice, bob = net["alice"], net["bob"]
    opts = SubscribeOptions(queue_size=2, policy="disconnect", buffer_batches=1, reconnect=FAST)
    async with (
        PilotChannel(bob, "t", peer="broker", options=opts) as channel,
        PilotPublisher(alice, peer="broker") as pub,
    ):
        # Nobody reads while 4 MB are published: the RPC stream's window fills,
        # then the broker queue (2 events), and the broker cuts the subscriber.
        await asyncio.gather(*(pub.publish("t", b"x" * 1000) for _ in range(4000)))
        received = 0
        async with asyncio.timeout(30):
            while channel.reconnects == 0:
                await channel.recv(timeout=5)
                received += 1
        assert received < 4000
        async with asyncio.timeout(10):
            while not channel.connected:
                await asyncio.sleep(0.01)
        await pub.publish("t", b"after")
        async with asyncio.timeout(10):
            while (await channel.recv(timeout=5)).payload != b"after":
                pass
    assert issubclass(SlowConsumerError, ConnectionError)
