"""The tcp:// carrier's own rules: the virtual-port header, its timeout and limits."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from pilot_transport._carrier import DialTarget
from pilot_transport._carriers import tcp
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


async def test_garbage_and_silence_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    carrier = TcpCarrier(header_timeout=0.2)
    await carrier.bind(1)
    reader, writer = await _raw(carrier)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    assert await _closed_by_peer(reader)
    writer.close()
    reader, writer = await _raw(carrier)  # says nothing: dropped after header_timeout
    assert await _closed_by_peer(reader)
    writer.close()
    assert carrier._unidentified == 0
    await carrier.aclose()


async def test_too_many_unidentified_connections_are_shed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tcp, "_MAX_UNIDENTIFIED", 2)
    carrier = TcpCarrier()
    listener = await carrier.bind(1)
    idle = [await _raw(carrier) for _ in range(2)]
    reader, writer = await _raw(carrier)
    assert await _closed_by_peer(reader)
    writer.close()
    # Once one idle connection names its port, there is room again.
    idle[0][1].write(b"PLTP\x01\x00\x01")
    stream = await asyncio.wait_for(listener.accept(), 5)
    async with asyncio.timeout(5):
        while carrier._unidentified != 1:
            await asyncio.sleep(0.01)
    await stream.aclose()
    for _, idle_writer in idle:
        idle_writer.close()
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
