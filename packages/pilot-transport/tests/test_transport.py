from __future__ import annotations

import asyncio

import pytest
from pilot_transport import (
    Identity,
    SecureStream,
    Transport,
    TransportOptions,
    TrustedPeer,
    TrustStore,
    open_transport,
)
from pilot_transport._carrier import DialTarget
from pilot_transport.errors import (
    ConnectTimeoutError,
    ListenerClosedError,
    PeerIdentityMismatchError,
    PeerRevokedError,
    PeerUnreachableError,
    PortInUseError,
    PortNotListeningError,
    RejectedByPeerError,
    StreamClosedError,
    StreamResetError,
    TransportURLError,
    TransportUsageError,
    UnknownPeerError,
)
from pilot_transport.testing import TestPeers


async def _endpoint(transport: Transport) -> str:
    endpoint = (await transport.info()).endpoint
    assert endpoint is not None
    return endpoint


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x",
        "127.0.0.1:7000",
        "memory://",
        "pilot://host/x.sock",
        "tcp://127.0.0.1:notaport",
        "tcp://127.0.0.1:1/path",
    ],
)
async def test_bad_urls(url: str) -> None:
    with pytest.raises(TransportURLError):
        await open_transport(url, identity=Identity.generate(), trust=TrustStore.in_memory())


async def test_env_var_picks_the_carrier(
    monkeypatch: pytest.MonkeyPatch, peers: TestPeers, hub: str
) -> None:
    monkeypatch.delenv("PILOT_TRANSPORT", raising=False)
    monkeypatch.setenv("PILOT_TRANSPORT_URL", hub)
    transport = await open_transport(identity=peers["client"].identity, trust=peers["client"].trust)
    try:
        assert transport.carrier == "memory"
        assert transport.url == hub
    finally:
        await transport.aclose()
        await transport.aclose()  # idempotent


async def test_default_is_tcp_loopback(monkeypatch: pytest.MonkeyPatch, peers: TestPeers) -> None:
    monkeypatch.delenv("PILOT_TRANSPORT", raising=False)
    monkeypatch.delenv("PILOT_TRANSPORT_URL", raising=False)
    async with open_transport(
        identity=peers["client"].identity_path, trust=peers["client"].trust_path
    ) as transport:
        assert transport.carrier == "tcp"
        info = await transport.info()
        assert info.endpoint is None  # nothing listens until the first listen()
        await transport.listen(1)
        info = await transport.info()
        assert info.endpoint is not None
        assert info.endpoint.startswith("127.0.0.1:")
        assert info.listening_ports == (1,)
        assert info.node_id == peers["client"].identity.node_id
        assert info.public_key == peers["client"].identity.public_key_text


async def test_connect_by_name_node_id_and_entry(
    tcp_pair: tuple[Transport, Transport], peers: TestPeers
) -> None:
    client, server = tcp_pair
    listener = await server.listen(5000)
    peers.set_endpoint("server", await _endpoint(server))
    server_entry = peers["client"].trust.get("server")
    assert server_entry is not None
    for peer in ("server", peers["server"].node_id, server_entry):
        stream, accepted = await asyncio.gather(
            client.connect(peer, 5000),
            listener.accept(),
        )
        async with stream, accepted:
            assert stream.peer.name == "server"
            assert accepted.peer.node_id == peers["client"].node_id
            await stream.write(b"hi")
            assert await accepted.read() == b"hi"


async def test_listener_and_connect_errors(peers: TestPeers, hub: str) -> None:
    async with (
        open_transport(
            hub, identity=peers["server"].identity, trust=peers["server"].trust
        ) as server,
        open_transport(
            hub, identity=peers["client"].identity, trust=peers["client"].trust
        ) as client,
    ):
        listener = await server.listen(1)
        with pytest.raises(PortInUseError):
            await server.listen(1)
        for port in (0, 65536, -1):
            with pytest.raises(TransportUsageError):
                await server.listen(port)
        with pytest.raises(PortNotListeningError):
            await client.connect("server", 2)
        with pytest.raises(UnknownPeerError, match="trust add"):
            await client.connect("nobody", 1)
        with pytest.raises(PeerUnreachableError):
            await client.connect("other", 1)  # trusted, but not on this hub
        await listener.aclose()
        await listener.aclose()
        with pytest.raises(ListenerClosedError):
            await listener.accept()
        with pytest.raises(PortNotListeningError):
            await client.connect("server", 1)
        await server.listen(1)  # the port is free again


async def test_tcp_port_not_listening_and_unreachable(
    tcp_pair: tuple[Transport, Transport], peers: TestPeers
) -> None:
    client, server = tcp_pair
    await server.listen(1)
    peers.set_endpoint("server", await _endpoint(server))
    with pytest.raises(PortNotListeningError, match="no listener on port 2"):
        await client.connect("server", 2)
    with pytest.raises(UnknownPeerError, match="no tcp endpoint"):
        await client.connect("other", 2)
    # A port nobody listens on (we bound it, then released it).
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with pytest.raises(PeerUnreachableError):
        await client.connect(DialTarget(endpoint=f"127.0.0.1:{free_port}"), 1)


async def test_connect_times_out_against_a_silent_server(peers: TestPeers) -> None:
    silent_connections: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_connections.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with open_transport(
            "tcp://127.0.0.1:0", identity=peers["client"].identity, trust=peers["client"].trust
        ) as client:
            with pytest.raises(ConnectTimeoutError, match=r"longer than 0\.2s"):
                await client.connect(DialTarget(endpoint=f"127.0.0.1:{port}"), 1, timeout=0.2)
    finally:
        for writer in silent_connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_slow_inbound_handshakes_time_out_without_blocking_others(
    peers: TestPeers, caplog: pytest.LogCaptureFixture
) -> None:
    options = TransportOptions(handshake_timeout=0.3)
    async with (
        open_transport(
            "tcp://127.0.0.1:0",
            identity=peers["server"].identity,
            trust=peers["server"].trust,
            options=options,
        ) as server,
        open_transport(
            "tcp://127.0.0.1:0", identity=peers["client"].identity, trust=peers["client"].trust
        ) as client,
    ):
        listener = await server.listen(1)
        endpoint = (await server.info()).endpoint
        assert endpoint is not None
        peers.set_endpoint("server", endpoint)
        host, port = endpoint.rsplit(":", 1)
        # A client that names the port, then stalls.
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"PLTP\x01\x00\x01")
        stream, accepted = await asyncio.gather(client.connect("server", 1), listener.accept())
        assert accepted.peer.name == "client"
        await stream.aclose()
        await accepted.aclose()
        async with asyncio.timeout(5):
            while "handshake timed out" not in caplog.text:
                await asyncio.sleep(0.05)
        writer.close()


async def test_untrusted_client_is_logged_and_never_accepted(
    peers: TestPeers, hub: str, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = Identity.generate()
    async with (
        open_transport(
            hub, identity=peers["server"].identity, trust=peers["server"].trust
        ) as server,
        open_transport(
            hub,
            identity=stranger,
            trust=TrustStore.in_memory(
                [TrustedPeer("server", peers["server"].identity.public_key)]
            ),
        ) as intruder,
        open_transport(
            hub, identity=peers["client"].identity, trust=peers["client"].trust
        ) as client,
    ):
        listener = await server.listen(1)
        with pytest.raises(RejectedByPeerError) as refused:
            await intruder.connect("server", 1)
        assert refused.value.fingerprint == stranger.fingerprint
        assert stranger.fingerprint in caplog.text
        assert "refused inbound connection" in caplog.text
        # The listener hands out the next good stream, not the refused one.
        stream, accepted = await asyncio.gather(client.connect("server", 1), listener.accept())
        assert accepted.peer.name == "client"
        await stream.aclose()
        await accepted.aclose()


async def test_peer_known_by_name_must_prove_that_key(peers: TestPeers, hub: str) -> None:
    # The client's "server" entry points at the other peer's address book slot.
    impostor = peers["other"]
    client_trust = TrustStore.in_memory(
        [
            TrustedPeer("server", peers["server"].identity.public_key),
            TrustedPeer("other", impostor.identity.public_key),
        ]
    )
    async with (
        open_transport(hub, identity=impostor.identity, trust=impostor.trust) as fake,
        open_transport(hub, identity=peers["client"].identity, trust=client_trust) as client,
    ):
        await fake.listen(1)
        target = DialTarget(name="server", node_id=impostor.node_id)
        # Dialling by DialTarget carries no expected key: any trusted key is fine.
        stream = await client.connect(target, 1)
        assert stream.peer.name == "other"
        await stream.aclose()
        # Dialling "server" by name, but the carrier reaches the impostor.
        entry = TrustedPeer("server", peers["server"].identity.public_key)
        client._carrier.dial = _redirect(client._carrier.dial, impostor.node_id)  # type: ignore[method-assign]
        with pytest.raises(PeerIdentityMismatchError, match="not the peer we dialled"):
            await client.connect(entry, 1)


def _redirect(dial: object, node_id: str) -> object:
    async def redirected(target: DialTarget, port: int) -> object:
        return await dial(DialTarget(node_id=node_id), port)  # type: ignore[operator]

    return redirected


async def test_closing_the_transport_resets_streams_and_listeners(
    tcp_pair: tuple[Transport, Transport], peers: TestPeers
) -> None:
    client, server = tcp_pair
    listener = await server.listen(1)
    peers.set_endpoint("server", await _endpoint(server))
    stream, accepted = await asyncio.gather(client.connect("server", 1), listener.accept())
    pending_accept = asyncio.create_task(listener.accept())
    reader = asyncio.create_task(stream.read())
    await server.aclose()
    with pytest.raises(ListenerClosedError):
        await asyncio.wait_for(pending_accept, 5)
    with pytest.raises(StreamResetError):
        await asyncio.wait_for(reader, 5)
    with pytest.raises(StreamClosedError):
        await server.listen(2)
    del accepted


async def test_listener_iteration_ends_when_closed(peers: TestPeers, hub: str) -> None:
    async with (
        open_transport(
            hub, identity=peers["server"].identity, trust=peers["server"].trust
        ) as server,
        open_transport(
            hub, identity=peers["client"].identity, trust=peers["client"].trust
        ) as client,
    ):
        listener = await server.listen(1)
        names: list[str | None] = []

        async def serve() -> None:
            async for stream in listener:
                names.append(stream.peer.name)
                await stream.aclose()

        task = asyncio.create_task(serve())
        for _ in range(3):
            stream = await client.connect("server", 1)
            assert await stream.read() == b""  # the server closed it
            await stream.aclose()
        await listener.aclose()
        await asyncio.wait_for(task, 5)
        assert names == ["client"] * 3


async def test_many_concurrent_streams(
    tcp_pair: tuple[Transport, Transport], peers: TestPeers
) -> None:
    client, server = tcp_pair
    listener = await server.listen(1)
    peers.set_endpoint("server", await _endpoint(server))

    handlers: set[asyncio.Task[None]] = set()

    async def echo() -> None:
        async for stream in listener:
            handlers.add(asyncio.create_task(_echo(stream)))

    async def _echo(stream: SecureStream) -> None:
        async with stream:
            while data := await stream.read():
                await stream.write(data)

    serving = asyncio.create_task(echo())

    async def one(index: int) -> None:
        async with await client.connect("server", 1) as stream:
            payload = str(index).encode() * 1000
            await stream.write(payload)
            await stream.write_eof()
            received = b""
            while data := await stream.read():
                received += data
            assert received == payload

    await asyncio.gather(*(one(i) for i in range(20)))
    await listener.aclose()
    await serving
    await asyncio.gather(*handlers)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="connect_timeout"):
        TransportOptions(connect_timeout=0)
    with pytest.raises(ValueError, match="accept_backlog"):
        TransportOptions(accept_backlog=0)
    for name in ("header_timeout", "trust_check_interval"):
        with pytest.raises(ValueError, match=name):
            TransportOptions(**{name: 0})
    for name in (
        "max_handshakes_per_source",
        "max_unauthenticated_per_source",
        "max_unauthenticated",
        "max_pending_handshakes",
    ):
        with pytest.raises(ValueError, match=name):
            TransportOptions(**{name: 0})
        with pytest.raises(ValueError, match=name):
            TransportOptions(**{name: True})


async def test_memory_hub_refuses_the_same_identity_twice(peers: TestPeers, hub: str) -> None:
    async with open_transport(hub, identity=peers["server"].identity, trust=peers["server"].trust):
        with pytest.raises(TransportURLError, match="already has an open transport"):
            await open_transport(
                hub, identity=peers["server"].identity, trust=peers["server"].trust
            )


async def test_resolve(peers: TestPeers, hub: str) -> None:
    async with open_transport(
        hub, identity=peers["client"].identity, trust=peers["client"].trust
    ) as client:
        assert client.resolve("server").node_id == peers["server"].node_id
        assert client.resolve(peers["server"].node_id).name == "server"
        with pytest.raises(UnknownPeerError):
            client.resolve("nobody")


async def test_a_failing_carrier_listener_ends_accept_instead_of_hanging(
    peers: TestPeers, hub: str, caplog: pytest.LogCaptureFixture
) -> None:
    from pilot_transport import Listener
    from pilot_transport._carrier import CarrierListener, CarrierStream
    from pilot_transport.errors import DaemonError

    class Failing(CarrierListener):
        port = 9

        async def accept(self) -> CarrierStream:
            raise DaemonError("the daemon went away")

        async def aclose(self) -> None:
            pass

    async with open_transport(
        hub, identity=peers["server"].identity, trust=peers["server"].trust
    ) as server:
        listener = Listener(server, Failing(), 9)
        with pytest.raises(ListenerClosedError):
            await asyncio.wait_for(listener.accept(), 5)
        assert "the daemon went away" in caplog.text
        await listener.aclose()


async def test_huge_read_sizes_are_fine(
    tcp_pair: tuple[Transport, Transport], peers: TestPeers
) -> None:
    client, server = tcp_pair
    listener = await server.listen(1)
    peers.set_endpoint("server", await _endpoint(server))
    stream, accepted = await asyncio.gather(client.connect("server", 1), listener.accept())
    await stream.write(b"x" * 100)
    assert await accepted.read(1 << 40) == b"x" * 100
    await stream.aclose()
    await accepted.aclose()


async def test_connect_by_pilot_address_of_a_trusted_peer(peers: TestPeers, hub: str) -> None:
    from pilot_transport import Address

    peers.set_address("server", "0:0000.0000.0005")
    async with (
        open_transport(
            hub, identity=peers["server"].identity, trust=peers["server"].trust
        ) as server,
        open_transport(
            hub, identity=peers["client"].identity, trust=peers["client"].trust
        ) as client,
    ):
        listener = await server.listen(1)
        for peer in ("0:0000.0000.0005", Address(0, 5)):
            stream, accepted = await asyncio.gather(client.connect(peer, 1), listener.accept())
            assert stream.peer.name == "server"
            assert stream.peer.address == "0:0000.0000.0005"
            await stream.aclose()
            await accepted.aclose()
        assert client.resolve("0:0000.0000.0005").name == "server"
        with pytest.raises(PeerUnreachableError, match="node id"):
            await client.connect("0:0000.0000.0009", 1)  # unknown address: memory cannot route it


async def test_idle_handshakes_never_block_acceptance(peers: TestPeers) -> None:
    """Stalled handshakes beyond the limit are shed; a real client still gets in."""
    # Long deadlines, so only shedding (not a timeout) can let the client in.
    options = TransportOptions(handshake_timeout=60, max_pending_handshakes=4)
    async with (
        open_transport(
            "tcp://127.0.0.1:0",
            identity=peers["server"].identity,
            trust=peers["server"].trust,
            options=options,
        ) as server,
        open_transport(
            "tcp://127.0.0.1:0", identity=peers["client"].identity, trust=peers["client"].trust
        ) as client,
    ):
        listener = await server.listen(1)
        endpoint = await _endpoint(server)
        peers.set_endpoint("server", endpoint)
        host, port = endpoint.rsplit(":", 1)
        stalled: list[asyncio.StreamWriter] = []
        for index in range(12):
            _reader, writer = await asyncio.open_connection(
                host, int(port), local_addr=(f"127.0.0.{2 + index % 3}", 0)
            )
            writer.write(b"PLTP\x01\x00\x01")  # names the port, then never speaks TLS
            stalled.append(writer)
        stream, accepted = await asyncio.gather(
            client.connect("server", 1, timeout=30), listener.accept()
        )
        assert accepted.peer.name == "client"
        details = (await server.info()).details
        assert details["refused_before_auth"]["shed"] >= 1
        await stream.aclose()
        await accepted.aclose()
        for writer in stalled:
            writer.close()


async def _pair_on_tcp(
    client: Transport, server: Transport, peers: TestPeers
) -> tuple[SecureStream, SecureStream]:
    listener = await server.listen(1)
    peers.set_endpoint("server", await _endpoint(server))
    dialled, accepted = await asyncio.gather(client.connect("server", 1), listener.accept())
    await dialled.write(b"ping")
    assert await accepted.read() == b"ping"
    return dialled, accepted


async def _read_until_error(stream: SecureStream) -> BaseException:
    async with asyncio.timeout(10):  # a failure bound: revocation is checked every 0.25 s
        while True:
            try:
                await stream.read()
            except StreamResetError as exc:
                return exc


async def test_removing_a_peer_closes_its_accepted_streams(
    tcp_pair: tuple[Transport, Transport], peers: TestPeers
) -> None:
    client, server = tcp_pair
    dialled, accepted = await _pair_on_tcp(client, server, peers)
    pending_read = asyncio.ensure_future(accepted.read())
    peers["server"].trust.remove("client")
    with pytest.raises(PeerRevokedError, match="removed from the trust store"):
        async with asyncio.timeout(10):
            await pending_read
    with pytest.raises(PeerRevokedError):
        await accepted.write(b"more")
    # The dialler sees its connection cut (no TLS close), not a clean end.
    assert not isinstance(await _read_until_error(dialled), PeerRevokedError)
    with pytest.raises(RejectedByPeerError):
        await client.connect("server", 1)
    assert (await server.info()).details["revoked_streams"] == 1
    await dialled.aclose()
    await accepted.aclose()


async def test_removing_a_peer_closes_its_dialled_streams(
    tcp_pair: tuple[Transport, Transport], peers: TestPeers
) -> None:
    client, server = tcp_pair
    dialled, accepted = await _pair_on_tcp(client, server, peers)
    peers["client"].trust.remove("server")
    assert isinstance(await _read_until_error(dialled), PeerRevokedError)
    assert isinstance(await _read_until_error(accepted), StreamResetError)
    await dialled.aclose()
    await accepted.aclose()


async def test_an_abandoned_dial_is_not_logged_as_a_refusal(
    tcp_pair: tuple[Transport, Transport], peers: TestPeers, caplog: pytest.LogCaptureFixture
) -> None:
    """A dialler that names the port and leaves before the TLS handshake (an
    abandoned dial, a port probe) is noted quietly, not counted as refused."""
    client, server = tcp_pair
    listener = await server.listen(7)
    endpoint = await _endpoint(server)
    peers.set_endpoint("server", endpoint)
    caplog.set_level("INFO", logger="pilot_transport")
    host, port = endpoint.rsplit(":", 1)
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"PLTP\x01\x00\x07")  # names port 7, then leaves without a word of TLS
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    # A real connection afterwards proves the abandoned one was handled first.
    stream, accepted = await asyncio.gather(client.connect("server", 7), listener.accept())
    await stream.aclose()
    await accepted.aclose()

    async def noted() -> None:
        while not any("before presenting a certificate" in r.message for r in caplog.records):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(noted(), 10)
    assert (await server.info()).details.get("refused_before_auth", {}).get("handshake", 0) == 0
    assert not [r for r in caplog.records if "refused inbound" in r.getMessage()]
