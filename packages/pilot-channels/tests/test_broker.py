from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from pilot_channels import (
    AclRule,
    Broker,
    BrokerOptions,
    BrokerUnavailableError,
    ChannelConfigError,
    ChannelPermissionError,
    ChannelTimeoutError,
    DurableTopic,
    Event,
    InvalidTopicError,
    PayloadTooLargeError,
    Retention,
    SlowConsumerError,
    SlowConsumerPolicy,
    SubscriptionLimitError,
)
from prometheus_client import CollectorRegistry


async def drain(sub, n: int, timeout: float = 5.0) -> list[Event]:
    out: list[Event] = []
    while len(out) < n:
        out.extend(await sub.next_batch(timeout=timeout))
    return out


async def test_wildcard_fanout_and_event_fields() -> None:
    async with Broker() as broker:
        one = broker.subscribe("agents.*", node_id="n1")
        rest = broker.subscribe("agents.>", node_id="n2")
        everything = broker.subscribe(">", node_id="n3")
        exact = broker.subscribe("agents.planner", node_id="n4")
        await broker.publish("agents.planner", b"p", publisher="pub")
        await broker.publish("agents.planner.tasks", {"k": 1}, publisher="pub")
        await broker.publish("other", "x", publisher="pub")
        assert [e.topic for e in one.take_nowait()] == ["agents.planner"]
        assert [e.topic for e in rest.take_nowait()] == ["agents.planner", "agents.planner.tasks"]
        assert [e.topic for e in everything.take_nowait()] == [
            "agents.planner",
            "agents.planner.tasks",
            "other",
        ]
        (event,) = exact.take_nowait()
        assert event.payload == b"p"
        assert event.publisher == "pub"
        assert event.offset is None
        assert abs(event.timestamp - __import__("time").time()) < 60


async def test_acl_publish_subscribe_and_per_topic_filter() -> None:
    options = BrokerOptions(
        acl=[
            AclRule(pattern="secret.>", publish=["boss"], subscribe=["boss"]),
            AclRule(pattern="public.>", publish=["boss", "agent"]),
        ],
        default_access="closed",
    )
    registry = CollectorRegistry()
    async with Broker(options, registry=registry) as broker:
        with pytest.raises(ChannelPermissionError):
            broker.subscribe("secret.plans", node_id="agent")
        with pytest.raises(ChannelPermissionError):
            broker.subscribe("misc", node_id="agent")
        agent_all = broker.subscribe(">", node_id="agent")
        boss_all = broker.subscribe(">", node_id="boss")
        with pytest.raises(ChannelPermissionError):
            await broker.publish("secret.plans", 1, publisher="agent")
        with pytest.raises(ChannelPermissionError):
            await broker.publish("misc", 1, publisher="boss")
        await broker.publish("secret.plans", 1, publisher="boss")
        await broker.publish("public.news", 2, publisher="agent")
        assert [e.topic for e in agent_all.take_nowait()] == ["public.news"]
        assert [e.topic for e in boss_all.take_nowait()] == ["secret.plans", "public.news"]
        assert registry.get_sample_value("pilot_channels_denied_total", {"action": "publish"}) == 2
        assert (
            registry.get_sample_value("pilot_channels_denied_total", {"action": "subscribe"}) == 2
        )


async def test_drop_oldest_counts_and_bounds_memory() -> None:
    registry = CollectorRegistry()
    async with Broker(registry=registry) as broker:
        slow = broker.subscribe("t", queue_size=3, policy="drop_oldest")
        fast = broker.subscribe("t", queue_size=1000)
        for i in range(100):
            await broker.publish("t", i)
            assert slow.depth <= 3
        assert [e.payload for e in slow.take_nowait()] == [97, 98, 99]
        assert slow.dropped == 97
        assert [e.payload for e in fast.take_nowait()] == list(range(100))
        assert registry.get_sample_value("pilot_channels_dropped_total") == 97
        assert registry.get_sample_value("pilot_channels_deliveries_total") == 103
        assert (
            registry.get_sample_value("pilot_channels_events_in_total", {"durable": "false"}) == 100
        )


async def test_disconnect_policy_ends_only_the_slow_subscriber() -> None:
    async with Broker() as broker:
        slow = broker.subscribe("t", queue_size=2, policy=SlowConsumerPolicy.DISCONNECT)
        fast = broker.subscribe("t", queue_size=100)
        for i in range(5):
            await broker.publish("t", i)
        with pytest.raises(SlowConsumerError):
            slow.take_nowait()
        assert slow not in broker.subscriptions
        assert len(fast.take_nowait()) == 5


async def test_block_policy_waits_for_room_then_times_out() -> None:
    options = BrokerOptions(block_timeout_secs=0.3)
    async with Broker(options) as broker:
        blocking = broker.subscribe("t", queue_size=2, policy="block")
        other = broker.subscribe("t", queue_size=100)
        await broker.publish("t", 0)
        await broker.publish("t", 1)
        publish = asyncio.create_task(broker.publish("t", 2))
        await asyncio.sleep(0)
        assert not publish.done()
        assert [e.payload for e in blocking.take_nowait()] == [0, 1]
        await asyncio.wait_for(publish, 5)
        assert [e.payload for e in blocking.take_nowait()] == [2]
        # Now nobody reads: the publisher waits block_timeout_secs, then the
        # subscriber is cut and the publisher goes on.
        for i in range(3, 6):
            await asyncio.wait_for(broker.publish("t", i), 5)
        with pytest.raises(SlowConsumerError):
            blocking.take_nowait()
        assert [e.payload for e in other.take_nowait()] == list(range(6))


async def test_recv_timeout() -> None:
    async with Broker() as broker:
        sub = broker.subscribe("t")
        with pytest.raises(ChannelTimeoutError):
            await sub.next_batch(timeout=0.05)


async def test_bad_publishes() -> None:
    async with Broker(BrokerOptions(max_payload_bytes=10)) as broker:
        with pytest.raises(InvalidTopicError):
            await broker.publish("a.*", 1)
        with pytest.raises(PayloadTooLargeError):
            await broker.publish("a", b"x" * 11)
        with pytest.raises(PayloadTooLargeError):
            await broker.publish("a", {"k": "x" * 20})


async def test_close_wakes_subscribers() -> None:
    broker = Broker()
    sub = broker.subscribe("t")
    waiter = asyncio.create_task(sub.next_batch())
    await asyncio.sleep(0)
    await broker.aclose()
    with pytest.raises(BrokerUnavailableError):
        await asyncio.wait_for(waiter, 5)
    with pytest.raises(BrokerUnavailableError):
        await broker.publish("t", 1)


def durable_options(path: Path | None, **retention: float) -> BrokerOptions:
    return BrokerOptions(
        durable=[DurableTopic(pattern="orders.>", retention=Retention(**retention))],
        log_path=str(path) if path else None,
    )


async def test_durable_offsets_and_lagging_subscriber_loses_nothing(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with Broker(durable_options(tmp_path / "log.db"), registry=registry) as broker:
        sub = broker.subscribe("orders.>", queue_size=4, policy="drop_oldest")
        offsets = [await broker.publish(f"orders.{i % 3}", i) for i in range(50)]
        await broker.publish("chatter", "not durable")
        assert offsets == list(range(1, 51))
        assert sub.depth <= 4
        assert sub.lagging
        got = await drain(sub, 50)
        assert [e.payload for e in got] == list(range(50))
        assert [e.offset for e in got] == offsets
        assert sub.dropped == 0
        assert not sub.lagging
        await broker.publish("orders.0", "live")
        (live,) = sub.take_nowait()
        assert live.offset == 51
        assert (
            registry.get_sample_value("pilot_channels_events_in_total", {"durable": "true"}) == 51
        )
        assert registry.get_sample_value("pilot_channels_durable_log_events") == 51


async def test_resume_after_offset_and_broker_restart(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    async with Broker(durable_options(path)) as broker:
        for i in range(10):
            await broker.publish("orders.x", i)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o600
    async with Broker(durable_options(path)) as broker:
        assert broker.head == 10
        sub = broker.subscribe("orders.>", after=6)
        got = await drain(sub, 4)
        assert [e.offset for e in got] == [7, 8, 9, 10]
        assert [e.payload for e in got] == [6, 7, 8, 9]
        assert await broker.publish("orders.x", 10) == 11
        (event,) = await sub.next_batch(timeout=5)
        assert event.offset == 11
        earliest = broker.subscribe("orders.x", start="earliest")
        assert len(await drain(earliest, 11)) == 11
        latest = broker.subscribe("orders.x")
        assert latest.take_nowait() == []


async def test_retention_by_count_age_and_bytes() -> None:
    now = [1000.0]
    options = durable_options(None, max_events=5)
    async with Broker(options, clock=lambda: now[0]) as broker:
        for i in range(12):
            await broker.publish("orders.a", i)
        await broker.publish("orders.b", "b")
        assert broker.run_retention() == 7
        sub = broker.subscribe("orders.>", start="earliest")
        got = await drain(sub, 6)
        assert [e.payload for e in got] == [7, 8, 9, 10, 11, "b"]

    aged = durable_options(None, max_age_secs=10)
    async with Broker(aged, clock=lambda: now[0]) as broker:
        await broker.publish("orders.a", "old")
        now[0] += 20
        await broker.publish("orders.a", "new")
        assert broker.run_retention() == 1
        sub = broker.subscribe("orders.a", start="earliest")
        assert [e.payload for e in await drain(sub, 1)] == ["new"]

    sized = durable_options(None, max_bytes=250)
    async with Broker(sized) as broker:
        for i in range(10):
            await broker.publish("orders.a", bytes([i]) * 100)
        assert broker.run_retention() == 8
        assert broker.log is not None
        assert broker.log.events == 2


async def test_mixed_durable_and_live_subscription() -> None:
    async with Broker(durable_options(None)) as broker:
        sub = broker.subscribe(">", queue_size=2, policy="drop_oldest")
        for i in range(5):
            await broker.publish("orders.a", i)
            await broker.publish("news", i)
        got = await drain(sub, 5 + 2)
        durable = [e.payload for e in got if e.offset is not None]
        live = [e.payload for e in got if e.offset is None]
        assert durable == [0, 1, 2, 3, 4]
        assert live == [3, 4]
        assert sub.dropped == 3


async def test_metrics_gauges() -> None:
    registry = CollectorRegistry()
    async with Broker(registry=registry) as broker:
        a = broker.subscribe("t", queue_size=10)
        broker.subscribe("t", queue_size=10)
        for i in range(4):
            await broker.publish("t", i)
        a.take_nowait()
        assert registry.get_sample_value("pilot_channels_subscribers") == 2
        assert registry.get_sample_value("pilot_channels_queue_depth") == 4
        assert registry.get_sample_value("pilot_channels_queue_depth_max") == 4
        a.close()
        assert registry.get_sample_value("pilot_channels_subscribers") == 1


async def test_block_subscribers_are_waited_for_together() -> None:
    # A huge bound, so nothing here depends on time: the publish waits on both
    # stuck subscribers at once, and the one that makes room first is served
    # first even though it comes second in routing order.
    async with Broker(BrokerOptions(block_timeout_secs=3600)) as broker:
        first = broker.subscribe("t", queue_size=1, policy="block")
        second = broker.subscribe("t", queue_size=1, policy="block")
        await broker.publish("t", 0)
        publish = asyncio.create_task(broker.publish("t", 1))
        await asyncio.sleep(0)
        assert not publish.done()
        assert [e.payload for e in second.take_nowait()] == [0]
        assert [e.payload for e in await second.next_batch(timeout=5)] == [1]
        assert not publish.done()  # still waiting for `first`
        assert [e.payload for e in first.take_nowait()] == [0]
        await asyncio.wait_for(publish, 5)
        assert [e.payload for e in first.take_nowait()] == [1]


async def test_stuck_block_subscribers_share_one_deadline_and_are_all_cut() -> None:
    registry = CollectorRegistry()
    async with Broker(BrokerOptions(block_timeout_secs=0.05), registry=registry) as broker:
        stuck = [broker.subscribe("t", queue_size=1, policy="block") for _ in range(12)]
        healthy = broker.subscribe("t", queue_size=100)
        await broker.publish("t", 0)
        await asyncio.wait_for(broker.publish_many([("t", 1), ("t", 2), ("t", 3)]), 30)
        for sub in stuck:
            with pytest.raises(SlowConsumerError, match="waited its bound"):
                sub.take_nowait()
        assert broker.subscriptions == (healthy,)
        assert [e.payload for e in healthy.take_nowait()] == [0, 1, 2, 3]
        assert (
            registry.get_sample_value(
                "pilot_channels_slow_consumer_disconnects_total", {"policy": "block"}
            )
            == 12
        )
        # Each stuck event counts once, however many subscribers it waited on.
        assert registry.get_sample_value("pilot_channels_publish_blocked_total") == 1


async def test_cancelled_blocked_publish_leaves_served_subscribers_served() -> None:
    async with Broker(BrokerOptions(block_timeout_secs=3600)) as broker:
        stuck = broker.subscribe("t", queue_size=1, policy="block")
        roomy = broker.subscribe("t", queue_size=1, policy="block")
        await broker.publish("t", 0)
        roomy.take_nowait()
        publish = asyncio.create_task(broker.publish_many([("t", 1), ("t", 2)]))
        assert [e.payload for e in await roomy.next_batch(timeout=5)] == [1]
        publish.cancel()
        with pytest.raises(asyncio.CancelledError):
            await publish
        assert [e.payload for e in stuck.take_nowait()] == [0]
        assert roomy.take_nowait() == []  # event 2 was never routed
        await asyncio.wait_for(broker.publish("t", 3), 5)  # no waiter left behind
        assert [e.payload for e in stuck.take_nowait()] == [3]


async def test_subscriptions_per_peer_are_capped() -> None:
    registry = CollectorRegistry()
    options = BrokerOptions(max_subscriptions_per_peer=2)
    async with Broker(options, registry=registry) as broker:
        a = broker.subscribe("a", node_id="n1")
        broker.subscribe("b", node_id="n1")
        with pytest.raises(SubscriptionLimitError, match="maximum of 2 subscriptions") as info:
            broker.subscribe("c", node_id="n1")
        assert isinstance(info.value, ChannelConfigError)  # what older callers catch
        broker.subscribe("c", node_id="n2")  # other peers are not affected
        a.close()
        broker.subscribe("c", node_id="n1")  # room again
        assert (
            registry.get_sample_value(
                "pilot_channels_denied_total", {"action": "subscription_limit"}
            )
            == 1
        )
    async with Broker(BrokerOptions(max_subscriptions=1)) as broker:
        broker.subscribe("a", node_id="n1")
        with pytest.raises(SubscriptionLimitError):
            broker.subscribe("a", node_id="n2")


def test_subscription_limit_error_crosses_the_wire() -> None:
    from pilot_channels._errmap import from_lower, to_rpc
    from pilot_rpc import errors as rpc

    wire = to_rpc(SubscriptionLimitError("node n1 holds its maximum of 2 subscriptions"))
    assert isinstance(wire, rpc.ResourceExhausted)
    back = from_lower(wire, what="subscribe")
    assert type(back) is SubscriptionLimitError
    assert "maximum of 2" in str(back)
