"""The tcp:// carrier's own rules: the virtual-port header, its timeout and limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest
from pilot_transport._carrier import DialTarget
from pilot_transport._carriers.tcp import TcpCarrier, parse_endpoint
from pilot_transport.errors import (
    PeerUnreachableError,
    PortInUseError,
    PortNotListeningError,
    StreamClosedError,
    StreamResetError,
    TransportURLError,
)


async def _raw(carrier: TcpCarrier) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert carrier.endpoint is not None
    host, port = parse_endpoint(carrier.endpoint)
    return await asyncio.open_connection(host, port)


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) in (b"", b"\x01", b"\x02")
    except ConnectionError:
        return True


def test_parse_endpoint() -> None:
    assert parse_endpoint("127.0.0.1:7001") == ("127.0.0.1", 7001)
    assert parse_endpoint("[::1]:7001") == ("::1", 7001)
    for bad in ("nohost", ":1", "h:", "h:x", "h:70000"):
        with pytest.raises(TransportURLError):
            parse_endpoint(bad)


async def test_listener_starts_lazily_and_reports_its_endpoint() -> None:
    carrier = TcpCarrier()
    assert carrier.endpoint is None
    assert (await carrier.info())["listening"] is False
    listener = await carrier.bind(5)
    assert carrier.endpoint is not None
    assert carrier.endpoint.startswith("127.0.0.1:")
    with pytest.raises(PortInUseError):
        await carrier.bind(5)
    other = TcpCarrier(port=int(carrier.endpoint.rsplit(":", 1)[1]))
    with pytest.raises(PortInUseError, match="already in use by another process"):
        await other.bind(1)
    await listener.aclose()
    await carrier.aclose()
    await other.aclose()


async def _raw_from(
    carrier: TcpCarrier, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert carrier.endpoint is not None
    host, port = parse_endpoint(carrier.endpoint)
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):  # a failure bound, not a measurement
        while not condition():
            await asyncio.sleep(0.005)


async def test_garbage_and_silence_are_dropped() -> None:
    carrier = TcpCarrier(header_timeout=0.2)
    await carrier.bind(1)
    reader, writer = await _raw(carrier)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    assert await _closed_by_peer(reader)
    writer.close()
    reader, writer = await _raw(carrier)  # says nothing: dropped after header_timeout
    assert await _closed_by_peer(reader)
    writer.close()
    await _until(lambda: carrier.unauthenticated == 0)
    assert (await carrier.info())["preauth"]["header_timeouts"] == 1
    await carrier.aclose()


async def test_beyond_the_global_cap_the_busiest_source_loses_its_oldest() -> None:
    carrier = TcpCarrier(max_unauthenticated=3)
    listener = await carrier.bind(1)
    hostile = [await _raw_from(carrier, "127.0.0.2") for _ in range(3)]
    await _until(lambda: carrier.unauthenticated == 3)
    reader, writer = await _raw_from(carrier, "127.0.0.1")
    # The newcomer from another address got in; the first hostile socket went.
    assert await _closed_by_peer(hostile[0][0])
    writer.write(b"PLTP\x01\x00\x01")
    stream = await asyncio.wait_for(listener.accept(), 10)
    assert stream.remote_hint.startswith("127.0.0.1:")
    assert (await carrier.info())["preauth"]["shed"] == 1
    await stream.aclose()
    writer.close()
    del reader
    for _, hostile_writer in hostile:
        hostile_writer.close()
    await carrier.aclose()


async def test_one_source_waits_beyond_its_limit_and_others_do_not() -> None:
    carrier = TcpCarrier(max_active_per_source=2)
    listener = await carrier.bind(1)
    idle = [await _raw_from(carrier, "127.0.0.2") for _ in range(2)]
    _, queued = await _raw_from(carrier, "127.0.0.2")
    queued.write(b"PLTP\x01\x00\x01")  # unread until an earlier one of 127.0.0.2 leaves
    await _until(lambda: carrier.unauthenticated == 3)
    _, other = await _raw_from(carrier, "127.0.0.1")
    other.write(b"PLTP\x01\x00\x01")
    first = await asyncio.wait_for(listener.accept(), 10)
    assert first.remote_hint.startswith("127.0.0.1:")
    assert carrier.unauthenticated == 3
    idle[0][1].close()
    second = await asyncio.wait_for(listener.accept(), 10)
    assert second.remote_hint.startswith("127.0.0.2:")
    assert second.remote_hint.endswith(str(queued.get_extra_info("sockname")[1]))
    for stream in (first, second):
        await stream.aclose()
    for writer in (idle[1][1], queued, other):
        writer.close()
    await carrier.aclose()


async def test_one_source_beyond_its_total_is_refused_and_others_are_not() -> None:
    carrier = TcpCarrier(max_active_per_source=1, max_per_source=2)
    listener = await carrier.bind(1)
    held = [await _raw_from(carrier, "127.0.0.2") for _ in range(2)]
    await _until(lambda: carrier.unauthenticated == 2)
    refused_reader, refused = await _raw_from(carrier, "127.0.0.2")
    assert await _closed_by_peer(refused_reader)
    assert (await carrier.info())["preauth"]["source_full"] == 1
    _, other = await _raw_from(carrier, "127.0.0.1")
    other.write(b"PLTP\x01\x00\x01")
    stream = await asyncio.wait_for(listener.accept(), 10)
    assert stream.remote_hint.startswith("127.0.0.1:")
    await stream.aclose()
    for writer in (*(w for _, w in held), refused, other):
        writer.close()
    await carrier.aclose()


async def test_preauth_deadline_ends_when_the_stream_is_marked_authenticated() -> None:
    carrier = TcpCarrier(preauth_timeout=0.3)
    listener = await carrier.bind(1)
    _, marked = await _raw(carrier)
    marked.write(b"PLTP\x01\x00\x01")
    stream = await asyncio.wait_for(listener.accept(), 10)
    mark = getattr(stream, "mark_authenticated")  # noqa: B009  # duck-typed by the transport
    mark()
    assert carrier.unauthenticated == 0
    unmarked_reader, unmarked = await _raw(carrier)
    unmarked.write(b"PLTP\x01\x00\x01")
    late = await asyncio.wait_for(listener.accept(), 10)
    # Not authenticated in time: the connection is reset under its reader.
    with pytest.raises(StreamResetError):
        async with asyncio.timeout(10):
            await late.read()
    assert await _closed_by_peer(unmarked_reader)
    assert (await carrier.info())["preauth"]["preauth_timeouts"] == 1
    await stream.write(b"still open")
    await stream.aclose()
    for writer in (marked, unmarked):
        writer.close()
    await carrier.aclose()


async def test_dialling_an_unbound_port_or_a_full_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    server = TcpCarrier()
    await server.bind(1)
    client = TcpCarrier()
    target = DialTarget(name="server", endpoint=server.endpoint)
    stream = await client.dial(target, 2)
    await stream.write(b"hello")
    with pytest.raises(PortNotListeningError, match="port 2"):
        await stream.read()
    await stream.aclose()
    monkeypatch.setattr(server._listeners[1].queue, "_maxsize", 0)
    stream = await client.dial(target, 1)
    await stream.write(b"hello")
    with pytest.raises(PeerUnreachableError, match="backlog is full"):
        await stream.read()
    await stream.aclose()
    await client.aclose()
    await server.aclose()


async def test_closing_the_carrier_resets_live_streams() -> None:
    server = TcpCarrier()
    listener = await server.bind(1)
    client = TcpCarrier()
    stream = await client.dial(DialTarget(endpoint=server.endpoint), 1)
    await stream.write(b"x")
    accepted = await listener.accept()
    assert await accepted.read() == b"x"
    reader = asyncio.create_task(stream.read())
    await client.aclose()
    with pytest.raises(StreamResetError):
        await asyncio.wait_for(reader, 5)
    with contextlib.suppress(StreamResetError):  # the peer sees the close: EOF or reset
        assert await asyncio.wait_for(accepted.read(), 5) == b""
    with pytest.raises(StreamClosedError):
        await client.dial(DialTarget(endpoint=server.endpoint), 1)
    await server.aclose()
