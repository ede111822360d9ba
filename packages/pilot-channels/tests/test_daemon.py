from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pilot_channels import (
    BrokerProtocolError,
    ChannelConfigError,
    PilotChannel,
    PilotPublisher,
    ReconnectPolicy,
    SubscribeOptions,
)
from pilot_channels._daemon import EventDecoder, encode_event
from pilot_transport.testing._daemon_double import PilotDaemonDouble

FAST = ReconnectPolicy(initial_backoff_secs=0.02, max_backoff_secs=0.1)


def test_codec_known_bytes() -> None:
    assert encode_event("a.b", b"xy") == b"\x00\x03a.b\x00\x00\x00\x02xy"


@given(
    st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=300)), max_size=10),
    st.integers(min_value=1, max_value=50),
)
def test_codec_roundtrip_in_any_chunking(events: list[tuple[str, bytes]], chunk: int) -> None:
    data = b"".join(encode_event(t, p) for t, p in events)
    decoder = EventDecoder()
    out: list[tuple[str, bytes]] = []
    for i in range(0, len(data), chunk):
        out.extend(decoder.feed(data[i : i + chunk]))
    assert out == events
    assert decoder.buffered == 0


def test_decoder_refuses_oversized_before_buffering() -> None:
    decoder = EventDecoder(max_payload=10)
    with pytest.raises(BrokerProtocolError):
        decoder.feed(b"\x00\x01t\x00\x10\x00\x00")


@pytest.fixture
async def daemon(tmp_path: Path):
    async with PilotDaemonDouble(str(tmp_path / "pilot.sock")) as d:
        yield d


async def test_subscribe_and_publish_through_the_daemon(daemon: PilotDaemonDouble) -> None:
    sock = daemon.socket_path
    options = SubscribeOptions(reconnect=FAST)
    async with (
        PilotChannel.from_daemon("agents.>", socket_path=sock, options=options) as wild,
        PilotChannel.from_daemon("agents.x", socket_path=sock, options=options) as exact,
        PilotPublisher.from_daemon(socket_path=sock) as pub,
    ):
        await pub.publish("agents.x", b"one")
        await pub.publish("other", "two")
        await pub.publish("agents.y.z", "three")
        got = [await wild.recv(timeout=5) for _ in range(2)]
        assert [(e.topic, e.payload) for e in got] == [
            ("agents.x", b"one"),
            ("agents.y.z", b"three"),
        ]
        assert got[0].publisher is None
        assert got[0].offset is None
        event = await exact.recv(timeout=5)
        assert event.payload == b"one"
        with pytest.raises(ChannelConfigError):
            await pub.publish("agents.x", {"not": "bytes"})


async def test_daemon_restart_reconnects(daemon: PilotDaemonDouble) -> None:
    sock = daemon.socket_path
    options = SubscribeOptions(reconnect=FAST)
    async with (
        PilotChannel.from_daemon("t", socket_path=sock, options=options) as channel,
        PilotPublisher.from_daemon(socket_path=sock) as pub,
    ):
        await pub.publish("t", b"before")
        assert (await channel.recv(timeout=5)).payload == b"before"
        await daemon.restart()
        async with asyncio.timeout(10):
            while channel.reconnects == 0 or not channel.connected:
                await asyncio.sleep(0.01)
        await pub.publish("t", b"after")
        assert (await channel.recv(timeout=5)).payload == b"after"
