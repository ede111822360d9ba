"""The in-process Pilot node: one UDP socket, its tunnels, the registry and the beacon.

The node owns every background task it starts (heartbeat, handshake polling, key
exchanges) and stops them in :meth:`Node.aclose`. Decrypted packets are demultiplexed:
stream packets go to the stream layer (when one is attached), datagrams to the handler
bound to their destination port.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from . import _beacon as beacon
from ._aio import cancel_and_wait
from ._identity import NodeIdentity
from ._packet import Address, Flags, Packet, PacketError
from ._packet import Protocol as PacketProtocol
from ._registry import LookupResult, RegistryClient, parse_endpoint
from ._tunnel import (
    AuthFrame,
    FrameError,
    KeyExchange,
    PeerCrypto,
    SecureFrame,
    UnauthFrame,
    build_auth_frame,
    parse_frame,
)
from .errors import (
    IncompatiblePeerError,
    NodeClosedError,
    PeerUnreachableError,
    PilotNodeError,
    PilotTimeoutError,
    RegistryError,
    RegistryRefusedError,
    TunnelError,
)

if TYPE_CHECKING:
    from ._streams import StreamConfig

__all__ = ["Datagram", "DatagramHandler", "Node", "NodeConfig"]

_log = logging.getLogger("pilot_node")

ECHO_PORT = 7
HANDSHAKE_PORT = 444
_EPHEMERAL_MIN = 49152
_MAX_PENDING = 256
_MAX_RETIRED_KEYS = 8
_STALE_AFTER = 6.0
_REANNOUNCE_AFTER = 2.0
_PROBE_RETRY = 0.5
_UNKNOWN_PER_SECOND = 8
_MAX_PEERS = 4096
_REPLY_MIN_INTERVAL = 1.0
_FAILURES_BEFORE_REANNOUNCE = 3
_SEEK_DIRECT_EVERY = 30.0


@dataclass(frozen=True, slots=True)
class Datagram:
    """One datagram delivered to a bound port."""

    src: Address
    src_port: int
    dst_port: int
    payload: bytes


DatagramHandler = Callable[[Datagram], None]


class _StreamLayer(Protocol):
    def on_packet(self, packet: Packet) -> None: ...

    def begin_batch(self) -> None: ...

    def end_batch(self) -> None: ...

    def set_local_address(self, address: Address) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class NodeConfig:
    """How a :class:`Node` joins its network.

    Attributes:
        registry: ``host:port`` of the registry (TCP).
        beacon: ``host:port`` of the beacon (UDP), or ``""`` for none (no discovery, no relay).
        identity_path: the Ed25519 identity file (created with mode 0600 when missing);
            ``None`` for a throwaway identity.
        listen: local UDP ``host:port``; loopback by default.
        hostname: registered hostname (``""``: none).
        public: whether anyone may resolve our endpoint (else only trusted peers).
        heartbeat_interval: seconds between registry heartbeats.
        poll_interval: seconds between polls of the relayed handshake inbox.
        key_exchange_timeout: how long to try reaching a peer before giving up.
        auto_approve: approve every relayed trust request.
        require_trust: deliver datagrams and stream packets only from trusted nodes
            (key exchanges and answers to our own pings still pass).
        trust_path: a JSON file (mode 0600) that keeps the trusted node ids across
            restarts; ``None`` keeps them in memory only.
        socket_buffer: bytes asked of the kernel for the UDP socket's receive and send
            buffers (it may grant less: ``net.core.rmem_max`` caps it). A daemon sends in
            bursts; a small buffer drops them, and each dropped segment costs a
            retransmission timeout.
        streams: limits and timers of the stream layer (keepalives among them);
            ``None`` for the defaults of :class:`~pilot_node.StreamConfig`.
    """

    registry: str
    beacon: str = ""
    identity_path: str | os.PathLike[str] | None = None
    listen: str = "127.0.0.1:0"
    hostname: str = ""
    public: bool = True
    heartbeat_interval: float = 30.0
    poll_interval: float = 2.0
    key_exchange_timeout: float = 5.0
    announce_interval: float = 0.5
    auto_approve: bool = False
    require_trust: bool = False
    trust_path: str | os.PathLike[str] | None = None
    socket_buffer: int = 4 << 20
    streams: StreamConfig | None = None


@dataclass(slots=True)
class _Peer:
    node_id: int
    endpoint: tuple[str, int] | None = None
    via_relay: bool = False
    crypto: PeerCrypto | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pending: deque[bytes] = field(default_factory=lambda: deque[bytes](maxlen=_MAX_PENDING))
    retired: deque[bytes] = field(default_factory=lambda: deque[bytes](maxlen=_MAX_RETIRED_KEYS))
    ed25519: bytes = b""
    last_rx: float = 0.0
    last_announce: float = 0.0
    establishing: asyncio.Task[None] | None = None
    punching: asyncio.Task[None] | None = None
    last_seek: float = float("-inf")
    error: PilotNodeError | None = None
    incompatible: str = ""


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, node: Node) -> None:
        self.node = node

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.node._on_udp(data, (str(addr[0]), int(addr[1])))  # pyright: ignore[reportPrivateUsage]

    def error_received(self, exc: Exception) -> None:
        self.node.stats["udp_errors"] = self.node.stats.get("udp_errors", 0) + 1


_READ_BATCH = 64
_SEND_BACKLOG = 1024


class _UdpEndpoint:
    """The node's UDP socket, read in batches straight from the selector.

    asyncio's datagram transport reads one datagram per loop iteration; a bulk stream
    receives thousands a second, so each readable event here drains up to
    ``_READ_BATCH`` datagrams. Sends go straight to the socket; when it is full they
    wait in a bounded backlog (the oldest beyond ``_SEND_BACKLOG`` is dropped, as a
    congested network would) until the socket is writable again.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, node: Node) -> None:
        self._loop = loop
        self._sock = sock
        self._node = node
        self._backlog: deque[tuple[bytes, tuple[str, int]]] = deque()
        self._closed = False
        loop.add_reader(sock.fileno(), self._read_ready)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._sock.getsockname()
        return default

    def _read_ready(self) -> None:
        recvfrom = self._sock.recvfrom
        node = self._node
        # The stream layer sends what a batch produced once, at its end.
        layer = node.stream_layer
        if layer is not None:
            layer.begin_batch()
        try:
            for _ in range(_READ_BATCH):
                if self._closed:
                    return
                try:
                    data, addr = recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    node.stats["udp_errors"] = node.stats.get("udp_errors", 0) + 1
                    return
                node._on_udp(data, (str(addr[0]), int(addr[1])))  # pyright: ignore[reportPrivateUsage]
        finally:
            if layer is not None:
                layer.end_batch()

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._closed:
            return
        if not self._backlog:
            try:
                self._sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._sock.fileno(), self._write_ready)
            except OSError:
                self._node.stats["udp_errors"] = self._node.stats.get("udp_errors", 0) + 1
                return
        if len(self._backlog) >= _SEND_BACKLOG:
            self._backlog.popleft()
            self._node.stats["udp_send_dropped"] = self._node.stats.get("udp_send_dropped", 0) + 1
        self._backlog.append((data, addr))

    def _write_ready(self) -> None:
        while self._backlog and not self._closed:
            data, addr = self._backlog[0]
            try:
                self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._node.stats["udp_errors"] = self._node.stats.get("udp_errors", 0) + 1
            self._backlog.popleft()
        self._loop.remove_writer(self._sock.fileno())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._backlog.clear()
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        self._sock.close()


async def _open_udp(
    loop: asyncio.AbstractEventLoop, node: Node, listen: tuple[str, int]
) -> _UdpEndpoint | asyncio.DatagramTransport:
    infos = await loop.getaddrinfo(listen[0], listen[1], type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {listen[0]}:{listen[1]}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.bind(address)
        return _UdpEndpoint(loop, sock, node)
    except NotImplementedError:
        # An event loop without add_reader (Windows' proactor): asyncio's transport.
        sock.close()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(node), local_addr=listen
        )
        return transport
    except BaseException:
        sock.close()
        raise


class Node:
    """A Pilot network node in this process.

    Use as ``async with Node(NodeConfig(registry="127.0.0.1:9000")) as node:``. Not
    thread-safe: use it from the event loop that started it.
    """

    def __init__(self, config: NodeConfig, *, identity: NodeIdentity | None = None) -> None:
        """Prepare a node (nothing is opened until :meth:`start`).

        Args:
            config: how to join the network.
            identity: the node's identity; default: ``config.identity_path`` (created
                when missing), or a throwaway one.

        Raises:
            IdentityError: the identity file is unusable.
            PilotNodeError: a malformed registry, beacon or trust file.
        """
        self.config = config
        if identity is not None:
            self.identity = identity
        elif config.identity_path is not None:
            self.identity = NodeIdentity.load_or_create(Path(config.identity_path))
        else:
            self.identity = NodeIdentity.generate()
        reg = parse_endpoint(config.registry)
        if reg is None:
            raise PilotNodeError(f"registry must be host:port, got {config.registry!r}")
        self._beacon_addr = parse_endpoint(config.beacon) if config.beacon else None
        if config.beacon and self._beacon_addr is None:
            raise PilotNodeError(f"beacon must be host:port, got {config.beacon!r}")
        self.registry = RegistryClient(reg[0], reg[1], self.identity)
        self.node_id = 0
        self.address = Address(0, 0)
        self.endpoint: tuple[str, int] = ("", 0)
        self.observed_endpoint: tuple[str, int] | None = None
        self.stats: dict[str, int] = {}
        self.trusted: set[int] = _load_trust(config.trust_path)
        self.pending_trust: dict[int, str] = {}
        self._outgoing_trust: set[int] = set()
        self._trust_events: dict[int, asyncio.Event] = {}
        self._kx = KeyExchange()
        self._peers: dict[int, _Peer] = {}
        self._handlers: dict[int, DatagramHandler] = {}
        self._probes: dict[tuple[int, int], asyncio.Future[float]] = {}
        self._transport: _UdpEndpoint | asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unknown_window = 0.0
        self._unknown_count = 0
        self._auth_inflight: set[tuple[int, bytes, bytes]] = set()
        self._discover_waiter: asyncio.Future[tuple[str, int]] | None = None
        self.stream_layer: _StreamLayer | None = None
        self._started = False
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind the UDP socket, register, and start the background tasks.

        Raises:
            RegistryError: registration failed.
            NodeClosedError: already started or closed.
            OSError: the UDP address cannot be bound.

        Cancelling it closes whatever was opened.
        """
        if self._started or self._closed:
            raise NodeClosedError("a Node can be started once")
        self._started = True
        listen = parse_endpoint(self.config.listen, allow_zero=True)
        if listen is None:
            raise PilotNodeError(f"listen must be host:port, got {self.config.listen!r}")
        loop = asyncio.get_running_loop()
        try:
            self._transport = await _open_udp(loop, self, listen)
            udp = self._transport.get_extra_info("socket")
            if udp is not None and self.config.socket_buffer > 0:
                for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    with contextlib.suppress(OSError):
                        udp.setsockopt(socket.SOL_SOCKET, option, self.config.socket_buffer)
            sock = self._transport.get_extra_info("sockname")
            self.endpoint = (str(sock[0]), int(sock[1]))
            if self._beacon_addr is not None:
                await self._discover()
            await self._register()
            self._announce_to_beacon()
            self._attach_stream_layer()
            self._spawn(self._heartbeat_loop())
            self._spawn(self._poll_loop())
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop every task, close the stream layer and the socket. Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        layer, self.stream_layer = self.stream_layer, None
        if layer is not None:
            with contextlib.suppress(Exception):
                await layer.aclose()
        tasks = list(self._tasks)
        for peer in self._peers.values():
            if peer.establishing is not None:
                tasks.append(peer.establishing)
        await cancel_and_wait(tasks, "node")
        for fut in self._probes.values():
            if not fut.done():
                fut.cancel()
        if self._transport is not None:
            self._transport.close()
        await self.registry.aclose()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _check_open(self) -> None:
        if not self._started or self._closed or self._transport is None:
            raise NodeClosedError("the node is not running")

    def _attach_stream_layer(self) -> None:
        try:
            module = importlib.import_module("pilot_node._streams")
        except ImportError:
            return
        factory = getattr(module, "StreamLayer", None)
        if factory is None:
            return
        self.stream_layer = cast(
            _StreamLayer,
            factory(send=self.send_packet, local_address=self.address, config=self.config.streams),
        )

    @property
    def fingerprint(self) -> str:
        """The SHA-256 fingerprint of the node's Ed25519 public key."""
        return self.identity.fingerprint

    # -- registry ------------------------------------------------------------------------

    async def _discover(self) -> None:
        if self._beacon_addr is None or self._transport is None:
            return
        fut: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._discover_waiter = fut
        try:
            for _ in range(3):
                self._transport.sendto(beacon.discover(self.node_id), self._beacon_addr)
                with contextlib.suppress(asyncio.TimeoutError):
                    self.observed_endpoint = await asyncio.wait_for(asyncio.shield(fut), 1.0)
                    return
        finally:
            self._discover_waiter = None

    def _listen_addr(self) -> str:
        # Behind a NAT the beacon saw the router's address and the port it mapped ours
        # to: that is where peers outside can reach us (and where punching aims).
        host, port = self.observed_endpoint or self.endpoint
        return _endpoint_text(host, port)

    async def _register(self) -> None:
        # No LAN addresses are registered: the 1.18.0 daemon takes a peer whose LAN
        # address lies in one of its own subnets for a neighbour and dials that address
        # (two home networks on the same private subnet are common), then gives up on
        # the direct path when the "neighbour" refuses.
        reg = await self.registry.register(self._listen_addr(), hostname=self.config.hostname)
        old = self.node_id
        self.node_id = reg.node_id
        self.address = Address(0, reg.node_id)
        if old and old != reg.node_id:
            self._on_new_node_id(old)
        if not self.config.public:
            await self.registry.set_visibility(False)
        self.stats["registrations"] = self.stats.get("registrations", 0) + 1

    def _on_new_node_id(self, old: int) -> None:
        # The registry forgot us and handed out a new id (ours may now be someone else's).
        # Streams bound to the old address are reset by the layer; peers we hold keys
        # with learn the new id from a fresh announcement (the keys stay the same).
        _log.warning("the registry assigned node id %d (was %d)", self.node_id, old)
        self.stats["node_id_changes"] = self.stats.get("node_id_changes", 0) + 1
        self._announce_to_beacon()
        if self.stream_layer is not None:
            self.stream_layer.set_local_address(self.address)
        for peer in list(self._peers.values()):
            if peer.crypto is not None:
                self._announce(peer)

    async def _reregister(self) -> None:
        try:
            await self._register()
        except (RegistryError, PilotTimeoutError) as exc:
            _log.warning("re-registering the new endpoint failed: %s", exc)

    def _announce_to_beacon(self) -> None:
        # The beacon relays to the endpoint it last saw a discover from for our node id.
        if self._beacon_addr is not None and self._transport is not None and not self._closed:
            self._transport.sendto(beacon.discover(self.node_id), self._beacon_addr)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            self._announce_to_beacon()
            try:
                await self.registry.heartbeat()
            except RegistryRefusedError:
                # The registry lost us (restarted, or expired our entry): register again.
                with contextlib.suppress(RegistryError, PilotTimeoutError):
                    await self._register()
            except (RegistryError, PilotTimeoutError) as exc:
                _log.warning("registry heartbeat failed: %s", exc)
                with contextlib.suppress(RegistryError, PilotTimeoutError):
                    await self._register()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval)
            try:
                inbox = await self.registry.poll_handshakes()
            except (RegistryError, PilotTimeoutError) as exc:
                _log.debug("poll_handshakes failed: %s", exc)
                continue
            for peer_id, justification in inbox.requests:
                if (
                    peer_id in self.trusted
                    or peer_id in self._outgoing_trust
                    or self.config.auto_approve
                ):
                    await self._accept_trust(peer_id)
                elif len(self.pending_trust) < 256:
                    self.pending_trust[peer_id] = justification
            for peer_id, accepted in inbox.responses:
                self._outgoing_trust.discard(peer_id)
                if accepted:
                    self._add_trusted(peer_id)
                event = self._trust_events.pop(peer_id, None)
                if event is not None:
                    event.set()

    def _add_trusted(self, peer_id: int) -> None:
        if peer_id not in self.trusted:
            self.trusted.add(peer_id)
            _save_trust(self.config.trust_path, self.trusted)

    async def _accept_trust(self, peer_id: int) -> None:
        self.pending_trust.pop(peer_id, None)
        self._outgoing_trust.discard(peer_id)
        self._add_trusted(peer_id)
        with contextlib.suppress(RegistryError, PilotTimeoutError):
            await self.registry.respond_handshake(peer_id, True)
        with contextlib.suppress(RegistryError, PilotTimeoutError):
            await self.registry.report_trust(peer_id)
        event = self._trust_events.pop(peer_id, None)
        if event is not None:
            event.set()

    # -- public operations ---------------------------------------------------------------

    async def resolve_node(self, target: str | int | Address) -> int:
        """The node id behind an address text, a hostname, an :class:`Address` or an id.

        Raises:
            RegistryError: unknown hostname.
        """
        if isinstance(target, Address):
            return target.node
        if isinstance(target, int):
            return target
        try:
            return Address.parse(target).node
        except ValueError:
            return await self.registry.resolve_hostname(target)

    async def lookup(self, target: str | int | Address) -> LookupResult:
        """The registry's entry for a node (by address, hostname or id).

        Raises:
            RegistryError: unknown node or hostname, registry unreachable.
        """
        self._check_open()
        return await self.registry.lookup(await self.resolve_node(target))

    async def trust(
        self,
        target: str | int | Address,
        justification: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - how long to wait for the answer
    ) -> bool:
        """Ask a node to trust us (relayed through the registry, so private nodes work).

        A request from a node we asked ourselves is answered at once (mutual trust).
        With ``timeout``, wait that long for the answer and return whether it was an
        approval; without, return ``False`` right after sending (``True`` if already trusted).

        Raises:
            RegistryError: the request could not be delivered.
        """
        self._check_open()
        peer_id = await self.resolve_node(target)
        if peer_id in self.trusted:
            return True
        if peer_id in self.pending_trust:
            await self._accept_trust(peer_id)
            return True
        event = self._trust_events.setdefault(peer_id, asyncio.Event())
        self._outgoing_trust.add(peer_id)
        try:
            await self.registry.request_handshake(peer_id, justification)
        except RegistryRefusedError as exc:
            # "already pending" is fine: the earlier request still stands.
            if "already pending" not in exc.message:
                self._outgoing_trust.discard(peer_id)
                raise
        if timeout is None:
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        return peer_id in self.trusted

    async def approve(self, target: str | int | Address) -> None:
        """Approve a node's pending (or future) trust request. Safe to repeat.

        Raises:
            RegistryError: the approval could not be recorded.
        """
        self._check_open()
        await self._accept_trust(await self.resolve_node(target))

    def on_datagram(self, port: int, handler: DatagramHandler | None) -> None:
        """Deliver datagrams addressed to ``port`` to ``handler`` (``None`` unbinds).

        The handler runs on the event loop and must not block.

        Raises:
            ValueError: ``port`` is outside 0..65535.
        """
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is outside 0..65535")
        if handler is None:
            self._handlers.pop(port, None)
        else:
            self._handlers[port] = handler

    async def send_datagram(
        self,
        target: str | int | Address,
        port: int,
        payload: bytes,
        *,
        src_port: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109 - a bound on establishing the tunnel
    ) -> None:
        """Send one datagram (unreliable, unordered) to ``target``'s ``port``.

        Waits (up to ``timeout``, default the key-exchange timeout) for the tunnel only when
        none exists yet; after that a send never waits.

        Raises:
            PeerUnreachableError: no tunnel could be established.
            IncompatiblePeerError: the peer speaks another tunnel dialect.
            PacketError: payload too large.
        """
        self._check_open()
        node_id = await self.resolve_node(target)
        packet = Packet(
            flags=Flags.NONE,
            protocol=PacketProtocol.DATAGRAM,
            src=self.address,
            dst=Address(0, node_id),
            src_port=src_port,
            dst_port=port,
            payload=payload,
        )
        await self.connect(node_id, timeout=timeout)
        self.send_packet(packet)

    async def connect(
        self,
        target: str | int | Address,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a bound on the key exchange
    ) -> None:
        """Establish (or confirm) the encrypted tunnel to ``target``. Safe to repeat.

        Raises:
            PilotTimeoutError: no tunnel within ``timeout`` (default: the key-exchange
                timeout).
            PeerUnreachableError: the key exchange gave up (no answer, or no route: the
                node cannot be resolved and no beacon is configured).
            IncompatiblePeerError: the peer speaks another tunnel dialect.

        Cancelling it stops waiting; the key exchange carries on in the background.
        """
        self._check_open()
        node_id = await self.resolve_node(target)
        if node_id == self.node_id:
            raise PeerUnreachableError("cannot open a tunnel to ourselves")
        peer = self._peer(node_id)
        if peer.incompatible:
            raise IncompatiblePeerError(node_id, peer.incompatible)
        if peer.crypto is not None:
            return
        self._establish(peer)
        limit = self.config.key_exchange_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(peer.ready.wait(), limit)
        except TimeoutError:
            if peer.incompatible:
                raise IncompatiblePeerError(node_id, peer.incompatible) from None
            raise PilotTimeoutError(
                f"no tunnel to node {node_id} within {limit} s"
                + (f" ({peer.error})" if peer.error else "")
            ) from None
        if peer.crypto is None:
            if peer.incompatible:
                raise IncompatiblePeerError(node_id, peer.incompatible)
            raise peer.error or PeerUnreachableError(f"node {node_id} is unreachable")

    async def ping(
        self,
        target: str | int | Address,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - the probe's deadline
    ) -> float:
        """Round-trip time in seconds to ``target``'s echo port (a stream open, then reset).

        Raises:
            PilotTimeoutError: no answer within ``timeout``.
            PeerUnreachableError: no tunnel.

        Safe to repeat and to run concurrently; cancelling it abandons the probe.
        """
        self._check_open()
        node_id = await self.resolve_node(target)
        await self.connect(node_id, timeout=timeout)
        loop = asyncio.get_running_loop()
        port = self._free_probe_port(node_id)
        fut: asyncio.Future[float] = loop.create_future()
        self._probes[(node_id, port)] = fut
        syn = Packet(
            flags=Flags.SYN,
            protocol=PacketProtocol.STREAM,
            src=self.address,
            dst=Address(0, node_id),
            src_port=port,
            dst_port=ECHO_PORT,
            seq=secrets.randbits(32),
            window=64,
        )
        deadline = time.monotonic() + timeout
        try:
            # The daemon admits a limited rate of new connections and drops the rest
            # silently: repeat the probe until it is answered. The round trip is timed from
            # the probe that was answered (the last one sent).
            while True:
                sent = time.monotonic()
                self.send_packet(syn)
                wait = min(_PROBE_RETRY, deadline - sent)
                if wait <= 0:
                    raise PilotTimeoutError(f"ping to node {node_id}: no answer in {timeout} s")
                try:
                    answered = await asyncio.wait_for(asyncio.shield(fut), wait)
                except TimeoutError:
                    continue
                return answered - sent
        finally:
            self._probes.pop((node_id, port), None)
            if not fut.done():
                fut.cancel()

    def _free_probe_port(self, node_id: int) -> int:
        while True:
            port = secrets.randbelow(0xFFFF - _EPHEMERAL_MIN) + _EPHEMERAL_MIN
            if (node_id, port) not in self._probes:
                return port

    def peer_info(self, target: int) -> dict[str, Any]:
        """A snapshot of what the node knows about peer ``target`` (for diagnostics)."""
        peer = self._peers.get(target)
        if peer is None:
            return {}
        return {
            "node_id": peer.node_id,
            "endpoint": peer.endpoint,
            "via_relay": peer.via_relay,
            "tunnel": peer.crypto is not None,
            "incompatible": peer.incompatible,
            "pending": len(peer.pending),
        }

    # -- sending -------------------------------------------------------------------------

    def send_packet(self, packet: Packet) -> None:
        """Encrypt and send one packet to its destination node (the stream layer's hook).

        Never blocks: without a tunnel yet, the packet waits (bounded; the oldest is dropped
        past 256) while one is established.
        """
        if self._closed or self._transport is None:
            return
        node_id = packet.dst.node
        if node_id == self.node_id or node_id == 0:
            self._count("dropped_to_self")
            return
        peer = self._peer(node_id)
        plain = packet.encode()
        crypto = peer.crypto
        if crypto is None:
            peer.pending.append(plain)
            self._establish(peer)
            return
        now = time.monotonic()
        if (
            now - max(peer.last_rx, crypto.created_at) > _REANNOUNCE_AFTER
            and now - peer.last_announce > _REPLY_MIN_INTERVAL
        ):
            # Nothing heard from the peer lately: it may have restarted and lost our key.
            # Announcing again costs one frame; a peer that still has the key ignores it.
            self._announce(peer)
        self._transmit(peer, crypto.seal(self.node_id, plain))

    def _transmit(self, peer: _Peer, frame: bytes) -> None:
        if self._transport is None or self._closed:
            return
        if peer.endpoint is not None and not peer.via_relay:
            self._transport.sendto(frame, peer.endpoint)
        elif self._beacon_addr is not None:
            self._transport.sendto(
                beacon.relay(self.node_id, peer.node_id, frame), self._beacon_addr
            )
        else:
            self._count("dropped_no_route")

    def _announce(self, peer: _Peer, *, also_relay: bool | None = None) -> None:
        # ``also_relay`` None: through the relay too while the direct path is unconfirmed.
        if self._transport is None or self._closed:
            return
        frame = build_auth_frame(self.identity, self.node_id, self._kx.public)
        peer.last_announce = time.monotonic()
        if peer.endpoint is not None:
            self._transport.sendto(frame, peer.endpoint)
        relay = peer.via_relay if also_relay is None else also_relay
        if self._beacon_addr is not None and (relay or peer.endpoint is None):
            self._transport.sendto(
                beacon.relay(self.node_id, peer.node_id, frame), self._beacon_addr
            )

    def _peer(self, node_id: int) -> _Peer:
        peer = self._peers.get(node_id)
        if peer is None:
            peer = _Peer(node_id)
            self._peers[node_id] = peer
        return peer

    def _establish(self, peer: _Peer) -> None:
        if peer.establishing is not None and not peer.establishing.done():
            return
        if self._closed:
            return
        peer.error = None
        peer.ready.clear()
        peer.establishing = asyncio.get_running_loop().create_task(self._establish_task(peer))

    async def _establish_task(self, peer: _Peer) -> None:
        deadline = time.monotonic() + self.config.key_exchange_timeout
        try:
            try:
                endpoint = await self.registry.resolve(peer.node_id)
            except (RegistryError, PilotTimeoutError) as exc:
                if self._beacon_addr is None:
                    peer.error = PeerUnreachableError(
                        f"node {peer.node_id} cannot be resolved and no beacon is configured "
                        f"to relay through: {exc}"
                    )
                    return
                peer.via_relay = True
            else:
                # With a beacon, a resolved endpoint is only a candidate (it may sit behind
                # a NAT that drops what we send): relay until a frame from the peer arrives
                # straight from it. Without a beacon there is no other way than direct.
                confirmed = peer.endpoint == endpoint and not peer.via_relay
                peer.endpoint = endpoint
                peer.via_relay = self._beacon_addr is not None and not confirmed
            if peer.via_relay:
                self._request_punch(peer)
            while peer.crypto is None and time.monotonic() < deadline:
                self._announce(peer)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(peer.ready.wait(), self.config.announce_interval)
            if peer.crypto is None:
                peer.error = PeerUnreachableError(
                    peer.incompatible
                    or f"node {peer.node_id} did not answer the key exchange within "
                    f"{self.config.key_exchange_timeout} s"
                )
                peer.pending.clear()
                return
            await self._punch(peer)
        finally:
            peer.establishing = None
            peer.ready.set()
            if peer.crypto is None:
                # The waiters already woke (with the error); re-arm for the next attempt.
                peer.ready.clear()

    def _request_punch(self, peer: _Peer) -> None:
        # Ask the beacon to have both sides send to each other: that opens the NATs.
        if self._transport is not None and self._beacon_addr is not None and not self._closed:
            self._count("punch_requests")
            self._transport.sendto(
                beacon.punch_request(self.node_id, peer.node_id), self._beacon_addr
            )

    async def _punch(self, peer: _Peer) -> None:
        # The tunnel works (maybe through the relay). Keep offering the direct path for a
        # while: a frame straight from the peer switches the traffic to it.
        deadline = time.monotonic() + self.config.key_exchange_timeout
        while peer.via_relay and peer.endpoint is not None and time.monotonic() < deadline:
            self._announce(peer, also_relay=False)
            await asyncio.sleep(self.config.announce_interval)
        if peer.via_relay:
            self._count("relay_fallbacks")

    def _seek_direct(self, peer: _Peer) -> None:
        # A peer reached us through the relay first: look up where it is and punch too.
        if (
            self._beacon_addr is None
            or self._closed
            or (peer.establishing is not None and not peer.establishing.done())
            or (peer.punching is not None and not peer.punching.done())
            or time.monotonic() - peer.last_seek < _SEEK_DIRECT_EVERY
        ):
            # At most one attempt per peer every _SEEK_DIRECT_EVERY seconds: each costs a
            # registry call, and a relayed peer announces itself now and then.
            return
        peer.last_seek = time.monotonic()
        peer.punching = self._spawn(self._seek_direct_task(peer))

    async def _seek_direct_task(self, peer: _Peer) -> None:
        try:
            if peer.endpoint is None:
                try:
                    endpoint = await self.registry.resolve(peer.node_id)
                except (RegistryError, PilotTimeoutError) as exc:
                    # Private and not trusting us (yet): the beacon's punch still tells
                    # the peer where we are, so it can open the path from its side.
                    _log.debug("cannot resolve node %d to punch: %s", peer.node_id, exc)
                else:
                    if peer.endpoint is None:
                        peer.endpoint = endpoint
            if peer.via_relay:
                self._request_punch(peer)
                await self._punch(peer)
        finally:
            peer.punching = None

    # -- receiving -----------------------------------------------------------------------

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _on_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._closed:
            return
        if self._beacon_addr is not None and addr == self._beacon_addr and data[:1] < b"\x10":
            self._on_beacon(data)
            return
        self._on_frame(data, addr, relayed=False)

    def _on_beacon(self, data: bytes) -> None:
        kind = data[0] if data else -1
        try:
            if kind == beacon.DISCOVER_REPLY:
                endpoint = beacon.decode_endpoint(data)
                waiter = self._discover_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(endpoint)
                elif self.node_id and endpoint != self.observed_endpoint:
                    # The NAT mapped us anew (or the first discovery went unanswered):
                    # tell the registry where we are now reachable.
                    self.observed_endpoint = endpoint
                    self._count("observed_endpoint_changes")
                    self._spawn(self._reregister())
            elif kind == beacon.RELAY_DELIVER:
                source, frame = beacon.decode_relay_deliver(data)
                self._on_frame(frame, None, relayed=True, relay_source=source)
            elif kind == beacon.PUNCH_COMMAND and self._transport is not None:
                endpoint = beacon.decode_endpoint(data)
                self._count("punch_commands")
                self._transport.sendto(b"PILP" + self.node_id.to_bytes(4, "big"), endpoint)
                # A peer we only reach through the relay so far: offer it the direct path
                # (a signed announcement it can verify, unlike the punch packet).
                for peer in self._peers.values():
                    if peer.via_relay and peer.endpoint == endpoint:
                        self._announce(peer, also_relay=False)
            else:
                self._count("beacon_unknown")
        except TunnelError:
            self._count("beacon_malformed")

    def _on_frame(
        self,
        data: bytes,
        addr: tuple[str, int] | None,
        *,
        relayed: bool,
        relay_source: int = 0,
    ) -> None:
        try:
            frame = parse_frame(data)
        except FrameError:
            self._count("malformed_frames")
            return
        if frame is None:
            # Plaintext (PILT), punch (PILP) and unknown frames carry no proof of origin.
            self._count("unauthenticated_dropped")
            return
        if relayed and frame.node_id != relay_source:
            self._count("relay_source_mismatch")
            return
        if isinstance(frame, SecureFrame):
            self._on_secure(frame, addr)
        elif isinstance(frame, AuthFrame):
            ident = (frame.node_id, frame.x25519, frame.signature)
            if frame.node_id == self.node_id or ident in self._auth_inflight:
                self._count("handshakes_coalesced")
                return
            if len(self._auth_inflight) >= 64:
                self._count("handshakes_shed")
                return
            self._auth_inflight.add(ident)
            self._spawn(self._on_auth(frame, addr))
        else:
            self._on_unauth(frame)

    def _on_secure(self, frame: SecureFrame, addr: tuple[str, int] | None) -> None:
        peer = self._peers.get(frame.node_id)
        now = time.monotonic()
        if peer is None or peer.crypto is None:
            self._count("no_key_dropped")
            if peer is None and not self._take_unknown_budget(now):
                return
            peer = self._peer(frame.node_id)
            if now - peer.last_announce > _REPLY_MIN_INTERVAL:
                # The sender holds a key for us that we do not (we restarted, or it is a
                # stranger): announce ours. The registry decides whether it resolves.
                self._establish(peer)
            return
        try:
            plain = peer.crypto.open(frame, now)
        except FrameError:
            self._count("auth_failed_dropped")
            if peer.crypto.last_ok == 0.0 and not peer.incompatible:
                reason = peer.crypto.older_dialect(frame)
                if reason:
                    peer.incompatible = reason
                    self._count("older_peers_refused")
                    _log.warning("refusing node %d: %s", frame.node_id, reason)
            if (
                peer.crypto.failures >= _FAILURES_BEFORE_REANNOUNCE
                and now - peer.last_announce > _REPLY_MIN_INTERVAL
            ):
                # Either forged frames or a peer that restarted and lost our key: re-announce
                # (never drop the key: forged frames must not tear a working tunnel down).
                self._announce(peer, also_relay=peer.via_relay)
            return
        peer.last_rx = now
        if addr is not None:
            if peer.via_relay:
                self._count("direct_paths_confirmed")
            peer.endpoint = addr
            peer.via_relay = False
        try:
            packet = Packet.decode(plain)
        except PacketError:
            self._count("bad_packets")
            return
        if packet.src.node != frame.node_id:
            self._count("spoofed_source_dropped")
            return
        if packet.dst.node != self.node_id and not packet.dst.is_broadcast:
            self._count("misaddressed_dropped")
            return
        self._dispatch(packet)

    def _take_unknown_budget(self, now: float) -> bool:
        # At most _UNKNOWN_PER_SECOND key exchanges a second started by frames from
        # unknown senders, so forged frames cannot turn into a flood of registry calls.
        if now - self._unknown_window > 1.0:
            self._unknown_window = now
            self._unknown_count = 0
        if self._unknown_count >= _UNKNOWN_PER_SECOND or len(self._peers) >= _MAX_PEERS:
            self._count("unknown_senders_shed")
            return False
        self._unknown_count += 1
        return True

    def _dispatch(self, packet: Packet) -> None:
        if self.config.require_trust and packet.src.node not in self.trusted:
            probe = self._probes.get((packet.src.node, packet.dst_port))
            if probe is None or packet.protocol != PacketProtocol.STREAM:
                self._count("untrusted_dropped")
                return
        if packet.protocol == PacketProtocol.DATAGRAM:
            handler = self._handlers.get(packet.dst_port)
            if handler is None:
                self._count("datagrams_unbound")
                return
            self._count("datagrams_received")
            try:
                handler(Datagram(packet.src, packet.src_port, packet.dst_port, packet.payload))
            except Exception:
                _log.exception("datagram handler for port %d failed", packet.dst_port)
            return
        if packet.protocol != PacketProtocol.STREAM:
            self._count("control_ignored")
            return
        probe = self._probes.get((packet.src.node, packet.dst_port))
        if probe is not None and packet.src_port == ECHO_PORT:
            if packet.has(Flags.SYN | Flags.ACK) and not probe.done():
                probe.set_result(time.monotonic())
            if not packet.has(Flags.RST):
                self.send_packet(
                    Packet(
                        flags=Flags.RST,
                        protocol=PacketProtocol.STREAM,
                        src=self.address,
                        dst=packet.src,
                        src_port=packet.dst_port,
                        dst_port=packet.src_port,
                        seq=packet.ack,
                    )
                )
            return
        if self.stream_layer is not None:
            self.stream_layer.on_packet(packet)
            return
        if packet.has(Flags.SYN) and not packet.has(Flags.ACK):
            # Nothing listens: refuse at once so the dialer does not wait for a timeout.
            self.send_packet(
                Packet(
                    flags=Flags.RST | Flags.ACK,
                    protocol=PacketProtocol.STREAM,
                    src=self.address,
                    dst=packet.src,
                    src_port=packet.dst_port,
                    dst_port=packet.src_port,
                    ack=(packet.seq + 1) & 0xFFFFFFFF,
                )
            )
        self._count("streams_refused")

    async def _peer_key(self, node_id: int, *, refresh: bool = False) -> bytes:
        peer = self._peer(node_id)
        if peer.ed25519 and not refresh:
            return peer.ed25519
        found = await self.registry.lookup(node_id)
        peer.ed25519 = found.public_key
        return found.public_key

    async def _on_auth(self, frame: AuthFrame, addr: tuple[str, int] | None) -> None:
        try:
            try:
                key = await self._peer_key(frame.node_id)
                if key != frame.ed25519:
                    key = await self._peer_key(frame.node_id, refresh=True)
            except (RegistryError, PilotTimeoutError):
                self._count("handshakes_unverifiable")
                return
            if not frame.verify(key):
                self._count("handshakes_forged_dropped")
                return
            self._install(frame, addr)
        finally:
            self._auth_inflight.discard((frame.node_id, frame.x25519, frame.signature))

    def _install(self, frame: AuthFrame, addr: tuple[str, int] | None) -> None:
        peer = self._peer(frame.node_id)
        now = time.monotonic()
        newly_direct = False
        if addr is not None:
            newly_direct = peer.via_relay or peer.endpoint != addr
            if newly_direct:
                self._count("direct_paths_confirmed")
            peer.endpoint = addr
            peer.via_relay = False
        elif peer.endpoint is None:
            peer.via_relay = True
        if addr is None and peer.via_relay:
            self._seek_direct(peer)
        current = peer.crypto
        if current is not None and current.peer_x25519 == frame.x25519:
            # Same session (a retransmit or a keepalive): answer only if the peer seems to
            # have lost our key (nothing decrypted from it lately), or if this frame opened
            # the direct path (so the peer learns it works too and stops relaying).
            self._count("handshakes_same_session")
            if newly_direct or (
                now - max(peer.last_rx, current.created_at) > _STALE_AFTER
                and now - peer.last_announce > _REPLY_MIN_INTERVAL
            ):
                self._announce(peer)
            return
        if frame.x25519 in peer.retired:
            # An announcement of a key the peer already replaced: a replay, not a restart.
            self._count("handshakes_replayed_dropped")
            return
        if current is not None:
            peer.retired.append(current.peer_x25519)
            self._count("peer_rekeyed")
        try:
            peer.crypto = self._kx.crypto_for(frame.x25519, now)
        except TunnelError:
            self._count("handshakes_bad_key")
            return
        peer.incompatible = ""
        self._count("tunnels_established")
        self._announce(peer)
        while peer.pending:
            self._transmit(peer, peer.crypto.seal(self.node_id, peer.pending.popleft()))
        peer.ready.set()

    def _on_unauth(self, frame: UnauthFrame) -> None:
        # Unsigned key exchanges are never installed: nothing proves who sent them. The
        # 1.18.0 daemon sends one now and then alongside its signed one; answering with
        # our signed key (at most once a second) is what it expects from a peer with an
        # identity.
        self._count("handshakes_unauthenticated_dropped")
        peer = self._peers.get(frame.node_id)
        if peer is not None and time.monotonic() - peer.last_announce > _REPLY_MIN_INTERVAL:
            self._announce(peer)


def _endpoint_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _load_trust(path: str | os.PathLike[str] | None) -> set[int]:
    if path is None:
        return set()
    target = Path(path)
    try:
        doc = json.loads(target.read_text())
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as exc:
        raise PilotNodeError(f"cannot read the trust file {target}: {exc}") from exc
    entries = cast(dict[str, Any], doc).get("trusted") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise PilotNodeError(f"trust file {target} has no 'trusted' list")
    return {int(entry) for entry in cast(list[Any], entries)}


def _save_trust(path: str | os.PathLike[str] | None, trusted: set[int]) -> None:
    if path is None:
        return
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"trusted": sorted(trusted)}, fh)
        os.replace(tmp, target)
    except OSError as exc:
        _log.error("cannot write the trust file %s: %s", target, exc)
