"""The daemon double reproduces the real daemon's socket protocol and quirks.

Driven by a bare client that speaks raw frames, so these tests pin the wire
behaviour the pilot:// carrier is written against (PILOT-DAEMON.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
from pilot_transport._address import Address
from pilot_transport._carriers import _pilot_ipc as ipc
from pilot_transport.testing._daemon_double import PilotDaemonDouble, PilotNetworkDouble


class RawClient:
    """A minimal daemon client: raw frames out, parsed messages in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = ipc.FrameDecoder()
        self.inbox: list[ipc.Message] = []

    @classmethod
    async def open(cls, path: str) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    def send(self, frame: bytes) -> None:
        self.writer.write(frame)

    async def next(self, timeout: float = 5.0) -> ipc.Message:
        async with asyncio.timeout(timeout):
            while not self.inbox:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("daemon closed the connection")
                self.inbox += [ipc.parse_message(f) for f in self.decoder.feed(data)]
        return self.inbox.pop(0)

    async def expect_eof(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while await self.reader.read(65536):
                pass

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ptd-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def pair(sock_dir: str) -> AsyncIterator[tuple[PilotDaemonDouble, PilotDaemonDouble]]:
    net = PilotNetworkDouble()
    async with (
        PilotDaemonDouble(f"{sock_dir}/a.sock", network=net, hostname="alpha") as a,
        PilotDaemonDouble(f"{sock_dir}/b.sock", network=net, hostname="beta", public=True) as b,
    ):
        yield a, b


async def test_socket_is_owner_only_and_addresses_are_sequential(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, b = pair
    assert stat.S_IMODE(os.stat(a.socket_path).st_mode) == 0o600
    assert (str(a.address), str(b.address)) == ("0:0000.0000.0001", "0:0000.0000.0002")


async def test_replies_in_order_and_send_errors_come_later_without_ids(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, _ = pair
    c = await RawClient.open(a.socket_path)
    c.send(ipc.send(999, b"to nowhere"))  # no success reply; fails later
    c.send(ipc.info())
    c.send(ipc.bind(80))
    first = await c.next()
    assert isinstance(first, ipc.JsonReply)
    assert first.value["address"] == str(a.address)
    assert await c.next() == ipc.BindOK(80)
    late = await c.next()
    assert isinstance(late, ipc.Error)
    assert late.code == 1
    assert "999" in late.message
    await c.close()


async def test_zero_length_ignored_unknown_command_answered_connection_continues(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, _ = pair
    c = await RawClient.open(a.socket_path)
    c.send(b"\x00\x00\x00\x00" + ipc.encode_frame(0x7E, b"?") + ipc.bind(1))
    err = await c.next()
    assert isinstance(err, ipc.Error)
    assert "0x7E" in err.message
    assert await c.next() == ipc.BindOK(1)
    await c.close()


async def test_oversize_frame_drops_the_client_with_its_streams_and_ports(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, b = pair
    server = await RawClient.open(b.socket_path)
    server.send(ipc.bind(5000))
    assert await server.next() == ipc.BindOK(5000)
    victim = await RawClient.open(a.socket_path)
    victim.send(ipc.bind(6000) + ipc.dial(b.address, 5000))
    assert await victim.next() == ipc.BindOK(6000)
    assert isinstance(await victim.next(), ipc.DialOK)
    accepted = await server.next()
    assert isinstance(accepted, ipc.Accept)
    victim.send(struct.pack(">IB", ipc.MAX_FRAME + 1, ipc.Cmd.SEND))
    await victim.expect_eof()
    assert await server.next() == ipc.CloseOK(accepted.conn_id)  # its stream died
    await victim.close()
    assert a.dropped_clients == 1
    other = await RawClient.open(a.socket_path)
    other.send(ipc.bind(6000))  # and its port was released
    assert await other.next() == ipc.BindOK(6000)
    await other.close()
    await server.close()


async def test_bind_is_literal_and_lasts_until_the_connection_closes(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, _ = pair
    c1 = await RawClient.open(a.socket_path)
    c1.send(ipc.bind(0))
    assert await c1.next() == ipc.BindOK(0)  # no ephemeral assignment
    c1.send(ipc.bind(9))
    assert await c1.next() == ipc.BindOK(9)
    c2 = await RawClient.open(a.socket_path)
    c2.send(ipc.bind(9) + ipc.bind(7))
    for _ in range(2):
        err = await c2.next()
        assert isinstance(err, ipc.Error)
        assert "already bound" in err.message
    await c1.close()
    async with asyncio.timeout(5):
        while 9 in a.bound_ports:
            await asyncio.sleep(0.005)
    c2.send(ipc.bind(9))
    assert await c2.next() == ipc.BindOK(9)
    await c2.close()


async def test_stream_lifecycle_two_closeoks_and_remote_end(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, b = pair
    server = await RawClient.open(b.socket_path)
    server.send(ipc.bind(5000))
    assert await server.next() == ipc.BindOK(5000)
    client = await RawClient.open(a.socket_path)
    client.send(ipc.dial(b.address, 5000))
    dial_ok = await client.next()
    assert isinstance(dial_ok, ipc.DialOK)
    accept = await server.next()
    assert isinstance(accept, ipc.Accept)
    assert accept.local_port == 5000
    assert accept.remote.address == a.address
    big = bytes(range(256)) * 40  # 10,240 bytes -> segments of at most 4096
    client.send(ipc.send(dial_ok.conn_id, big))
    got = b""
    sizes: list[int] = []
    while len(got) < len(big):
        recv = await server.next()
        assert isinstance(recv, ipc.Recv)
        assert recv.conn_id == accept.conn_id
        sizes.append(len(recv.data))
        got += recv.data
    assert got == big
    assert max(sizes) <= 4096
    client.send(ipc.close(dial_ok.conn_id))
    assert await client.next() == ipc.CloseOK(dial_ok.conn_id)  # the reply
    assert await client.next() == ipc.CloseOK(dial_ok.conn_id)  # the stream ended
    assert await server.next() == ipc.CloseOK(accept.conn_id)  # remote end, unsolicited
    client.send(ipc.close(12345))
    assert await client.next() == ipc.CloseOK(12345)  # always, even for unknown ids
    await client.close()
    await server.close()


async def test_dial_errors_and_slow_dial_blocks_only_its_own_connection(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, b = pair
    a.unreachable_dial_delay = 0.5
    c = await RawClient.open(a.socket_path)
    c.send(ipc.dial(b.address, 4444))
    refused = await c.next()
    assert isinstance(refused, ipc.Error)
    assert "refused" in refused.message
    other = await RawClient.open(a.socket_path)
    loop = asyncio.get_running_loop()
    start = loop.time()
    c.send(ipc.dial(Address(0, 77), 1) + ipc.info())
    other.send(ipc.info())
    assert isinstance(await other.next(), ipc.JsonReply)
    other_done = loop.time() - start
    timeout = await c.next()
    assert isinstance(timeout, ipc.Error)
    assert "timeout" in timeout.message
    assert isinstance(await c.next(), ipc.JsonReply)  # Info waited behind the dial
    assert loop.time() - start >= 0.5 > other_done
    await c.close()
    await other.close()


async def test_recvfrom_reaches_every_client_and_big_datagrams_fail_later(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, b = pair
    receivers = [await RawClient.open(b.socket_path) for _ in range(3)]
    receivers[0].send(ipc.info())  # make sure all three are registered
    await receivers[0].next()
    sender = await RawClient.open(a.socket_path)
    sender.send(ipc.send_to(b.address, 4000, b"ping"))
    for r in receivers:
        msg = await r.next()
        assert isinstance(msg, ipc.RecvFrom)
        assert (msg.source.address, msg.dst_port, msg.data) == (a.address, 4000, b"ping")
    sender.send(ipc.send_to(b.address, 4000, b"x" * 65536) + ipc.info())
    assert isinstance(await sender.next(), ipc.JsonReply)
    err = await sender.next()
    assert isinstance(err, ipc.Error)
    assert "too large" in err.message
    for r in [*receivers, sender]:
        await r.close()


async def test_json_commands_and_handshake(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, b = pair
    ca = await RawClient.open(a.socket_path)
    cb = await RawClient.open(b.socket_path)
    ca.send(ipc.text_command(ipc.Cmd.RESOLVE_HOSTNAME, "beta"))
    resolved = await ca.next()
    assert isinstance(resolved, ipc.JsonReply)
    assert resolved.value == {
        "node_id": 2,
        "address": "0:0000.0000.0002",
        "hostname": "beta",
        "public": True,
    }
    cb.send(ipc.text_command(ipc.Cmd.RESOLVE_HOSTNAME, "alpha"))  # private, untrusted
    assert isinstance(await cb.next(), ipc.Error)
    ca.send(ipc.handshake(ipc.HandshakeSub.REQUEST, 2, "let me in"))
    assert (await ca.next()) == ipc.JsonReply(
        ipc.Cmd.HANDSHAKE_OK, {"status": "sent", "node_id": 2}
    )
    cb.send(ipc.handshake(ipc.HandshakeSub.PENDING))
    pending = await cb.next()
    assert isinstance(pending, ipc.JsonReply)
    assert [p["justification"] for p in pending.value["pending"]] == ["let me in"]
    cb.send(ipc.handshake(ipc.HandshakeSub.APPROVE, 1) + ipc.handshake(ipc.HandshakeSub.TRUSTED))
    assert isinstance(await cb.next(), ipc.JsonReply)
    trusted = await cb.next()
    assert isinstance(trusted, ipc.JsonReply)
    assert trusted.value["trusted"][0]["node_id"] == 1
    ca.send(
        ipc.text_command(ipc.Cmd.SET_HOSTNAME, "alpha2")
        + ipc.flag_command(ipc.Cmd.SET_VISIBILITY, True)
        + ipc.set_tags(["x", "y"])
        + ipc.set_tags(["1", "2", "3", "4"])
    )
    assert (await ca.next()) == ipc.JsonReply(ipc.Cmd.SET_HOSTNAME_OK, {"hostname": "alpha2"})
    assert (await ca.next()) == ipc.JsonReply(ipc.Cmd.SET_VISIBILITY_OK, {"public": True})
    assert (await ca.next()) == ipc.JsonReply(ipc.Cmd.SET_TAGS_OK, {"tags": ["x", "y"]})
    assert isinstance(await ca.next(), ipc.Error)
    await ca.close()
    await cb.close()


def _event(topic: str, payload: bytes) -> bytes:
    t = topic.encode()
    return struct.pack(">H", len(t)) + t + struct.pack(">I", len(payload)) + payload


async def test_echo_and_event_stream_services(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, b = pair
    c = await RawClient.open(a.socket_path)
    c.send(ipc.dial(b.address, 7))
    echo = await c.next()
    assert isinstance(echo, ipc.DialOK)
    c.send(ipc.send(echo.conn_id, b"hello"))
    assert await c.next() == ipc.Recv(echo.conn_id, b"hello")

    subs: list[tuple[RawClient, int]] = []
    for topic in ("news", "*", "other"):
        s = await RawClient.open(a.socket_path)
        s.send(ipc.dial(b.address, 1002))
        ok = await s.next()
        assert isinstance(ok, ipc.DialOK)
        s.send(ipc.send(ok.conn_id, _event(topic, b"")))
        subs.append((s, ok.conn_id))
    publisher, pub_id = subs[0]
    # Subscriptions are handled in order; publish from the "news" subscriber.
    publisher.send(ipc.send(pub_id, _event("news", b"{}") + _event("news", b"[1]")))
    wildcard, wid = subs[1]
    got = b""
    while len(got) < 2 * len(_event("news", b"{}")) + 1:
        msg = await wildcard.next()
        assert isinstance(msg, ipc.Recv)
        assert msg.conn_id == wid
        got += msg.data
    assert got == _event("news", b"{}") + _event("news", b"[1]")
    # the publisher gets no copy and "other" nothing: prove it with an echo round trip
    for s, _ in (subs[0], subs[2]):
        s.send(ipc.info())
        assert isinstance(await s.next(), ipc.JsonReply)
    for s, _ in subs:
        await s.close()
    await c.close()


async def test_sack_prefixed_segment_stalls_the_stream(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, b = pair
    c = await RawClient.open(a.socket_path)
    c.send(ipc.dial(b.address, 7))
    ok = await c.next()
    assert isinstance(ok, ipc.DialOK)
    c.send(
        ipc.send(ok.conn_id, b"SACK\x02 swallowed") + ipc.send(ok.conn_id, b"never") + ipc.info()
    )
    msg = await c.next()
    assert isinstance(msg, ipc.JsonReply)  # no echo of either write arrived first
    c.send(ipc.send(ok.conn_id, b"still") + ipc.info())
    assert isinstance(await c.next(), ipc.JsonReply)
    await c.close()


async def test_accept_overflow_drops_silently_past_the_backlog(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, b = pair
    b.accept_backlog = 2
    b.hold_accepts = True
    server = await RawClient.open(b.socket_path)
    server.send(ipc.bind(5000))
    assert await server.next() == ipc.BindOK(5000)
    client = await RawClient.open(a.socket_path)
    for _ in range(3):
        client.send(ipc.dial(b.address, 5000))
        assert isinstance(await client.next(), ipc.DialOK)  # the dialer believes all three
    assert b.dropped_accepts == 1
    b.release_accepts()
    assert isinstance(await server.next(), ipc.Accept)
    assert isinstance(await server.next(), ipc.Accept)
    server.send(ipc.info())
    assert isinstance(await server.next(), ipc.JsonReply)  # and no third Accept
    await client.close()
    await server.close()


async def test_restart_forgets_everything(
    pair: tuple[PilotDaemonDouble, PilotDaemonDouble],
) -> None:
    a, b = pair
    server = await RawClient.open(b.socket_path)
    server.send(ipc.bind(5000))
    assert await server.next() == ipc.BindOK(5000)
    client = await RawClient.open(a.socket_path)
    client.send(ipc.dial(b.address, 5000))
    assert isinstance(await client.next(), ipc.DialOK)
    await b.restart()
    await server.expect_eof()  # the restarted daemon's clients are gone
    ended = await client.next()
    assert isinstance(ended, ipc.CloseOK)  # and the remote end of the stream too
    assert b.bound_ports == set()
    assert b.client_count == 0
    again = await RawClient.open(b.socket_path)
    again.send(ipc.bind(5000) + ipc.info())
    assert await again.next() == ipc.BindOK(5000)
    info = await again.next()
    assert isinstance(info, ipc.JsonReply)
    assert json.dumps(info.value)
    await again.close()
    await client.close()
    await server.close()
