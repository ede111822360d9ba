"""The pilot:// carrier end to end against linked daemon doubles."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from pilot_transport._address import Address, SocketAddress
from pilot_transport._carrier import DialTarget
from pilot_transport._carriers import _pilot_ipc as ipc
from pilot_transport._carriers.pilot import (
    Datagram,
    PilotCarrier,
    PilotCarrierOptions,
    PilotStream,
)
from pilot_transport.errors import (
    DaemonError,
    DaemonUnavailableError,
    ListenerClosedError,
    PeerUnreachableError,
    PortInUseError,
    PortNotListeningError,
    StreamClosedError,
    StreamResetError,
    TransportUsageError,
    UnknownPeerError,
)
from pilot_transport.testing import check_stream_conformance
from pilot_transport.testing._daemon_double import PilotDaemonDouble, PilotNetworkDouble


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds (polling), failing after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def read_exactly(stream: PilotStream, size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size:
        data = await stream.read(size - got)
        assert data, f"EOF after {got} of {size} bytes"
        parts.append(data)
        got += len(data)
    return b"".join(parts)


async def read_to_eof(stream: PilotStream) -> bytes:
    parts: list[bytes] = []
    while data := await stream.read():
        parts.append(data)
    return b"".join(parts)


async def echo_forever(stream: PilotStream) -> None:
    try:
        while data := await stream.read():
            await stream.write(data)
        await stream.write_eof()
    except (StreamResetError, StreamClosedError):
        pass
    finally:
        await stream.aclose()


class Net:
    def __init__(
        self, a: PilotDaemonDouble, b: PilotDaemonDouble, ca: PilotCarrier, cb: PilotCarrier
    ):
        self.a, self.b, self.ca, self.cb = a, b, ca, cb
        self.tasks: set[asyncio.Task[None]] = set()

    def target(self, daemon: PilotDaemonDouble | None = None) -> DialTarget:
        return DialTarget(name="b", address=str((daemon or self.b).address))

    async def echo_server(self, port: int) -> None:
        listener = await self.cb.bind(port)

        async def serve() -> None:
            async for stream in listener:
                task = asyncio.create_task(echo_forever(stream))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

        task = asyncio.create_task(serve())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ptc-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def net(sock_dir: str) -> AsyncIterator[Net]:
    network = PilotNetworkDouble()
    async with (
        PilotDaemonDouble(f"{sock_dir}/a.sock", network=network, hostname="alpha") as a,
        PilotDaemonDouble(f"{sock_dir}/b.sock", network=network, hostname="beta", public=True) as b,
        PilotCarrier(a.socket_path) as ca,
        PilotCarrier(b.socket_path) as cb,
    ):
        n = Net(a, b, ca, cb)
        try:
            yield n
        finally:
            for task in list(n.tasks):
                task.cancel()
            await asyncio.gather(*n.tasks, return_exceptions=True)


async def test_stream_conformance(net: Net) -> None:
    listener = await net.cb.bind(5000)

    async def make_pair() -> tuple[PilotStream, PilotStream]:
        client = await net.ca.dial(net.target(), 5000)
        server = await listener.accept()
        return client, server

    await check_stream_conformance(make_pair, large_size=1024 * 1024)


async def test_ping_pong_never_sends_a_grant_on_its_own(net: Net) -> None:
    # A credit grant sent as its own Send, followed by the next data Send, is a
    # Nagle stall in the real daemon (6-40 ms every 64 KiB read): grants must
    # ride on data. 2,000 round trips of 200 bytes cross the grant threshold
    # (a quarter of the 256 KiB window) several times on each side.
    await net.echo_server(5000)
    stream = await net.ca.dial(net.target(), 5000)
    for i in range(2000):
        message = hashlib.sha256(b"%d" % i).digest() * 6 + b"12345678"
        await stream.write(message)
        assert await read_exactly(stream, len(message)) == message
    assert net.a.nagle_stalls == 0
    assert net.b.nagle_stalls == 0
    await stream.aclose()


async def test_the_double_counts_a_small_send_that_follows_an_unanswered_one(
    net: Net,
) -> None:
    net.a.nagle_window = 3600.0  # no time limit: the pattern alone counts
    listener = await net.cb.bind(5000)
    client = await net.ca.dial(net.target(), 5000)
    server = await listener.accept()
    await client.write(b"one")  # carries the client's first grant: one Send
    assert await read_exactly(server, 3) == b"one"
    assert net.a.nagle_stalls == 0
    await client.write(b"two")  # the server has sent nothing since "one"
    assert await read_exactly(server, 3) == b"two"
    assert net.a.nagle_stalls == 1
    await server.write(b"ack")
    assert await read_exactly(client, 3) == b"ack"
    await client.write(b"three")  # answered by "ack": not held
    assert await read_exactly(server, 5) == b"three"
    assert net.a.nagle_stalls == 1
    assert net.b.nagle_stalls == 0
    await client.aclose()
    await server.aclose()


async def test_many_streams_no_cross_talk(net: Net) -> None:
    await net.echo_server(5000)

    async def one(i: int) -> None:
        stream = await net.ca.dial(net.target(), 5000)
        data = hashlib.sha256(b"%d" % i).digest() * (500 + 97 * i)
        writer = asyncio.create_task(stream.write(data))
        assert await read_exactly(stream, len(data)) == data
        await writer
        await stream.write_eof()
        assert await stream.read() == b""
        await stream.aclose()

    await asyncio.gather(*(one(i) for i in range(24)))
    # accepted streams share the listener's one IPC connection on b
    assert net.b.client_count <= 1 + net.cb.options.control_connections


async def test_stray_error_on_a_listener_connection_fails_nothing_unrelated(
    net: Net, caplog: pytest.LogCaptureFixture
) -> None:
    await net.echo_server(5000)
    streams = [await net.ca.dial(net.target(), 5000) for _ in range(3)]
    await eventually(lambda: len(net.tasks) >= 4)
    caplog.set_level(logging.WARNING, "pilot_transport.pilot")
    net.b.push_error("send: connection 99 not found", port=5000)
    # requests that expect replies on b's side all still succeed
    info, listener2 = await asyncio.gather(net.cb.daemon_info(), net.cb.bind(5001))
    assert info["address"] == str(net.b.address)
    assert listener2.port == 5001
    for i, stream in enumerate(streams):
        await stream.write(b"still fine %d" % i)
        assert await read_exactly(stream, 12) == b"still fine %d" % i
    await eventually(lambda: net.cb.stats.get("stray_errors") == 1)
    assert "no conn id" in caplog.text


async def test_stray_error_on_a_dial_connection_fails_only_that_stream(net: Net) -> None:
    await net.echo_server(5000)
    victim = await net.ca.dial(net.target(), 5000)
    bystander = await net.ca.dial(net.target(), 5000)
    net.a.push_error("send: window full", conn_id=victim.conn_id)
    assert (await net.ca.daemon_info())["address"] == str(net.a.address)
    await eventually(lambda: victim._error is not None)
    with pytest.raises(StreamResetError, match="window full"):
        await victim.write(b"x")
    await bystander.write(b"ok")
    assert await read_exactly(bystander, 2) == b"ok"
    await victim.aclose()
    await bystander.aclose()


async def test_writes_are_split_below_the_frame_limit(net: Net, sock_dir: str) -> None:
    await net.echo_server(5000)
    big = PilotCarrier(net.a.socket_path, options=PilotCarrierOptions(send_chunk=ipc.MAX_SEND_DATA))
    async with big:
        # raw: 3 MiB in one write through the echo service (port 7)
        raw = await big.open_raw_stream(net.b.address, 7)
        data = os.urandom(3 * 1024 * 1024)
        writer = asyncio.create_task(raw.write(data))
        assert await read_exactly(raw, len(data)) == data
        await writer
        await raw.aclose()
        # framed: escaping makes an all-"SAC" payload 4/3 as long; still below the limit
        stream = await big.dial(net.target(), 5000)
        payload = b"SAC" * 400_001 + b"S"
        writer = asyncio.create_task(stream.write(payload))
        assert await read_exactly(stream, len(payload)) == payload
        await writer
        await stream.aclose()
    assert net.a.dropped_clients == 0
    assert net.b.dropped_clients == 0


async def test_sack_prefixed_payloads_survive_framed_streams(net: Net) -> None:
    await net.echo_server(5000)
    stream = await net.ca.dial(net.target(), 5000)
    for n in range(1, 5):
        message = b"SACK" + bytes([n]) + b" looks like a SACK block" * 200
        await stream.write(message)
        assert await read_exactly(stream, len(message)) == message
    await stream.aclose()


async def test_a_reader_that_stops_holds_back_only_its_own_writer(net: Net) -> None:
    listener = await net.cb.bind(5000)
    slow_client = await net.ca.dial(net.target(), 5000)
    slow_server = await listener.accept()
    data = os.urandom(2 * 1024 * 1024)
    writer = asyncio.create_task(slow_client.write(data))
    await eventually(lambda: slow_server._rx_bytes >= net.cb.options.stream_window // 2)
    # another stream on the same listener connection flows freely meanwhile
    fast_client = await net.ca.dial(net.target(), 5000)
    fast_server = await listener.accept()
    other = os.urandom(1024 * 1024)
    other_writer = asyncio.create_task(fast_client.write(other))
    assert await read_exactly(fast_server, len(other)) == other
    await other_writer
    # A reader that never writes still grants its whole window (its grants wait
    # for a write of its own only while the writer has half the window left).
    await eventually(lambda: slow_server._rx_bytes == net.cb.options.stream_window)
    assert not writer.done(), "the writer should be waiting for credit"
    assert slow_server._rx_bytes <= net.cb.options.stream_window
    assert await read_exactly(slow_server, len(data)) == data
    await writer
    for s in (slow_client, slow_server, fast_client, fast_server):
        await s.aclose()


async def test_raw_stream_reader_too_slow_is_reset_clearly(net: Net) -> None:
    small = PilotCarrier(net.a.socket_path, options=PilotCarrierOptions(raw_buffer_limit=64 * 1024))
    async with small:
        raw = await small.open_raw_stream(net.b.address, 7)
        other = await small.open_raw_stream(net.b.address, 7)
        await raw.write(os.urandom(200 * 1024))  # echoed back, never read
        await eventually(lambda: raw._error is not None)
        with pytest.raises(StreamResetError, match="inbound buffer limit exceeded"):
            await read_exactly(raw, 300 * 1024)
        await other.write(b"unaffected")
        assert await read_exactly(other, 10) == b"unaffected"


async def test_a_slow_dial_blocks_no_other_stream(net: Net) -> None:
    await net.echo_server(5000)
    net.a.unreachable_dial_delay = 2.0
    existing = await net.ca.dial(net.target(), 5000)
    before = net.a.client_count
    slow = asyncio.create_task(net.ca.dial(DialTarget(address=str(Address(0, 0x99))), 5000))
    await eventually(lambda: net.a.client_count > before)  # the slow dial's connection is up
    for _ in range(20):
        await existing.write(b"ping")
        assert await read_exactly(existing, 4) == b"ping"
    fresh = await net.ca.dial(net.target(), 5000)
    assert (await net.ca.daemon_info())["node_id"] == 1
    assert not slow.done()
    with pytest.raises(PeerUnreachableError, match="timeout"):
        await slow
    await fresh.aclose()
    await existing.aclose()


async def test_cancelled_dial_releases_its_connection(net: Net) -> None:
    net.a.unreachable_dial_delay = 30.0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await net.ca.dial(DialTarget(address="0:0000.0000.0063"), 1)
    assert not net.ca._hosts  # its IPC connection was dropped, so the daemon can abandon it
    await net.echo_server(5000)
    stream = await net.ca.dial(net.target(), 5000)  # and nothing else is stuck behind it
    await stream.aclose()


async def test_daemon_restart_fails_streams_clearly_and_rebinds_listeners(net: Net) -> None:
    listener = await net.cb.bind(5000)
    client = await net.ca.dial(net.target(), 5000)
    server = await listener.accept()
    await client.write(b"before")
    assert await read_exactly(server, 6) == b"before"

    await net.b.restart()
    with pytest.raises(StreamResetError, match="lost"):
        await server.read()
    with pytest.raises(StreamResetError, match="without a clean close"):
        await client.read()
    with pytest.raises(StreamResetError):
        await client.write(b"after")
    await client.aclose()
    await server.aclose()

    await eventually(lambda: 5000 in net.b.bound_ports)
    assert listener.rebinds == 1
    again = await net.ca.dial(net.target(), 5000)
    accepted = await listener.accept()
    await again.write(b"after restart")
    assert await read_exactly(accepted, 13) == b"after restart"
    assert (await net.cb.daemon_info())["ports"] == [5000]  # control pool reconnected
    await again.aclose()
    await accepted.aclose()


async def test_daemon_down_is_daemon_unavailable(net: Net, sock_dir: str) -> None:
    await net.a.stop()
    with pytest.raises(DaemonUnavailableError, match="is the daemon running"):
        await net.ca.daemon_info()
    with pytest.raises(DaemonUnavailableError):
        await net.ca.dial(net.target(), 5000)
    with pytest.raises(DaemonUnavailableError):
        await net.ca.bind(5000)
    await net.a.start()
    assert (await net.ca.info())["address"] == str(net.a.address)
    nowhere = PilotCarrier(f"{sock_dir}/missing.sock")
    with pytest.raises(DaemonUnavailableError, match=r"missing\.sock"):
        await nowhere.info()
    await nowhere.aclose()


async def test_bind_and_dial_errors(net: Net) -> None:
    listener = await net.cb.bind(5000)
    with pytest.raises(PortInUseError, match="already has a listener"):
        await net.cb.bind(5000)
    async with PilotCarrier(net.b.socket_path) as other:
        with pytest.raises(PortInUseError, match="already bound"):
            await other.bind(5000)
    with pytest.raises(PortNotListeningError, match="refused"):
        await net.ca.dial(net.target(), 5999)
    with pytest.raises(UnknownPeerError, match="no Pilot address"):
        await net.ca.dial(DialTarget(name="ghost"), 5000)
    with pytest.raises(TransportUsageError, match="port"):
        await net.ca.dial(net.target(), 70000)
    # a hostname in the target is resolved through the daemon
    client = await net.ca.dial(DialTarget(extra={"hostname": "beta"}), 5000)
    server = await listener.accept()
    assert server.remote.address == net.a.address
    assert client.remote == SocketAddress(net.b.address, 5000)
    await client.aclose()
    await server.aclose()


async def test_listener_close_keeps_accepted_streams_and_later_releases_the_port(net: Net) -> None:
    listener = await net.cb.bind(5000)
    waiter = asyncio.create_task(listener.accept())
    client = await net.ca.dial(net.target(), 5000)
    server = await waiter
    pending = asyncio.create_task(listener.accept())
    await listener.aclose()
    with pytest.raises(ListenerClosedError):
        await pending
    await client.write(b"still here")
    assert await read_exactly(server, 10) == b"still here"
    # the daemon has no Unbind; the port goes when the last stream on it closes
    late = await net.ca.dial(net.target(), 5000)  # accepted by the daemon, closed by us
    with pytest.raises(StreamResetError):
        await late.read()
    await server.aclose()
    await client.aclose()
    await eventually(lambda: 5000 not in net.b.bound_ports)
    async with PilotCarrier(net.b.socket_path) as other:
        assert (await other.bind(5000)).port == 5000
    await late.aclose()


async def test_accept_backlog_overflow_closes_excess_streams(net: Net) -> None:
    opts = PilotCarrierOptions(accept_backlog=2)
    async with PilotCarrier(net.b.socket_path, options=opts) as cb:
        listener = await cb.bind(5000)
        clients = [await net.ca.dial(net.target(), 5000) for _ in range(3)]
        await eventually(lambda: cb.stats.get("rejected_accepts") == 1)
        with pytest.raises(StreamResetError):
            await clients[2].read()
        for _ in range(2):
            await (await listener.accept()).aclose()
        for c in clients:
            await c.aclose()


async def test_datagrams_filtered_by_port_without_duplicates(net: Net) -> None:
    await net.cb.bind(5000)  # b's carrier now has several IPC connections
    receiver = await net.cb.listen_datagrams(4000)
    await net.ca.send_datagram(net.b.address, 4001, b"not for us")
    for word in (b"one", b"two", b"end"):
        await net.ca.send_datagram(str(net.b.address), 4000, word)
    got: list[Datagram] = []
    async with asyncio.timeout(5):
        while not got or got[-1].data != b"end":
            got.append(await receiver.recv())
    assert [d.data for d in got] == [b"one", b"two", b"end"]
    assert got[0].source.address == net.a.address
    assert got[0].port == 4000
    with pytest.raises(TransportUsageError, match="65535"):
        await net.ca.send_datagram(net.b.address, 4000, b"x" * 65536)
    await net.ca.send_datagram(Address(0, 0x42), 4000, b"to nowhere")
    await eventually(lambda: net.ca.stats.get("stray_errors") == 1)
    await net.ca.send_datagram(net.b.address, 4000, b"later")
    assert (await net.cb.recv_datagram(4000)).data == b"later"
    receiver.close()
    with pytest.raises(ListenerClosedError):
        await receiver.recv()


async def test_daemon_features(net: Net) -> None:
    info = await net.ca.info()
    assert info["carrier"] == "pilot"
    assert info["node_id"] == 1
    assert info["daemon"]["public_key"]
    assert await net.ca.address() == net.a.address
    found = await net.ca.resolve_hostname("beta")
    assert found["address"] == str(net.b.address)
    with pytest.raises(DaemonError, match="not found"):
        await net.ca.resolve_hostname("nobody")
    assert await net.ca.set_hostname("alpha-1") == {"hostname": "alpha-1"}
    assert await net.ca.set_visibility(True) == {"public": True}
    assert await net.ca.set_tags(["gpu"]) == {"tags": ["gpu"]}
    with pytest.raises(TransportUsageError):
        await net.ca.set_tags(["a", "b", "c", "d"])
    assert (await net.ca.handshake_request(2, "hello"))["status"] == "sent"
    pending = await net.cb.handshake_pending()
    assert pending[0]["node_id"] == 1
    assert pending[0]["justification"] == "hello"
    assert (await net.cb.handshake_approve(1))["status"] == "approved"
    assert [t["node_id"] for t in await net.cb.handshake_trusted()] == [1]
    assert (await net.cb.handshake_revoke(1))["status"] == "revoked"
    assert (await net.cb.handshake_reject(7, "no"))["status"] == "rejected"
    assert await net.cb.handshake_trusted() == []
    assert await net.ca.set_webhook("http://127.0.0.1:9/hook") == {
        "webhook": "http://127.0.0.1:9/hook"
    }
    assert await net.ca.set_task_exec(True) == {"task_exec": True}
    assert (await net.ca.deregister())["status"] == "deregistered"


async def test_event_stream_over_raw_streams(net: Net) -> None:
    def event(topic: str, payload: bytes) -> bytes:
        t = topic.encode()
        return struct.pack(">H", len(t)) + t + struct.pack(">I", len(payload)) + payload

    sub = await net.ca.open_raw_stream(net.b.address, 1002)
    pub = await net.cb.open_raw_stream(net.b.address, 1002)
    await sub.write(event("jobs", b""))
    await pub.write(event("*", b""))
    # the double handles each stream's events in arrival order; the
    # subscription is registered once the echo of a later round trip returns
    await net.ca.daemon_info()
    await pub.write(event("jobs", b'{"id": 1}'))
    expected = event("jobs", b'{"id": 1}')
    assert await read_exactly(sub, len(expected)) == expected
    await pub.write_eof()  # raw streams: ends both directions
    assert await pub.read() == b""
    await sub.aclose()
    await pub.aclose()


async def test_carrier_close_is_idempotent_and_final(net: Net) -> None:
    listener = await net.cb.bind(5000)
    client = await net.ca.dial(net.target(), 5000)
    server = await listener.accept()
    await net.cb.aclose()
    await net.cb.aclose()
    with pytest.raises(StreamClosedError):
        await server.read()
    with pytest.raises(ListenerClosedError):
        await listener.accept()
    assert await client.read() == b""
    with pytest.raises(TransportUsageError, match="closed"):
        await net.cb.bind(5001)
    await client.aclose()


def test_options_are_validated() -> None:
    with pytest.raises(TransportUsageError, match="stream_window"):
        PilotCarrierOptions(stream_window=1000)
    with pytest.raises(TransportUsageError, match="send_chunk"):
        PilotCarrierOptions(send_chunk=ipc.MAX_SEND_DATA + 1)
    with pytest.raises(TransportUsageError, match="request_timeout"):
        PilotCarrierOptions(request_timeout=0)


async def test_a_control_reply_that_comes_too_late_is_never_taken_for_the_next(net: Net) -> None:
    opts = PilotCarrierOptions(request_timeout=0.2, control_connections=1)
    async with PilotCarrier(net.a.socket_path, options=opts) as slow:
        net.a.command_delay[ipc.Cmd.RESOLVE_HOSTNAME] = 0.5
        with pytest.raises(DaemonError, match="did not answer"):
            await slow.resolve_hostname("beta")
        net.a.command_delay.clear()
        # the late ResolveHostname reply went to the discarded connection
        assert (await slow.daemon_info())["address"] == str(net.a.address)
        cancelled = asyncio.create_task(slow.resolve_hostname("beta"))
        net.a.command_delay[ipc.Cmd.RESOLVE_HOSTNAME] = 0.5
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        net.a.command_delay.clear()
        assert (await slow.resolve_hostname("beta"))["hostname"] == "beta"
        assert (await slow.daemon_info())["address"] == str(net.a.address)


async def test_raw_listener_and_raw_stream_pass_bytes_unchanged(net: Net) -> None:
    listener = await net.cb.bind_raw(6000)
    client = await net.ca.open_raw_stream(str(net.b.address), 6000)
    server = await listener.accept()
    assert server.framed is False
    message = b"SAC\x00 unescaped, S"
    await client.write(message)
    assert await read_exactly(server, len(message)) == message
    await server.write_eof()  # no half-close on raw streams: ends both directions
    assert await client.read() == b""
    assert await server.read() == b""
    with pytest.raises(StreamClosedError, match="write_eof"):
        await server.write(b"late")
    await client.aclose()
    await server.aclose()


async def test_datagram_receivers_survive_a_daemon_restart(net: Net) -> None:
    receiver = await net.cb.listen_datagrams(4000)
    await net.b.restart()
    got: list[Datagram] = []

    async def keep_sending() -> None:
        while True:  # datagrams are lossy: repeat until one lands after the reconnect
            with contextlib.suppress(DaemonUnavailableError):
                await net.ca.send_datagram(net.b.address, 4000, b"again")
            await asyncio.sleep(0.02)

    sender = asyncio.create_task(keep_sending())
    try:
        async with asyncio.timeout(10):
            got.append(await receiver.recv())
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    assert got[0].data == b"again"


async def test_write_then_aclose_delivers_everything_although_close_drops_the_unacked_tail(
    net: Net,
) -> None:
    # The double, like the real daemon, discards data still in flight when told to
    # close: aclose() must wait for the peer's end-of-stream acknowledgement first.
    assert net.a.close_drops_unacked
    listener = await net.cb.bind(5000)
    for size in (1, 4096, 64 * 1024 + 3, 1024 * 1024):
        body = os.urandom(size)

        async def receive() -> bytes:
            server = await listener.accept()
            try:
                return await read_to_eof(server)
            finally:
                await server.aclose()

        reader = asyncio.create_task(receive())
        stream = await net.ca.dial(net.target(), 5000)
        await stream.write(body)
        await stream.aclose()
        assert await reader == body
    assert net.ca.stats.get("close_linger_expired", 0) == 0


async def test_aclose_waits_for_a_peer_that_never_acknowledges_only_up_to_close_linger(
    net: Net,
) -> None:
    # A raw listener does not decode the stream encoding, so it never acknowledges.
    listener = await net.cb.bind_raw(5001)
    async with PilotCarrier(
        net.a.socket_path, options=PilotCarrierOptions(close_linger=0.2)
    ) as carrier:
        stream = await carrier.dial(net.target(), 5001)
        server = await listener.accept()
        await stream.write(b"hello")
        await stream.aclose()
        assert carrier.stats.get("close_linger_expired", 0) == 1
        assert b"hello" in await read_to_eof(server)  # raw: the encoding, credit grants too
        await server.aclose()


def test_close_linger_option_is_validated() -> None:
    with pytest.raises(TransportUsageError):
        PilotCarrierOptions(close_linger=-1)
    assert PilotCarrierOptions(close_linger=0).close_linger == 0


async def test_dial_pacer_allows_a_burst_then_paces_at_its_rate() -> None:
    from pilot_transport._carriers.pilot import _DialPacer

    now = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = _DialPacer(3, 2.0, clock=lambda: now[0], sleep=fake_sleep)
    for _ in range(3):
        await pacer.acquire()
    assert slept == []
    await pacer.acquire()  # the bucket is empty: one token takes 1/rate seconds
    assert slept == [pytest.approx(0.5)]
    now[0] += 10.0  # idle time refills only up to the burst
    for _ in range(3):
        await pacer.acquire()
    assert len(slept) == 1
    await pacer.acquire()
    assert len(slept) == 2


def test_dial_pacing_options_are_validated() -> None:
    with pytest.raises(TransportUsageError):
        PilotCarrierOptions(dial_burst=0)
    with pytest.raises(TransportUsageError):
        PilotCarrierOptions(dial_rate=0)


async def test_stream_conformance_with_1_18_sized_receive_frames(sock_dir: str) -> None:
    # 1.18.0 pushes Recv frames of at most 1,152 data bytes (older daemons 4,096).
    network = PilotNetworkDouble()
    async with (
        PilotDaemonDouble(f"{sock_dir}/a.sock", network=network, segment_size=1152) as a,
        PilotDaemonDouble(f"{sock_dir}/b.sock", network=network, segment_size=1152) as b,
        PilotCarrier(a.socket_path) as ca,
        PilotCarrier(b.socket_path) as cb,
    ):
        listener = await cb.bind(5000)

        async def make_pair() -> tuple[PilotStream, PilotStream]:
            client = await ca.dial(DialTarget(address=str(b.address)), 5000)
            server = await listener.accept()
            return client, server

        await check_stream_conformance(make_pair, large_size=512 * 1024)


class _RecordingTransport:
    """Wraps an IPC socket's transport and records each ``write``."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.inner.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def _record(stream: PilotStream) -> _RecordingTransport:
    host = stream._host
    assert host._transport is not None
    recorder = _RecordingTransport(host._transport)
    host._transport = recorder  # type: ignore[assignment]
    return recorder


def _frames(data: bytes) -> list[ipc.Frame]:
    return ipc.FrameDecoder().feed(data)


async def _accepted(net: Net, count: int) -> tuple[list[PilotStream], list[PilotStream]]:
    listener = await net.cb.bind(5000)
    clients = [await net.ca.dial(net.target(), 5000) for _ in range(count)]
    servers = [await listener.accept() for _ in range(count)]
    assert all(s._host is servers[0]._host for s in servers)  # one listener connection
    await asyncio.sleep(0)  # let a pass opened by the accepts' grants end
    await asyncio.sleep(0)
    return clients, servers


async def test_sends_of_streams_sharing_a_connection_share_a_socket_write(net: Net) -> None:
    clients, servers = await _accepted(net, 3)
    recorder = _record(servers[0])
    assert servers[0].try_write(b"one")
    assert len(recorder.writes) == 1  # the first of this loop pass goes out at once
    assert servers[1].try_write(b"two")
    assert servers[2].try_write(b"three")
    assert len(recorder.writes) == 1  # the later ones wait for the end of the pass
    await eventually(lambda: len(recorder.writes) > 1)
    assert len(recorder.writes) == 2
    frames = _frames(recorder.writes[1])
    assert [f.cmd for f in frames] == [ipc.Cmd.SEND, ipc.Cmd.SEND]
    assert await read_exactly(clients[0], 3) == b"one"
    assert await read_exactly(clients[1], 3) == b"two"
    assert await read_exactly(clients[2], 5) == b"three"
    assert servers[1].try_write(b"next pass")  # a new pass: at once again
    assert len(recorder.writes) == 3
    assert await read_exactly(clients[1], 9) == b"next pass"
    for stream in (*clients, *servers):
        await stream.aclose()


async def test_held_sends_reach_the_socket_at_once_at_the_hold_limit(net: Net) -> None:
    # Held frames must not hide from the socket's backpressure: from 64 KiB
    # they are written at once, without waiting for the end of the loop pass.
    clients, servers = await _accepted(net, 3)
    recorder = _record(servers[0])
    assert servers[0].try_write(b"opens the pass")
    first, second = os.urandom(40_000), os.urandom(40_000)
    assert servers[1].try_write(first)
    assert len(recorder.writes) == 1
    assert servers[2].try_write(second)
    assert len(recorder.writes) == 2
    assert len(_frames(recorder.writes[1])) == 2
    assert await read_exactly(clients[0], 14) == b"opens the pass"
    assert await read_exactly(clients[1], len(first)) == first
    assert await read_exactly(clients[2], len(second)) == second
    for stream in (*clients, *servers):
        await stream.aclose()


async def test_a_connection_with_one_stream_writes_each_send_at_once(net: Net) -> None:
    await net.echo_server(5000)
    client = await net.ca.dial(net.target(), 5000)
    recorder = _record(client)
    assert client.try_write(b"ping")
    assert client.try_write(b"pong")
    assert len(recorder.writes) == 2  # nothing to share a send with: no wait
    assert await read_exactly(client, 8) == b"pingpong"
    await client.aclose()


async def test_held_data_then_close_delivers_everything_in_order(net: Net) -> None:
    clients, servers = await _accepted(net, 2)
    recorder = _record(servers[0])
    assert servers[1].try_write(b"opens the pass")
    assert servers[0].try_write(b"last words")
    assert len(recorder.writes) == 1  # "last words" is held
    closing = asyncio.create_task(servers[0].aclose())  # end-of-stream and Close queue behind
    assert await read_to_eof(clients[0]) == b"last words"
    await clients[0].aclose()
    await closing
    assert await read_exactly(clients[1], 14) == b"opens the pass"
    await servers[1].write(b"still open")
    assert await read_exactly(clients[1], 10) == b"still open"
    for stream in (clients[1], servers[1]):
        await stream.aclose()


async def test_signal_wakes_every_waiter_and_a_cancelled_one_wakes_no_other() -> None:
    from pilot_transport._carriers.pilot import _Signal

    signal = _Signal()
    first = asyncio.create_task(signal.wait())
    second = asyncio.create_task(signal.wait())
    victim = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    await asyncio.sleep(0)
    assert not first.done()  # the cancellation woke nobody
    assert not second.done()
    signal.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    await asyncio.wait_for(signal.wait(), 5)  # set: returns at once
    signal.clear()
    blocked = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    assert not blocked.done()
    signal.set()
    signal.set()  # repeating is harmless
    await asyncio.wait_for(blocked, 5)
    assert signal._waiters == []
