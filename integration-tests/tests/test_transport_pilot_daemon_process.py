"""The pilot:// carrier against a daemon double running in another process.

The double process is killed with SIGKILL mid-stream (as a crashing daemon
would be) and started again: streams must fail with a clear StreamResetError,
listeners must bind their port again by themselves, and new streams must work.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import pytest
from pilot_transport._carrier import DialTarget
from pilot_transport._carriers.pilot import PilotCarrier, PilotCarrierOptions, PilotStream
from pilot_transport.errors import DaemonUnavailableError, StreamResetError


class DaemonProcess:
    """Two linked daemon doubles served by one child process."""

    def __init__(self, sock_a: str, sock_b: str) -> None:
        self.sockets = (sock_a, sock_b)
        self.proc: subprocess.Popen[str] | None = None
        self.addresses: list[str] = []

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pilot_transport.testing._run_daemon_double",
                "--socket",
                self.sockets[0],
                "--socket",
                self.sockets[1],
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        words = line.split()
        assert words[:1] == ["ready"], f"daemon double did not start: {line!r}"
        self.addresses = words[1:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no cleanup, sockets left behind
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pti-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def drain(stream: PilotStream) -> None:
    while await stream.read():
        pass


async def echo(stream: PilotStream) -> None:
    try:
        while data := await stream.read():
            await stream.write(data)
    except StreamResetError:
        pass
    finally:
        await stream.aclose()


async def test_kill_9_mid_stream_then_restart(sock_dir: str) -> None:
    daemon = DaemonProcess(os.path.join(sock_dir, "a.sock"), os.path.join(sock_dir, "b.sock"))
    await daemon.start()
    opts = PilotCarrierOptions(reconnect_initial_delay=0.02, reconnect_max_delay=0.2)
    try:
        async with (
            PilotCarrier(daemon.sockets[0], options=opts) as ca,
            PilotCarrier(daemon.sockets[1], options=opts) as cb,
        ):
            target = DialTarget(address=daemon.addresses[1])
            listener = await cb.bind(5000)
            servers: set[asyncio.Task[None]] = set()

            async def serve() -> None:
                async for stream in listener:
                    servers.add(asyncio.create_task(echo(stream)))

            acceptor = asyncio.create_task(serve())
            stream = await ca.dial(target, 5000)
            block = os.urandom(16 * 1024)
            sent = 0

            async def pump() -> None:
                nonlocal sent
                while True:
                    await stream.write(block)
                    sent += len(block)

            pumping = asyncio.create_task(pump())
            received = 0
            while received < 256 * 1024:
                received += len(await stream.read())

            daemon.kill()
            with pytest.raises(StreamResetError, match="lost"):
                await asyncio.wait_for(drain(stream), 10)
            with pytest.raises(StreamResetError):
                await asyncio.wait_for(pumping, 10)
            await stream.aclose()
            with pytest.raises(DaemonUnavailableError):
                await ca.daemon_info()

            await daemon.start()  # the "daemon" comes back on the same sockets
            await eventually(lambda: listener.rebinds == 1)
            again = await ca.dial(target, 5000)
            await again.write(b"after the crash")
            got = b""
            while len(got) < 15:
                got += await again.read()
            assert got == b"after the crash"
            assert (await ca.daemon_info())["address"] == daemon.addresses[0]
            await again.aclose()
            acceptor.cancel()
            for task in [acceptor, *servers]:
                task.cancel()
            await asyncio.gather(acceptor, *servers, return_exceptions=True)
    finally:
        daemon.kill()
