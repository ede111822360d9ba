from __future__ import annotations

import asyncio
import logging

import pytest
from pilot_channels import (
    AclRule,
    Broker,
    BrokerOptions,
    BrokerUnavailableError,
    ChannelClosedError,
    ChannelPermissionError,
    ChannelTimeoutError,
    DurableTopic,
    InvalidPatternError,
    InvalidTopicError,
    PilotChannel,
    PilotPublisher,
    ReconnectPolicy,
    SubscribeOptions,
)
from pilot_channels.testing import InProcessBackend
from prometheus_client import CollectorRegistry

FAST = ReconnectPolicy(initial_backoff_secs=0.01, max_backoff_secs=0.05)


def durable_broker() -> Broker:
    return Broker(BrokerOptions(durable=[DurableTopic(pattern="jobs.>")]))


async def wait_for(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_subscribe_publish_roundtrip_and_iteration() -> None:
    registry = CollectorRegistry()
    async with Broker() as broker:
        backend = InProcessBackend(broker, node_id="me")
        channel = PilotChannel.with_backend(backend, "agents.>", registry=registry)
        async with channel, PilotPublisher.with_backend(backend, registry=registry) as pub:
            results = await asyncio.gather(*(pub.publish(f"agents.{i}", i) for i in range(20)))
            assert results == [None] * 20
            got = [e async for e in channel.events(max_events=20, timeout=5)]
            assert [e.payload for e in got] == list(range(20))
            assert got[0].publisher == "me"
            with pytest.raises(ChannelTimeoutError):
                await channel.recv(timeout=0.05)
        assert registry.get_sample_value("pilot_channels_client_events_received_total") == 20
        with pytest.raises(ChannelClosedError):
            await channel.recv()
        assert [e async for e in channel] == []


async def test_client_side_validation() -> None:
    async with Broker() as broker:
        backend = InProcessBackend(broker)
        with pytest.raises(InvalidPatternError):
            PilotChannel.with_backend(backend, "a.>.b")
        async with PilotPublisher.with_backend(backend) as pub:
            with pytest.raises(InvalidTopicError):
                await pub.publish("a.*", 1)


async def test_permission_errors_surface_as_channel_errors() -> None:
    options = BrokerOptions(acl=[AclRule(pattern="x.>", publish=[], subscribe=[])])
    async with Broker(options) as broker:
        backend = InProcessBackend(broker, node_id="n")
        with pytest.raises(ChannelPermissionError):
            await PilotChannel.with_backend(backend, "x.y").open()
        async with PilotPublisher.with_backend(backend) as pub:
            with pytest.raises(ChannelPermissionError):
                await pub.publish("x.y", 1)


async def test_reconnect_resumes_durable_without_loss_or_duplicates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    async with durable_broker() as broker:
        backend = InProcessBackend(broker)
        options = SubscribeOptions(reconnect=FAST, queue_size=8)
        async with (
            PilotChannel.with_backend(backend, "jobs.>", options=options, registry=registry) as ch,
            PilotPublisher.with_backend(backend) as pub,
        ):
            for i in range(10):
                await pub.publish("jobs.a", i)
            first = [await ch.recv(timeout=5) for _ in range(3)]
            assert [e.payload for e in first] == [0, 1, 2]
            with caplog.at_level(logging.WARNING, logger="pilot_channels.client"):
                backend.break_streams()
                backend.set_available(False)
                for i in range(10, 15):
                    await broker.publish("jobs.a", i)
                await wait_for(lambda: ch.reconnects >= 2)
                backend.set_available(True)
                await wait_for(lambda: ch.connected)
            rest = [await ch.recv(timeout=5) for _ in range(12)]
            assert [e.payload for e in rest] == list(range(3, 15))
            assert ch.last_offset == 15
            with pytest.raises(ChannelTimeoutError):
                await ch.recv(timeout=0.1)
        assert "reconnecting" in caplog.text
        assert (
            registry.get_sample_value(
                "pilot_channels_client_reconnects_total", {"kind": "subscriber"}
            )
            or 0
        ) >= 2


async def test_duplicates_from_a_replayed_buffer_are_dropped() -> None:
    async with durable_broker() as broker:
        backend = InProcessBackend(broker)
        options = SubscribeOptions(reconnect=FAST)
        async with PilotChannel.with_backend(backend, "jobs.>", options=options) as ch:
            for i in range(5):
                await broker.publish("jobs.a", i)
            await wait_for(lambda: ch._batches)  # the buffer holds them, none delivered
            backend.break_streams()
            await wait_for(lambda: backend.subscribe_calls >= 2 and ch.connected)
            await wait_for(lambda: len(ch._batches) >= 2)
            got = [await ch.recv(timeout=5) for _ in range(5)]
            assert [e.payload for e in got] == list(range(5))
            with pytest.raises(ChannelTimeoutError):
                await ch.recv(timeout=0.05)
            assert ch.duplicates == 5


async def test_resume_after_from_a_previous_process() -> None:
    async with durable_broker() as broker:
        for i in range(6):
            await broker.publish("jobs.a", i)
        backend = InProcessBackend(broker)
        options = SubscribeOptions(resume_after=4)
        async with PilotChannel.with_backend(backend, "jobs.>", options=options) as ch:
            got = [await ch.recv(timeout=5) for _ in range(2)]
            assert [e.offset for e in got] == [5, 6]


async def test_dropped_counter_visible_to_subscriber() -> None:
    async with Broker() as broker:
        backend = InProcessBackend(broker)
        options = SubscribeOptions(queue_size=2, policy="drop_oldest", buffer_batches=1)
        async with PilotChannel.with_backend(backend, "t", options=options) as ch:
            await broker.publish("t", 0)
            await wait_for(lambda: ch._batches)
            # The client buffer holds one batch, so the broker queue fills up.
            for i in range(1, 10):
                await broker.publish("t", i)
            # Nothing ran the client in between: the broker kept the newest two.
            got = [(await ch.recv(timeout=5)).payload for _ in range(3)]
            assert got == [0, 8, 9]
            assert ch.dropped == 7


async def test_reconnect_gives_up_after_max_attempts() -> None:
    async with Broker() as broker:
        backend = InProcessBackend(broker)
        policy = ReconnectPolicy(initial_backoff_secs=0.01, max_attempts=2)
        async with PilotChannel.with_backend(
            backend, "t", options=SubscribeOptions(reconnect=policy)
        ) as ch:
            backend.set_available(False)
            backend.break_streams()
            with pytest.raises(BrokerUnavailableError):
                await ch.recv(timeout=5)


async def test_first_connect_failure_raises() -> None:
    async with Broker() as broker:
        backend = InProcessBackend(broker)
        backend.set_available(False)
        with pytest.raises(BrokerUnavailableError):
            await PilotChannel.with_backend(backend, "t").open()
        pub = PilotPublisher.with_backend(backend)
        with pytest.raises(BrokerUnavailableError):
            await pub.publish("t", 1)
        assert pub.retries == 2
        await pub.aclose()
        with pytest.raises(ChannelClosedError):
            await pub.publish("t", 1)


async def test_close_is_a_deprecated_alias_of_aclose() -> None:
    async with Broker() as broker:
        backend = InProcessBackend(broker)
        channel = await PilotChannel.with_backend(backend, "t").open()
        with pytest.warns(DeprecationWarning, match=r"PilotChannel\.close\(\) is deprecated"):
            await channel.close()
        assert channel.closed
        with pytest.raises(ChannelClosedError):
            await channel.recv(timeout=1)
        pub = PilotPublisher.with_backend(InProcessBackend(broker))
        with pytest.warns(DeprecationWarning, match=r"PilotPublisher\.close\(\) is deprecated"):
            await pub.close()
        with pytest.raises(ChannelClosedError):
            await pub.publish("t", 1)


def test_broker_errors_travel_as_error_info_and_are_read_back_exactly() -> None:
    from pilot_channels import errors
    from pilot_channels._errmap import from_lower, to_rpc
    from pilot_rpc import PermissionDenied

    for cls in (errors.SubscriptionLimitError, errors.ChannelPermissionError):
        sent = to_rpc(cls("no"))
        assert sent.info.domain == "pilot-channels"
        assert sent.info.metadata == {"error": cls.__name__}
        assert type(from_lower(sent, what="subscribe")) is cls
    # A 0.1 broker named the class in details["error"]: still understood.
    old = PermissionDenied("no", details={"error": "SubscriptionLimitError"})
    assert type(from_lower(old, what="subscribe")) is errors.SubscriptionLimitError
