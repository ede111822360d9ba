"""PilotClient: lazy transport, one pool per loop, sync bridging, one retry policy, registry."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pilot_transport
import pytest
from pilot_rpc import (
    Cancelled,
    ClientOptions,
    FailedPrecondition,
    PilotClient,
    RetryPolicy,
    RpcServer,
    Unavailable,
    aclose_default_clients,
    configure_default_client,
    default_client,
)
from pilot_rpc.testing import InMemoryTransport
from pilot_transport import open_transport
from pilot_transport.errors import IdentityNotFoundError
from pilot_transport.testing import TestPeers, create_test_peers


@pytest.fixture
def peers(tmp_path: Path) -> TestPeers:
    return create_test_peers(tmp_path / "peers", ["client", "server"])


@pytest.fixture
def hub() -> str:
    # Clients dial over tcp (the server runs on another thread's loop, as in another process).
    return "tcp://127.0.0.1:0"


class Served:
    """An RpcServer on a memory hub, served from its own loop thread (like another process)."""

    def __init__(self, peers: TestPeers, hub: str, server: RpcServer) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, args=(peers, hub, server), daemon=True)

    def _run(self, peers: TestPeers, hub: str, server: RpcServer) -> None:
        async def main() -> None:
            self.stop = asyncio.Event()
            peer = peers["server"]
            async with open_transport(hub, identity=peer.identity, trust=peer.trust) as t:
                listener = await t.listen(5000)
                async with server.serve_in_background(listener):
                    endpoint = (await t.info()).endpoint
                    assert endpoint is not None
                    peers.set_endpoint("server", endpoint)
                    self.ready.set()
                    await self.stop.wait()

        self.loop.run_until_complete(main())
        self.loop.close()

    def __enter__(self) -> Served:
        self.thread.start()
        assert self.ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture
def served(peers: TestPeers, hub: str, server: RpcServer) -> Iterator[Served]:
    with Served(peers, hub, server) as running:
        yield running


def own_client(peers: TestPeers, hub: str, **kwargs: Any) -> PilotClient:
    peer = peers["client"]
    return PilotClient(url=hub, identity=peer.identity_path, trust=peer.trust_path, **kwargs)


async def test_the_transport_opens_lazily_once_per_loop(
    peers: TestPeers, hub: str, served: Served
) -> None:
    client = own_client(peers, hub)
    try:
        assert client.transports_opened == 0
        results = await asyncio.gather(*(client.call("server", 5000, "echo", i) for i in range(8)))
        assert results == list(range(8))
        assert client.transports_opened == 1
        assert await client.rpc() is await client.rpc()
        transport = await client.transport()
        assert isinstance(transport, pilot_transport.Transport)
    finally:
        await client.aclose()
    assert transport.closed
    with pytest.raises(Cancelled):
        await client.rpc()


def test_sync_callers_share_the_background_loop(peers: TestPeers, hub: str, served: Served) -> None:
    client = own_client(peers, hub)
    try:
        assert client.run_sync(lambda: client.call("server", 5000, "echo", "a")) == "a"
        assert client.run_sync(lambda: client.call("server", 5000, "echo", "b")) == "b"
        assert client.transports_opened == 1

        async def numbers() -> AsyncIterator[int]:
            for i in range(3):
                yield await client.call("server", 5000, "echo", i)

        assert list(client.run_sync_iter(numbers)) == [0, 1, 2]
        assert client.transports_opened == 1
    finally:
        client.close()
    with pytest.raises(Cancelled):
        client.run_sync(lambda: client.call("server", 5000, "echo", 1))


def test_a_sync_call_with_a_timeout_cancels_the_coroutine(peers: TestPeers, hub: str) -> None:
    client = own_client(peers, hub)
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        with pytest.raises(TimeoutError):
            client.run_sync(forever, timeout=0.2)
        assert cancelled.wait(30)
    finally:
        client.close()


def test_closing_the_sync_iterator_early_closes_the_async_one(peers: TestPeers, hub: str) -> None:
    client = own_client(peers, hub)
    closed = threading.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            for i in itertools.count():
                yield i
        finally:
            closed.set()

    try:
        for item in client.run_sync_iter(endless):
            if item == 2:
                break
        assert closed.wait(30)
    finally:
        client.close()


async def test_a_sync_call_from_the_clients_own_loop_is_refused(peers: TestPeers, hub: str) -> None:
    client = own_client(peers, hub)

    async def nested() -> None:
        client.run_sync(lambda: asyncio.sleep(0))

    try:
        with pytest.raises(FailedPrecondition, match="deadlock"):
            await asyncio.to_thread(client.run_sync, nested)
    finally:
        await client.aclose()


async def test_a_supplied_transport_is_used_and_left_open(server: RpcServer) -> None:
    transport = InMemoryTransport(server, client_name="c", server_name="server")
    client = PilotClient(transport=transport)
    try:
        assert await client.call("server", 1, "echo", 5) == 5
        assert client.transports_opened == 0
        assert client.supplied_transport is transport
        with pytest.raises(FailedPrecondition):
            client.run_sync(lambda: client.call("server", 1, "echo", 1))
    finally:
        await client.aclose()
        await transport.aclose()
    with pytest.raises(FailedPrecondition):
        PilotClient(transport=transport, url="memory://x")


async def test_the_clients_retry_policy_is_the_one_applied(server: RpcServer) -> None:
    transport = InMemoryTransport(server, client_name="c", server_name="server")
    attempts = 0
    original = transport.connect

    async def counting_connect(peer: str, port: int, *, timeout: float | None = None) -> Any:
        nonlocal attempts
        attempts += 1
        return await original(peer, port, timeout=timeout)

    transport.connect = counting_connect  # type: ignore[method-assign]
    transport.refuse = pilot_transport.errors.PeerUnreachableError("down")
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.001, jitter=0)
    fast_redial = ClientOptions(reconnect_backoff=1e-6, reconnect_backoff_max=1e-6)
    client = PilotClient(transport=transport, options=fast_redial, retry=policy)
    assert client.retry is policy
    assert client.options.retry is policy
    try:
        with pytest.raises(Unavailable) as caught:
            await client.call("server", 1, "echo", 1)
        assert attempts == 4
        assert "next attempt" not in str(caught.value)
    finally:
        await client.aclose()
        await transport.aclose()


async def test_named_identity_that_does_not_exist_fails_on_first_call(
    tmp_path: Path, hub: str
) -> None:
    client = PilotClient(url=hub, identity=tmp_path / "me.kye", trust=tmp_path / "trust.json")
    (tmp_path / "trust.json").write_text('{"version": 1, "peers": []}')
    try:
        with pytest.raises(IdentityNotFoundError, match=r"me\.kye"):
            await client.rpc()
    finally:
        await client.aclose()
    assert not (tmp_path / "me.kye").exists()


async def test_default_client_is_shared_per_configuration(
    monkeypatch: pytest.MonkeyPatch, peers: TestPeers, hub: str, served: Served
) -> None:
    monkeypatch.setenv("PILOT_TRANSPORT_URL", hub)
    monkeypatch.setenv("PILOT_IDENTITY", str(peers["client"].identity_path))
    monkeypatch.setenv("PILOT_TRUST", str(peers["client"].trust_path))
    try:
        first = default_client()
        same = default_client(identity=peers["client"].identity_path)
        assert first is same
        other = default_client(url="tcp://127.0.0.1:1")
        assert other is not first
        assert await first.call("server", 5000, "echo", 1) == 1
        assert await same.call("server", 5000, "echo", 2) == 2
        assert first.transports_opened == 1
        configure_default_client(url="tcp://127.0.0.1:2")
        assert default_client() is not first
        configure_default_client()
        assert default_client() is first
    finally:
        configure_default_client()
        await aclose_default_clients()
    assert first.closed
    assert default_client() is not first
    await aclose_default_clients()


def test_a_loop_shutting_down_closes_its_transport(
    peers: TestPeers, hub: str, served: Served
) -> None:
    client = own_client(peers, hub)
    opened: list[Any] = []

    async def use() -> None:
        assert await client.call("server", 5000, "echo", 1) == 1
        opened.append(await client.transport())

    asyncio.run(use())
    assert opened[0].closed
    asyncio.run(use())
    assert client.transports_opened == 2
    client.close()


async def test_default_client_follows_the_environment_and_closing(
    monkeypatch: pytest.MonkeyPatch, peers: TestPeers, hub: str, tmp_path: Path
) -> None:
    """The no-argument lookup is remembered, but never across a change that matters."""
    monkeypatch.setenv("PILOT_TRANSPORT_URL", hub)
    monkeypatch.setenv("PILOT_IDENTITY", str(peers["client"].identity_path))
    monkeypatch.setenv("PILOT_TRUST", str(peers["client"].trust_path))
    try:
        first = default_client()
        assert default_client() is first
        monkeypatch.setenv("PILOT_TRUST", str(tmp_path / "elsewhere.json"))
        moved = default_client()
        assert moved is not first
        monkeypatch.setenv("PILOT_TRUST", str(peers["client"].trust_path))
        assert default_client() is first
        monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path))
        assert default_client() is first  # the explicit files still win
        monkeypatch.setenv("PILOT_TRANSPORT_URL", "tcp://127.0.0.1:3")
        assert default_client() is not first
        monkeypatch.setenv("PILOT_TRANSPORT_URL", hub)
        assert default_client() is first
        await first.aclose()
        fresh = default_client()
        assert fresh is not first
        assert not fresh.closed
    finally:
        await aclose_default_clients()
