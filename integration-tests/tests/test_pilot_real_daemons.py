"""The pilot:// carrier over two real Go Pilot daemons (the ``pilotprotocol`` wheel).

One module-scoped network: our registry/beacon stand-in and two daemons on
loopback that trust each other (``_pilot_daemons.PilotNet``). Tests that kill
or restart a daemon use a network of their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from pilot_transport import open_transport
from pilot_transport._carrier import DialTarget
from pilot_transport._carriers.pilot import PilotCarrier, PilotStream
from pilot_transport.errors import (
    DaemonUnavailableError,
    PeerNotTrustedError,
    RejectedByPeerError,
    StreamResetError,
)
from pilot_transport.testing import create_test_peers
from pilot_worker.testing import WorkerProcess, start_worker_process

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pilot_daemons import PilotNet, daemon_version, pilot_binaries

pytestmark = [
    pytest.mark.skipif(pilot_binaries() is None, reason="pilotprotocol wheel not installed"),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PilotNet]:
    with PilotNet(tmp_path_factory.mktemp("pilot-net"), count=2) as n:
        yield n


@pytest.fixture
async def carriers(net: PilotNet) -> AsyncIterator[tuple[PilotCarrier, PilotCarrier]]:
    a = PilotCarrier(net.daemons[0].socket)
    b = PilotCarrier(net.daemons[1].socket)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def read_all(stream: PilotStream) -> bytes:
    parts: list[bytes] = []
    while data := await stream.read():
        parts.append(data)
    return b"".join(parts)


def test_the_daemons_are_the_wheel_and_registered(net: PilotNet) -> None:
    assert daemon_version() == "1.18.0"
    a, b = net.daemons
    assert a.address != b.address
    assert a.info()["address"] == a.address


async def test_raw_echo_and_a_framed_round_trip(
    net: PilotNet, carriers: tuple[PilotCarrier, PilotCarrier]
) -> None:
    a, b = carriers
    address_b = net.daemons[1].address

    echo = await a.open_raw_stream(address_b, 7)
    payload = os.urandom(100_000)
    await echo.write(payload)
    got = bytearray()
    async with asyncio.timeout(30):
        while len(got) < len(payload):
            got += await echo.read()
    assert bytes(got) == payload
    await echo.aclose()

    listener = await b.bind(1000)

    async def serve() -> None:
        stream = await listener.accept()
        data = await read_all(stream)
        await stream.write(hashlib.sha256(data).digest())
        await stream.aclose()

    server = asyncio.create_task(serve())
    stream = await a.dial(DialTarget(address=address_b), 1000)
    body = os.urandom(1 << 20)
    await stream.write(body)
    await stream.write_eof()
    async with asyncio.timeout(60):
        assert await read_all(stream) == hashlib.sha256(body).digest()
    await stream.aclose()
    await server
    await listener.aclose()


async def test_tls_by_name_address_and_node_id_and_untrusted_refused(
    net: PilotNet, tmp_path: Path
) -> None:
    da, db = net.daemons
    peers = create_test_peers(tmp_path / "peers", ["client", "server"])
    peers.set_address("server", db.address)
    strangers = create_test_peers(tmp_path / "strangers", ["stranger", "server"])
    strangers.set_address("server", db.address)
    async with (
        open_transport(
            f"pilot://{db.socket}", identity=peers["server"].identity, trust=peers["server"].trust
        ) as server,
        open_transport(
            f"pilot://{da.socket}", identity=peers["client"].identity, trust=peers["client"].trust
        ) as client,
    ):
        listener = await server.listen(5001)
        server_id = peers["server"].identity.node_id
        for target in ("server", db.address, server_id):
            stream = await client.connect(target, 5001, timeout=30.0)
            accepted = await listener.accept()
            assert stream.peer.name == "server"
            assert accepted.peer.node_id == peers["client"].identity.node_id
            await stream.write(b"ping " + str(target).encode())
            assert await accepted.read() == b"ping " + str(target).encode()
            await stream.aclose()
            await accepted.aclose()

        # The daemons trust each other; our TLS layer still refuses an unknown key.
        async with open_transport(
            f"pilot://{da.socket}",
            identity=strangers["stranger"].identity,
            trust=strangers["stranger"].trust,
        ) as stranger:
            with pytest.raises((PeerNotTrustedError, RejectedByPeerError)):
                await stranger.connect(db.address, 5001, timeout=30.0)


async def _write_then_close_rounds(
    a: PilotCarrier, b: PilotCarrier, address_b: str, port: int, size: int, rounds: int
) -> list[str]:
    """Each round: dial, write ``size`` bytes, aclose() at once; the reader must get them all."""
    listener = await b.bind(port)
    failures: list[str] = []
    try:
        for n in range(rounds):
            body = os.urandom(size)

            async def receive() -> bytes:
                reader = await listener.accept()
                try:
                    async with asyncio.timeout(30):
                        return await read_all(reader)
                finally:
                    await reader.aclose()

            received = asyncio.create_task(receive())
            stream = await a.dial(DialTarget(address=address_b), port)
            await stream.write(body)
            await stream.aclose()
            try:
                got = await received
            except (StreamResetError, TimeoutError) as exc:
                failures.append(f"round {n}: {type(exc).__name__}: {exc}")
            else:
                if got != body:
                    failures.append(f"round {n}: got {len(got)} of {size} bytes")
    finally:
        await listener.aclose()
    return failures


@pytest.mark.parametrize(("size", "port"), [(1 << 20, 1010), (5 << 20, 1011)])
async def test_write_then_aclose_loses_nothing(
    net: PilotNet, carriers: tuple[PilotCarrier, PilotCarrier], size: int, port: int
) -> None:
    a, b = carriers
    failures = await _write_then_close_rounds(a, b, net.daemons[1].address, port, size, 20)
    assert failures == []


HANDLERS = str(Path(__file__).with_name("_langgraph_handlers.py"))


class PilotWorker:
    """A pilot-worker process serving the test handlers over the second daemon."""

    def __init__(
        self, net: PilotNet, root: Path, handlers: str = HANDLERS, extra: tuple[str, ...] = ()
    ) -> None:
        self.net = net
        self.root = root
        self.handlers = handlers
        self.extra = extra
        self.peers = create_test_peers(root / "keys", ["client", "worker"])
        self.proc: WorkerProcess | None = None
        self.ready = root / "worker.ready"
        self.log = root / "worker.log"

    def start(self, timeout: float = 120.0) -> None:
        self.peers.set_address("worker", self.net.daemons[1].address)
        worker = self.peers["worker"]
        assert worker.identity.node_id
        args = [
            "--transport",
            f"pilot://{self.net.daemons[1].socket}",
            "--identity",
            str(self.root / "keys" / "worker" / "identity.key"),
            "--trust",
            str(self.root / "keys" / "worker" / "trust.json"),
            "--port",
            "5000",
            "--handlers",
            self.handlers,
            *self.extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
        env.update({"LG_WORKER": "pilot-worker", "LG_TEST_DIR": str(self.root)})
        self.proc = start_worker_process(
            args,
            ready_file=self.ready,
            module="pilot_langgraph._worker_cli",
            env=env,
            log_file=self.log,
            name="pilot-worker",
            capture=False,
        )
        self.proc.wait_ready_blocking(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop_blocking(15)


@pytest.fixture(scope="module")
def worker(net: PilotNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PilotWorker]:
    w = PilotWorker(net, tmp_path_factory.mktemp("pilot-worker"))
    try:
        w.start()
        yield w
    finally:
        w.stop()


async def test_remote_runnable_over_real_daemons(net: PilotNet, worker: PilotWorker) -> None:
    from pilot_langgraph import PilotRemoteRunnable

    client = worker.peers["client"]
    async with open_transport(
        f"pilot://{net.daemons[0].socket}", identity=client.identity, trust=client.trust
    ) as transport:
        square = PilotRemoteRunnable(node="square", peer="worker", transport=transport)
        assert await square.ainvoke({"n": 7}) == {"squares": [49], "workers": ["pilot-worker"]}
        whoami = PilotRemoteRunnable(node="whoami", peer="worker", transport=transport)
        assert await whoami.ainvoke(None) == "pilot-worker"


async def test_64_concurrent_calls_from_a_cold_pool_twice(
    net: PilotNet, worker: PilotWorker
) -> None:
    # The daemon admits a burst of about 64 new connections, then about 8 a second:
    # two cold bursts in a row must stay inside that (dial pacing, stream reuse).
    from pilot_langgraph import PilotRemoteRunnable

    client = worker.peers["client"]
    for _ in range(2):
        async with open_transport(
            f"pilot://{net.daemons[0].socket}", identity=client.identity, trust=client.trust
        ) as transport:
            square = PilotRemoteRunnable(node="square", peer="worker", transport=transport)
            async with asyncio.timeout(120):
                results = await asyncio.gather(*(square.ainvoke({"n": n}) for n in range(64)))
            assert [r["squares"] for r in results] == [[n * n] for n in range(64)]


async def test_dial_bursts_stay_inside_the_daemons_admission(
    net: PilotNet, carriers: tuple[PilotCarrier, PilotCarrier]
) -> None:
    # Two bursts of 64 concurrent dials, back to back: the daemon admits about 64
    # new connections and then about 8 a second; the carrier paces its dials.
    a, b = carriers
    listener = await b.bind(1020)
    accepted: list[PilotStream] = []

    async def accept_all() -> None:
        async for stream in listener:
            accepted.append(stream)

    acceptor = asyncio.create_task(accept_all())
    try:
        for _ in range(2):
            async with asyncio.timeout(120):
                streams = await asyncio.gather(
                    *(a.dial(DialTarget(address=net.daemons[1].address), 1020) for _ in range(64))
                )
            for stream in streams:
                await stream.write(b"x")
            await asyncio.gather(*(s.aclose() for s in streams))
    finally:
        acceptor.cancel()
        await asyncio.gather(acceptor, return_exceptions=True)
        await asyncio.gather(*(s.aclose() for s in accepted))
        await listener.aclose()
    assert len(accepted) == 128


async def _call_until_it_works(call: Callable[[], Awaitable[object]], budget: float) -> float:
    """Seconds until ``call`` first succeeds (each try bounded by 1 s); fails after ``budget``."""
    start = time.monotonic()
    errors: list[str] = []
    while time.monotonic() - start < budget:
        try:
            async with asyncio.timeout(1.0):
                await call()
        except Exception as exc:  # any failure while the network heals: try again
            errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)
        else:
            return time.monotonic() - start
    raise AssertionError(f"no call succeeded within {budget} s: {errors[-3:]}")


async def _kill_restart_and_time_recovery(
    tmp_path: Path, index: int, *, fresh: bool, budget: float = 30.0
) -> float:
    """Kill -9 daemon ``index`` under a client with a warm pool, restart it, and
    return the seconds from its return until a call works again (``fresh``: on a
    new transport; else on the warm one)."""
    from pilot_langgraph import PilotRemoteRunnable

    with PilotNet(tmp_path / "net", count=2) as own:
        worker = PilotWorker(own, tmp_path / "worker")
        worker.start()
        try:
            client = worker.peers["client"]
            url = f"pilot://{own.daemons[0].socket}"
            async with open_transport(url, identity=client.identity, trust=client.trust) as warm:
                square = PilotRemoteRunnable(
                    node="square", peer="worker", transport=warm, timeout_secs=2.0
                )
                assert await square.ainvoke({"n": 3}) == {
                    "squares": [9],
                    "workers": ["pilot-worker"],
                }
                raw = PilotCarrier(own.daemons[index].socket)
                stream = await raw.open_raw_stream(own.daemons[1 - index].address, 7)
                own.kill(index, signal.SIGKILL)
                # A dead daemon is noticed at once (its socket's EOF), not at a keepalive.
                with pytest.raises((StreamResetError, DaemonUnavailableError)):
                    async with asyncio.timeout(5):
                        await stream.read()
                await raw.aclose()
                await asyncio.to_thread(own.start_daemon, index)

                async def call_fresh() -> object:
                    async with open_transport(
                        url, identity=client.identity, trust=client.trust
                    ) as transport:
                        return await PilotRemoteRunnable(
                            node="square", peer="worker", transport=transport, timeout_secs=2.0
                        ).ainvoke({"n": 4})

                if fresh:
                    return await _call_until_it_works(call_fresh, budget)
                return await _call_until_it_works(lambda: square.ainvoke({"n": 4}), budget)
        finally:
            worker.stop()


async def test_calls_work_again_soon_after_the_client_daemon_is_killed(tmp_path: Path) -> None:
    took = await _kill_restart_and_time_recovery(tmp_path, 0, fresh=False)
    print(f"calls worked again {took:.2f} s after the client's daemon came back")
    assert took <= 3.0


async def test_a_new_transport_works_soon_after_the_worker_daemon_is_killed(
    tmp_path: Path,
) -> None:
    took = await _kill_restart_and_time_recovery(tmp_path, 1, fresh=True)
    print(f"new transports worked again {took:.2f} s after the worker's daemon came back")
    assert took <= 3.0


async def test_a_warm_pool_works_soon_after_the_worker_daemon_is_killed(tmp_path: Path) -> None:
    took = await _kill_restart_and_time_recovery(tmp_path, 1, fresh=False, budget=8.0)
    assert took <= 3.0


DRAIN_HANDLERS = str(Path(__file__).with_name("_pilot_drain_handlers.py"))


async def test_drain_delivers_every_in_flight_reply(tmp_path: Path) -> None:
    # SIGTERM while 16 slow calls with 2 MiB replies are in flight: the worker
    # drains, and every reply must arrive whole over the two daemons. Its own
    # network: the module's worker holds port 5000 on the shared one.
    from pilot_langgraph import PilotRemoteRunnable

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _pilot_drain_handlers import reply_for

    with PilotNet(tmp_path / "net", count=2) as own:
        worker = PilotWorker(own, tmp_path, DRAIN_HANDLERS, ("--drain-timeout", "30"))
        worker.start()
        try:
            client = worker.peers["client"]
            async with open_transport(
                f"pilot://{own.daemons[0].socket}", identity=client.identity, trust=client.trust
            ) as transport:
                big = PilotRemoteRunnable(
                    node="big_slow",
                    peer="worker",
                    transport=transport,
                    timeout_secs=60,
                    max_retries=0,
                )
                tags = [f"r{i}" for i in range(16)]
                calls = [asyncio.create_task(big.ainvoke(tag)) for tag in tags]
                async with asyncio.timeout(60):
                    while not all((tmp_path / f"{t}.started").exists() for t in tags):
                        await asyncio.sleep(0.02)
                assert worker.proc is not None
                worker.proc.send_signal(signal.SIGTERM)
                results = await asyncio.gather(*calls, return_exceptions=True)
            lost = [t for t, r in zip(tags, results, strict=True) if r != reply_for(t)]
            assert lost == [], [repr(r)[:200] for r in results if isinstance(r, BaseException)]
        finally:
            worker.stop()
