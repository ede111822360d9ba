"""pilot-rpc between real processes over tcp:// with mutual TLS: cancellation, deadlines,
flow control, drain, malformed input, a killed server, a 50 MB message."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from pilot_rpc import (
    ClientOptions,
    DeadlineExceeded,
    RetryPolicy,
    RpcClient,
    Unavailable,
)
from pilot_rpc import _protocol as P
from pilot_rpc._types import MethodKind
from pilot_transport import Transport, open_transport
from pilot_transport.errors import StreamResetError
from pilot_transport.testing import TestPeers, create_test_peers

SERVER_SCRIPT = Path(__file__).with_name("_rpc_server.py")
PORT = 5000
TIMEOUT = 30.0


class ServerProcess:
    def __init__(self, process: asyncio.subprocess.Process, endpoint: str, log: Path) -> None:
        self.process = process
        self.endpoint = endpoint
        self.log = log

    @classmethod
    async def start(
        cls, peers: TestPeers, log: Path, *, url: str = "tcp://127.0.0.1:0", drain: float = 10.0
    ) -> ServerProcess:
        server = peers["server"]
        with open(log, "ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(SERVER_SCRIPT),
                "--identity",
                str(server.identity_path),
                "--trust",
                str(server.trust_path),
                "--url",
                url,
                "--drain-timeout",
                str(drain),
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), TIMEOUT)
        assert line.startswith(b"READY "), f"server failed to start:\n{log.read_text()}"
        endpoint = line.decode().split()[1]
        peers.set_endpoint("server", endpoint)
        return cls(process, endpoint, log)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@pytest.fixture
def peers(tmp_path: Path) -> TestPeers:
    return create_test_peers(tmp_path, ["client", "server"])


@pytest.fixture
async def servers() -> AsyncIterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        await server.stop()


@pytest.fixture
async def client_transport(peers: TestPeers) -> AsyncIterator[Transport]:
    client = peers["client"]
    async with open_transport(
        "tcp://127.0.0.1:0", identity=client.identity, trust=client.trust
    ) as transport:
        yield transport


async def start(peers: TestPeers, tmp_path: Path, servers: list[ServerProcess], **kw: Any) -> Any:
    server = await ServerProcess.start(peers, tmp_path / "server.log", **kw)
    servers.append(server)
    return server


async def wait_stats(
    client: RpcClient, predicate: Callable[[dict[str, int]], bool]
) -> dict[str, int]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            stats = await client.call("server", PORT, "stats", timeout=10)
            if predicate(stats):
                return stats
            await asyncio.sleep(0.05)


async def test_cancelled_caller_cancels_the_remote_handler(
    peers: TestPeers, tmp_path: Path, servers: list[ServerProcess], client_transport: Transport
) -> None:
    await start(peers, tmp_path, servers)
    async with RpcClient(client_transport) as client:
        task = asyncio.create_task(client.call("server", PORT, "hang"))
        await wait_stats(client, lambda s: s["hang_started"] == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = await wait_stats(client, lambda s: s["hang_cancelled"] == 1)
        assert stats["hang_deadline"] == 0


async def test_deadline_is_enforced_by_client_and_server(
    peers: TestPeers, tmp_path: Path, servers: list[ServerProcess], client_transport: Transport
) -> None:
    await start(peers, tmp_path, servers)
    async with RpcClient(client_transport) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DeadlineExceeded):
            await client.call("server", PORT, "hang", timeout=0.5)
        assert 0.45 <= loop.time() - started < 5
        await wait_stats(client, lambda s: s["hang_deadline"] + s["hang_cancelled"] == 1)

    # A caller that never cancels (raw protocol): the server's own timer answers.
    stream = await client_transport.connect("server", PORT, timeout=10)
    try:
        core = P.Connection(P.Role.CLIENT)
        await stream.write(core.data_to_send())
        events: list[P.Event] = []
        async with asyncio.timeout(TIMEOUT):
            while not core.ready:
                events += core.receive_data(await stream.read(65536))
            core.start_call("hang", MethodKind.UNARY, None, timeout=0.3)
            await stream.write(core.data_to_send())
            while not any(isinstance(e, P.ErrorReceived) for e in events):
                events += core.receive_data(await stream.read(65536))
        (error,) = [e for e in events if isinstance(e, P.ErrorReceived)]
        assert error.code == 4  # DEADLINE_EXCEEDED
    finally:
        await stream.aclose()


async def test_stalled_reader_stalls_the_remote_writer_and_memory_stays_flat(
    peers: TestPeers, tmp_path: Path, servers: list[ServerProcess], client_transport: Transport
) -> None:
    server = await start(peers, tmp_path, servers)
    process = psutil.Process(server.process.pid)
    async with RpcClient(client_transport) as client:
        async with client.stream("server", PORT, "firehose", 4096) as items:
            assert len(await anext(items)) == 4096
            # The producer stops once the 256 KiB window is spent.
            previous = -1
            async with asyncio.timeout(TIMEOUT):
                while True:
                    stats = await client.call("server", PORT, "stats", timeout=10)
                    if stats["firehose_produced"] == previous:
                        break
                    previous = stats["firehose_produced"]
                    await asyncio.sleep(0.2)
            assert previous <= 256 * 1024 // 4096 + 4
            rss_before = process.memory_info().rss
            await asyncio.sleep(1.0)  # a stalled reader, observed over time
            rss_after = process.memory_info().rss
            stats = await client.call("server", PORT, "stats", timeout=10)
            assert stats["firehose_produced"] == previous
            assert rss_after - rss_before < 2 * 1024 * 1024
            # Reading resumes the producer.
            for _ in range(200):
                await anext(items)
        # Leaving the block cancels the call: the generator is closed.
        await wait_stats(client, lambda s: s["firehose_closed"] == 1)


async def test_sigterm_drains_inflight_calls_and_refuses_new_ones(
    peers: TestPeers, tmp_path: Path, servers: list[ServerProcess], client_transport: Transport
) -> None:
    server = await start(peers, tmp_path, servers)
    options = ClientOptions(retry=RetryPolicy.disabled())
    async with RpcClient(client_transport, options=options) as client:
        slow = asyncio.create_task(client.call("server", PORT, "sleep", 1.0, timeout=20))
        await wait_stats(client, lambda s: s["sleep_started"] == 1)
        server.process.send_signal(signal.SIGTERM)
        assert await slow == "slept"
        assert await asyncio.wait_for(server.process.wait(), TIMEOUT) == 0
        with pytest.raises(Unavailable):
            await client.call("server", PORT, "echo", 1, timeout=10)
    assert "drained; 0 calls cut" in server.log.read_text()


async def test_malformed_input_over_a_real_socket(
    peers: TestPeers, tmp_path: Path, servers: list[ServerProcess], client_transport: Transport
) -> None:
    server = await start(peers, tmp_path, servers)
    async with RpcClient(client_transport) as client:
        assert await client.call("server", PORT, "echo", "before", timeout=10) == "before"
        for garbage in (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not our protocol at all
            P.Connection(P.Role.CLIENT).data_to_send()  # a valid HELLO, then
            + struct.pack(">IBBI", 5, 0x02, 0x02, 1)  # a CALL whose header is garbage
            + b"\x00\x09\xff\xff\xff",
        ):
            rogue = await client_transport.connect("server", PORT, timeout=10)
            try:
                await rogue.write(garbage)
                received = b""
                async with asyncio.timeout(TIMEOUT):
                    # The server ends the connection after its GOAWAY: EOF or a reset.
                    with contextlib.suppress(StreamResetError):
                        while data := await rogue.read(65536):
                            received += data
            finally:
                await rogue.aclose()
            events = P.Connection(P.Role.CLIENT).receive_data(received)
            assert isinstance(events[-1], P.GoAwayReceived)
            assert events[-1].message.startswith("protocol error")
        # Raw bytes on the TCP port itself (no TLS) are the transport's to refuse.
        host, port = server.endpoint.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(os.urandom(4096))
        assert server.process.returncode is None
        assert await client.call("server", PORT, "echo", "after", timeout=10) == "after"
        assert client.connections() == 1


async def test_killed_server_fails_fast_and_the_client_reconnects(
    peers: TestPeers, tmp_path: Path, servers: list[ServerProcess], client_transport: Transport
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    url = f"tcp://127.0.0.1:{free_port}"
    server = await start(peers, tmp_path, servers, url=url)
    options = ClientOptions(reconnect_backoff=0.05, reconnect_backoff_max=0.5)
    async with RpcClient(client_transport, options=options) as client:
        assert await client.call("server", PORT, "echo", 1, timeout=10) == 1
        pending = asyncio.create_task(client.call("server", PORT, "hang", timeout=60))
        await wait_stats(client, lambda s: s["hang_started"] == 1)
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        server.process.send_signal(signal.SIGKILL)
        await server.process.wait()
        with pytest.raises(Unavailable):
            await pending
        assert loop.time() - killed_at < 5
        started = loop.time()
        with pytest.raises(Unavailable):
            await client.call("server", PORT, "echo", 2, timeout=10)
        assert loop.time() - started < 5  # fails fast, no hanging on a dead peer
        await start(peers, tmp_path, servers, url=url)
        async with asyncio.timeout(TIMEOUT):
            while True:
                try:
                    assert await client.call("server", PORT, "echo", 3, timeout=10) == 3
                    break
                except Unavailable:
                    await asyncio.sleep(0.1)


async def test_fifty_megabyte_message(
    peers: TestPeers, tmp_path: Path, servers: list[ServerProcess], client_transport: Transport
) -> None:
    await start(peers, tmp_path, servers)
    payload = os.urandom(50 * 1024 * 1024)
    async with RpcClient(client_transport) as client:
        assert await client.call("server", PORT, "echo", payload, timeout=120) == payload
