"""The public face: ``open_transport`` -> Transport -> connect/listen -> SecureStream."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote, urlsplit

from pilot_transport._address import Address
from pilot_transport._carrier import Carrier, CarrierListener, CarrierStream, DialTarget
from pilot_transport._carriers._accept import AcceptQueue
from pilot_transport._identity import Identity
from pilot_transport._peer import PeerInfo
from pilot_transport._tls import (
    AbandonedHandshakeError,
    SecureStream,
    TLSConfig,
    client_handshake,
    server_handshake,
)
from pilot_transport._trust import TrustedPeer, TrustStore
from pilot_transport.errors import (
    AddressError,
    ConnectTimeoutError,
    HandshakeError,
    ListenerClosedError,
    PeerNotTrustedError,
    PeerRevokedError,
    StreamClosedError,
    TransportError,
    TransportURLError,
    TransportUsageError,
    UnknownPeerError,
)

__all__ = [
    "Listener",
    "Transport",
    "TransportInfo",
    "TransportOptions",
    "open_transport",
]

logger = logging.getLogger("pilot_transport")

_MAX_PORT = 0xFFFF
_LOG_WINDOW_SECS = 10.0
_LOGS_PER_WINDOW = 10
"""Refused inbound connections logged one by one per window; the rest are summed up."""


def _source_of(remote_hint: str) -> str:
    """The host part of a carrier's ``host:port`` hint (the whole hint otherwise)."""
    host, sep, port = remote_hint.rpartition(":")
    return host if sep and port.isdigit() else remote_hint


@dataclass(frozen=True, kw_only=True, slots=True)
class TransportOptions:
    """Tuning knobs of a :class:`Transport`; the defaults are safe.

    Attributes:
        connect_timeout: seconds ``connect`` may take (carrier dial + TLS), unless
            the call passes its own ``timeout``.
        handshake_timeout: seconds an inbound peer has from its connection's
            accept to an authenticated stream (on ``tcp://`` this includes the
            port header and any wait for admission). Default 5.
        header_timeout: ``tcp://`` only: seconds an admitted inbound connection
            has to send its 7-byte port header. Default 3.
        max_handshakes_per_source: ``tcp://`` only: unauthenticated inbound
            connections of one source IP address served at once; more from that
            address wait unread, in arrival order. Default 8.
        max_unauthenticated_per_source: ``tcp://`` only: unauthenticated inbound
            connections of one source IP address, served or waiting; a new one
            beyond it is refused at once. Default 64.
        max_unauthenticated: ``tcp://`` only: unauthenticated inbound connections
            in all (served or waiting); a new one beyond it drops the oldest
            connection of the source holding the most. Default 256.
        accept_backlog: authenticated streams waiting for ``accept`` per listener;
            beyond it new ones are closed (and logged).
        max_pending_handshakes: inbound handshakes in progress per listener; a
            new one beyond it cancels the oldest handshake of the source holding
            the most (acceptance never waits). Default 256.
        trust_check_interval: seconds between checks of the trust store for
            removed peers; streams of a peer no longer trusted are closed with
            :class:`PeerRevokedError`. Default 0.25.

    Raises:
        ValueError: a value is not positive.
    """

    connect_timeout: float = 10.0
    handshake_timeout: float = 5.0
    header_timeout: float = 3.0
    max_handshakes_per_source: int = 8
    max_unauthenticated_per_source: int = 64
    max_unauthenticated: int = 256
    accept_backlog: int = 128
    max_pending_handshakes: int = 256
    trust_check_interval: float = 0.25

    def __post_init__(self) -> None:
        for name in (
            "connect_timeout",
            "handshake_timeout",
            "header_timeout",
            "trust_check_interval",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name in (
            "accept_backlog",
            "max_pending_handshakes",
            "max_handshakes_per_source",
            "max_unauthenticated_per_source",
            "max_unauthenticated",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TransportInfo:
    """Facts about a transport, from :meth:`Transport.info`.

    Attributes:
        node_id: our node id.
        fingerprint: our key's fingerprint.
        public_key: our public key as base64 (what peers put in their trust store).
        carrier: the URL scheme (``tcp``, ``memory``, ``pilot``).
        url: the transport URL as given.
        endpoint: where peers dial us on tcp (``127.0.0.1:7001``), once listening.
        address: our Pilot address (pilot carrier), if known.
        listening_ports: virtual ports with an open listener.
        details: everything the carrier reports (daemon info, hub name, ...).
    """

    node_id: str
    fingerprint: str
    public_key: str
    carrier: str
    url: str
    endpoint: str | None
    address: str | None
    listening_ports: tuple[int, ...]
    details: Mapping[str, Any] = field(default_factory=lambda: {})


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= _MAX_PORT:  # pyright: ignore[reportUnnecessaryIsInstance]  # runtime guard
        raise TransportUsageError(f"port must be an int in 1..{_MAX_PORT}, got {port!r}")
    return port


class Listener:
    """Authenticated inbound streams on one virtual port.

    Handshakes run in the background as soon as the listener exists;
    acceptance never waits for one (beyond ``max_pending_handshakes`` the
    oldest handshake of the busiest source is cancelled); ``accept`` hands out
    the streams whose peer we trust. Failed handshakes are logged (with the peer's fingerprint)
    and never raised from ``accept``.

    ``async for stream in listener`` yields streams until the listener closes.
    Usable as an async context manager (closes on exit).
    """

    def __init__(self, transport: Transport, carrier_listener: CarrierListener, port: int) -> None:
        self.port = port
        self.transport = transport
        self._carrier_listener = carrier_listener
        options = transport.options
        self._queue: AcceptQueue[SecureStream] = AcceptQueue(
            options.accept_backlog, f"listener on port {port}"
        )
        self._handshakes: dict[asyncio.Task[None], str] = {}  # task -> source, oldest first
        self._cancelled: set[asyncio.Task[None]] = set()  # shed, still finishing
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(
            self._accept_loop(), name=f"pilot-transport accept port {port}"
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called (or the transport closed)."""
        return self._closed

    async def accept(self) -> SecureStream:
        """Wait for the next authenticated inbound stream.

        Cancelling the wait loses no stream.

        Raises:
            ListenerClosedError: the listener is closed, or closes while waiting.
        """
        return await self._queue.get()

    def __aiter__(self) -> AsyncIterator[SecureStream]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[SecureStream]:
        while True:
            try:
                stream = await self.accept()
            except ListenerClosedError:
                return
            yield stream

    async def _accept_loop(self) -> None:
        try:
            while True:
                try:
                    carrier_stream = await self._carrier_listener.accept()
                except ListenerClosedError:
                    break
                except TransportError as exc:
                    logger.error("listener on port %d stopped: %s", self.port, exc)
                    break
                if len(self._handshakes) >= self.transport.options.max_pending_handshakes:
                    self._shed_handshake()
                task = asyncio.get_running_loop().create_task(self._handshake(carrier_stream))
                self._handshakes[task] = _source_of(carrier_stream.remote_hint)
                task.add_done_callback(self._handshake_done)
        finally:
            # However the loop ends, accept() must not wait for streams that cannot come.
            for stream in self._queue.close():
                await stream.aclose()

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self._handshakes.pop(task, None)
        self._cancelled.discard(task)

    def _shed_handshake(self) -> None:
        # Never wait for a slot: cancel the oldest handshake of the source that
        # has the most in progress, so one slow or hostile source cannot make
        # everyone else wait behind it.
        counts: dict[str, int] = {}
        for source in self._handshakes.values():
            counts[source] = counts.get(source, 0) + 1
        heaviest = max(counts, key=lambda source: counts[source])
        for task, source in self._handshakes.items():
            if source == heaviest:
                del self._handshakes[task]
                self._cancelled.add(task)
                task.cancel()
                self.transport._note_refused("shed")
                return

    async def _handshake(self, carrier_stream: CarrierStream) -> None:
        hint = carrier_stream.remote_hint or "unknown"
        try:
            async with asyncio.timeout(self.transport.options.handshake_timeout):
                stream = await server_handshake(carrier_stream, self.transport._tls)
        except TimeoutError:
            with contextlib.suppress(TransportError):
                await carrier_stream.aclose()
            self.transport._note_refused(
                "timeout",
                f"inbound connection on port {self.port} from {hint}: handshake timed out",
            )
            return
        except AbandonedHandshakeError as exc:
            # The dialler went away before presenting itself (an abandoned dial, a
            # port probe): nothing was refused.
            logger.info("inbound connection on port %d from %s: %s", self.port, hint, exc)
            return
        except HandshakeError as exc:
            self.transport._note_refused(
                "handshake", f"refused inbound connection on port {self.port}: {exc}"
            )
            return
        except TransportError as exc:
            self.transport._note_refused(
                "broken", f"inbound connection on port {self.port} from {hint} failed: {exc}"
            )
            return
        except Exception:
            logger.exception("inbound handshake on port %d from %s crashed", self.port, hint)
            with contextlib.suppress(Exception):
                await carrier_stream.aclose()
            return
        mark_authenticated: Callable[[], None] | None = getattr(
            carrier_stream, "mark_authenticated", None
        )
        if mark_authenticated is not None:
            mark_authenticated()
        if not self.transport._adopt(stream):
            await stream.aclose()
            return
        if not self._queue.put_nowait(stream):
            logger.warning(
                "dropped authenticated connection from %s on port %d: accept backlog full",
                stream.peer.name,
                self.port,
            )
            await stream.aclose()
            return
        logger.debug(
            "accepted %s (%s) on port %d", stream.peer.name, stream.peer.node_id, self.port
        )

    async def aclose(self) -> None:
        """Stop accepting; pending ``accept`` calls raise ListenerClosedError. Idempotent.

        Streams already accepted stay open.
        """
        if self._closed:
            return
        self._closed = True
        self.transport._listeners.pop(self.port, None)
        self._task.cancel()
        for task in list(self._handshakes):
            task.cancel()
        tasks = [self._task, *self._handshakes, *self._cancelled]
        with contextlib.suppress(TransportError):
            await self._carrier_listener.aclose()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in self._queue.close():
            await stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Listener port={self.port} {'closed' if self._closed else 'open'}>"


class Transport:
    """Our identity and trust over one carrier: dial peers, listen on ports.

    Obtain one from :func:`open_transport`. Usable as an async context
    manager; :meth:`aclose` is idempotent.

    Attributes:
        identity: who we are.
        trust: who we accept.
        url: the transport URL.
        options: the :class:`TransportOptions` in force.
    """

    def __init__(
        self,
        carrier: Carrier,
        *,
        url: str,
        identity: Identity,
        trust: TrustStore,
        options: TransportOptions,
    ) -> None:
        self.url = url
        self.identity = identity
        self.trust = trust
        self.options = options
        self._carrier = carrier
        self._tls = TLSConfig(identity, trust)
        self._tls.contexts()  # build now, so the first connect pays only for its handshake
        self._listeners: dict[int, Listener] = {}
        self._closed = False
        self._streams: weakref.WeakSet[SecureStream] = weakref.WeakSet()
        self._trust_watcher: asyncio.Task[None] | None = None
        self._refused: dict[str, int] = {"timeout": 0, "handshake": 0, "broken": 0, "shed": 0}
        self._revoked = 0
        self._log_window = 0.0
        self._logged_in_window = 0
        self._quiet_in_window = 0

    @property
    def carrier(self) -> str:
        """The carrier's scheme: ``tcp``, ``memory`` or ``pilot``."""
        return self._carrier.scheme

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    @property
    def preferred_pool_size(self) -> int:
        """Connections per peer an RPC client should keep over this carrier.

        8 over ``pilot://`` (the daemon makes pipelining many calls on one
        stream slow), 1 elsewhere (one multiplexed TLS stream is fastest).
        """
        return 8 if self._carrier.scheme == "pilot" else 1

    @property
    def local(self) -> PeerInfo:
        """Our own :class:`PeerInfo`."""
        return PeerInfo.of_identity(self.identity)

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosedError("the transport is closed")

    async def listen(self, port: int) -> Listener:
        """Accept authenticated streams on virtual ``port``.

        Raises:
            TransportUsageError: ``port`` is not in 1..65535.
            PortInUseError: the port already has a listener (or the tcp endpoint is taken).
            StreamClosedError: the transport is closed.
        """
        self._check_open()
        _check_port(port)
        carrier_listener = await self._carrier.bind(port)
        listener = Listener(self, carrier_listener, port)
        self._listeners[port] = listener
        return listener

    async def connect(
        self,
        peer: str | Address | TrustedPeer | PeerInfo | DialTarget,
        port: int,
        *,
        timeout: float | None = None,  # noqa: ASYNC109  # a per-call deadline is the API
    ) -> SecureStream:
        """Open an authenticated stream to ``peer`` on virtual ``port``.

        ``peer`` is a trust-store name, a node id, a Pilot address (text or
        :class:`Address`), a :class:`TrustedPeer` or :class:`PeerInfo`. When the peer is known by
        name or key, the handshake must prove exactly that key. Safe to
        repeat (each call opens a new stream). Cancelling abandons the attempt
        and closes whatever was opened.

        Raises:
            UnknownPeerError: ``peer`` is not in the trust store (or has no
                endpoint/address for this carrier).
            TransportUsageError: ``port`` is not in 1..65535.
            ConnectTimeoutError: dial + handshake took longer than ``timeout``
                (default ``options.connect_timeout``).
            PeerUnreachableError, PortNotListeningError: the carrier could not
                open the stream.
            PeerNotTrustedError: the peer's key is not in our trust store.
            RejectedByPeerError: the peer does not trust our key.
            PeerIdentityMismatchError: a trusted peer answered, but not the one named.
            HandshakeError: any other TLS failure.
        """
        self._check_open()
        _check_port(port)
        target, expected_key, label = self._dial_target(peer, port)
        limit = self.options.connect_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                carrier_stream = await self._carrier.dial(target, port)
                stream = await client_handshake(
                    carrier_stream,
                    self._tls,
                    expected_key=expected_key,
                    expected_name=target.name,
                    target=f"{label} port {port}",
                )
        except TimeoutError as exc:
            if isinstance(exc, ConnectTimeoutError):
                raise
            raise ConnectTimeoutError(
                f"connecting to {label} port {port} took longer than {limit:g}s"
            ) from exc
        if not self._adopt(stream):
            await stream.aclose()
            raise PeerNotTrustedError(
                f"{label} was removed from the trust store while connecting",
                fingerprint=stream.peer.fingerprint,
            )
        return stream

    # -- pre-authentication accounting and trust revocation ----------------------

    def _note_refused(self, kind: str, message: str | None = None) -> None:
        """Count a refused or failed inbound connection; log it, at most so often."""
        self._refused[kind] = self._refused.get(kind, 0) + 1
        now = asyncio.get_running_loop().time()
        if now - self._log_window >= _LOG_WINDOW_SECS:
            if self._quiet_in_window:
                logger.warning(
                    "%d more inbound connections were refused or dropped before "
                    "authentication in the last %.0fs (totals: %s)",
                    self._quiet_in_window,
                    now - self._log_window,
                    ", ".join(f"{name} {count}" for name, count in self._refused.items()),
                )
            self._log_window = now
            self._logged_in_window = 0
            self._quiet_in_window = 0
        if message is not None and self._logged_in_window < _LOGS_PER_WINDOW:
            self._logged_in_window += 1
            logger.warning("%s", message)
        else:
            self._quiet_in_window += 1

    def _adopt(self, stream: SecureStream) -> bool:
        """Track an authenticated stream so trust revocation reaches it.

        Returns ``False`` if its peer was removed from the trust store meanwhile.
        """
        if not self.trust.is_trusted(stream.peer.public_key):
            return False
        self._streams.add(stream)
        if self._trust_watcher is None and not self._closed:
            # The version is read now, not when the task first runs: a removal in
            # between must still count as a change.
            self._trust_watcher = asyncio.get_running_loop().create_task(
                self._watch_trust(self.trust.version), name="pilot-transport trust watcher"
            )
        return True

    async def _watch_trust(self, version: int) -> None:
        while True:
            await asyncio.sleep(self.options.trust_check_interval)
            try:
                current = self.trust.version
            except TransportError as exc:  # pragma: no cover - the store keeps its last content
                logger.warning("cannot check the trust store: %s", exc)
                continue
            if current == version:
                continue
            version = current
            await self._revoke_untrusted()

    async def _revoke_untrusted(self) -> int:
        """Close every open stream whose peer's key is no longer trusted; returns how many."""
        keys = self.trust.public_keys()
        revoked = [
            stream
            for stream in list(self._streams)
            if not stream.closed and stream.peer.public_key not in keys
        ]
        for stream in revoked:
            self._streams.discard(stream)
            peer = stream.peer
            await stream._revoke(
                PeerRevokedError(
                    f"peer {peer.name!r} ({peer.fingerprint}) was removed from the trust "
                    "store; its connection was closed"
                )
            )
            logger.warning(
                "closed a connection of %s (%s): no longer in the trust store",
                peer.name,
                peer.fingerprint,
            )
        self._revoked += len(revoked)
        return len(revoked)

    def resolve(self, peer: str) -> PeerInfo:
        """What the trust store knows about ``peer`` (name, node id or Pilot address).

        Raises:
            UnknownPeerError: no trusted peer matches.
        """
        entry = self._lookup(peer)
        if entry is None:
            raise UnknownPeerError(f"no trusted peer matches {peer!r}; {self._trust_hint()}")
        return PeerInfo(
            node_id=entry.node_id,
            name=entry.name,
            address=entry.address,
            public_key=entry.public_key,
            fingerprint=entry.fingerprint,
        )

    def _lookup(self, peer: str, port: int | None = None) -> TrustedPeer | None:
        entry = self.trust.get(peer) or self.trust.by_node_id(peer)
        if entry is None and ":" in peer:
            # One Pilot address is one host's daemon: several trusted processes may
            # sit behind it, told apart by the port they serve on.
            with contextlib.suppress(AddressError):
                entry = self.trust.by_address(peer, port)
        return entry

    def _dial_target(
        self, peer: str | Address | TrustedPeer | PeerInfo | DialTarget, port: int | None = None
    ) -> tuple[DialTarget, bytes | None, str]:
        if isinstance(peer, Address):
            peer = str(peer)
        if isinstance(peer, DialTarget):
            label = peer.name or peer.endpoint or peer.address or peer.node_id or "peer"
            return peer, None, label
        if isinstance(peer, TrustedPeer):
            entry: TrustedPeer | None = peer
        elif isinstance(peer, PeerInfo):
            entry = self.trust.by_public_key(peer.public_key)
            if entry is None:
                raise UnknownPeerError(f"peer {peer.node_id} is not in the trust store")
        elif isinstance(peer, str):  # pyright: ignore[reportUnnecessaryIsInstance]  # runtime guard
            entry = self._lookup(peer, port)
            if entry is None:
                address = _parse_address(peer)
                if address is None:
                    raise UnknownPeerError(
                        f"unknown peer {peer!r}: not a trusted peer's name, node id or "
                        f"address; {self._trust_hint()}"
                    )
                return DialTarget(address=address), None, address
        else:
            raise TypeError(
                f"peer must be a str, TrustedPeer or PeerInfo, not {type(peer).__name__}"
            )
        assert entry is not None
        target = DialTarget(
            name=entry.name,
            node_id=entry.node_id,
            endpoint=entry.endpoint,
            address=entry.address,
        )
        return target, entry.public_key, repr(entry.name)

    def _trust_hint(self) -> str:
        path = self.trust.path
        if path is not None and not (path.exists() or path.is_symlink()):
            return (
                f"the trust file {str(path)!r} does not exist (add the peer with "
                f"`pilot-transport --trust {path} trust add NAME KEY`)"
            )
        return "add it with `pilot-transport trust add`"

    async def info(self) -> TransportInfo:
        """Facts about this transport: identity, carrier, endpoint or address, ports.

        Raises:
            DaemonError: the pilot carrier could not query its daemon.
        """
        details = dict(await self._carrier.info())
        details["refused_before_auth"] = dict(self._refused)
        details["revoked_streams"] = self._revoked
        endpoint = details.get("endpoint")
        address = details.get("address")
        return TransportInfo(
            node_id=self.identity.node_id,
            fingerprint=self.identity.fingerprint,
            public_key=self.identity.public_key_text,
            carrier=self._carrier.scheme,
            url=self.url,
            endpoint=str(endpoint) if endpoint is not None else None,
            address=str(address) if address is not None else None,
            listening_ports=tuple(sorted(self._listeners)),
            details=details,
        )

    async def aclose(self) -> None:
        """Close every listener and stream of this transport. Idempotent.

        Streams opened through it are reset: their pending reads and writes fail.
        """
        if self._closed:
            return
        self._closed = True
        watcher = self._trust_watcher
        if watcher is not None:
            watcher.cancel()
            # wait() does not re-raise the watcher's cancellation, and a
            # cancellation aimed at our caller still propagates from it.
            await asyncio.wait([watcher])
        for listener in list(self._listeners.values()):
            with contextlib.suppress(Exception):
                await listener.aclose()
        await self._carrier.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Transport {self.url} node_id={self.identity.node_id}>"


def _parse_address(text: str) -> str | None:
    try:
        return str(Address.parse(text))
    except AddressError:
        return None


def check_url(url: str) -> tuple[str, str, int]:
    """Validate a transport URL without opening anything.

    Returns ``(scheme, host_or_hub_or_path, port)`` (port is 0 unless tcp); for a
    scheme an installed carrier registered (:data:`CARRIER_ENTRY_POINT_GROUP`) the
    second item is the whole URL, which that carrier's factory parses.

    Raises:
        TransportURLError: the URL is malformed or names an unknown scheme.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "tcp":
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise TransportURLError(f"{url!r}: a tcp URL is tcp://HOST:PORT")
        try:
            port = parts.port or 0
        except ValueError as exc:
            raise TransportURLError(f"{url!r}: bad port: {exc}") from exc
        return scheme, parts.hostname or "127.0.0.1", port
    if scheme == "memory":
        hub = parts.netloc or parts.path.strip("/")
        if not hub:
            raise TransportURLError(f"{url!r}: a memory URL names a hub: memory://NAME")
        return scheme, hub, 0
    if scheme == "pilot":
        path = unquote(parts.path)
        if parts.netloc or not path:
            raise TransportURLError(f"{url!r}: a pilot URL is pilot:///absolute/path/to/pilot.sock")
        return scheme, path, 0
    if not scheme:
        raise TransportURLError(
            f"transport URL {url!r} has no scheme; use tcp://HOST:PORT, memory://HUB or "
            "pilot:///path/to/pilot.sock"
        )
    if _find_carrier_plugin(scheme) is not None:
        return scheme, url, 0
    raise TransportURLError(
        f"unknown transport scheme {scheme!r} in {url!r}; use tcp://, memory:// or pilot://"
        f"{_plugin_hint()}"
    )


CARRIER_ENTRY_POINT_GROUP = "pilot_transport.carriers"
"""Entry-point group through which other distributions add carriers.

An entry point's name is its URL scheme; its value names a factory
``factory(url: str, identity: Identity, options: TransportOptions) -> Carrier``
(``pilot-node`` registers ``pilotnode`` this way). The built-in schemes ``tcp``,
``memory`` and ``pilot`` cannot be overridden.
"""

_BUILTIN_SCHEMES = frozenset({"tcp", "memory", "pilot"})


def _carrier_plugins() -> dict[str, Any]:
    """Entry points of :data:`CARRIER_ENTRY_POINT_GROUP`, by lower-case scheme."""
    import importlib.metadata

    found: dict[str, Any] = {}
    for entry in importlib.metadata.entry_points(group=CARRIER_ENTRY_POINT_GROUP):
        name = entry.name.lower()
        if name not in _BUILTIN_SCHEMES:
            found.setdefault(name, entry)
    return found


def _find_carrier_plugin(scheme: str) -> Any | None:
    return _carrier_plugins().get(scheme.lower())


def _plugin_hint() -> str:
    names = sorted(_carrier_plugins())
    return f" or an installed carrier ({', '.join(n + '://' for n in names)})" if names else ""


def _make_plugin_carrier(
    scheme: str, url: str, identity: Identity, options: TransportOptions
) -> Carrier:
    entry = _find_carrier_plugin(scheme)
    if entry is None:
        raise TransportURLError(f"no carrier is installed for {scheme}://")
    try:
        factory = entry.load()
    except Exception as exc:
        raise TransportURLError(f"the {scheme}:// carrier could not be loaded: {exc}") from exc
    carrier = factory(url, identity, options)
    if not isinstance(carrier, Carrier):
        raise TransportURLError(
            f"the {scheme}:// carrier factory returned {type(carrier).__name__}, not a Carrier"
        )
    return carrier


def _make_carrier(url: str, identity: Identity, options: TransportOptions) -> Carrier:
    scheme, where, port = check_url(url)
    if scheme == "tcp":
        from pilot_transport._carriers.tcp import TcpCarrier

        return TcpCarrier(
            where,
            port,
            header_timeout=options.header_timeout,
            preauth_timeout=options.handshake_timeout,
            max_active_per_source=options.max_handshakes_per_source,
            max_per_source=options.max_unauthenticated_per_source,
            max_unauthenticated=options.max_unauthenticated,
        )
    if scheme == "memory":
        from pilot_transport._carriers.memory import MemoryCarrier

        return MemoryCarrier(where, identity.node_id)
    if scheme != "pilot":
        return _make_plugin_carrier(scheme, url, identity, options)
    try:
        module = importlib.import_module("pilot_transport._carriers.pilot")
    except ModuleNotFoundError as exc:
        if exc.name != "pilot_transport._carriers.pilot":
            raise
        raise TransportURLError(
            "the pilot:// carrier is not available in this installation"
        ) from exc
    carrier_class = getattr(module, "PilotCarrier", None)
    if carrier_class is None:
        raise TransportURLError("the pilot:// carrier is not available in this installation")
    carrier: Carrier = carrier_class(socket_path=where)
    return carrier


async def _open(
    url: str | None,
    identity: Identity | str | os.PathLike[str],
    trust: TrustStore | str | os.PathLike[str],
    options: TransportOptions | None,
) -> Transport:
    from pilot_transport.config import transport_url

    resolved = transport_url(url)
    if not isinstance(identity, Identity):
        identity = Identity.load(identity)
    if not isinstance(trust, TrustStore):
        trust = TrustStore.open(trust)
    options = options or TransportOptions()
    carrier = _make_carrier(resolved, identity, options)
    try:
        return Transport(
            carrier,
            url=resolved,
            identity=identity,
            trust=trust,
            options=options,
        )
    except BaseException:
        await carrier.aclose()
        raise


class _TransportOpener:
    """What :func:`open_transport` returns: ``await`` it or ``async with`` it."""

    def __init__(self, coro_args: tuple[Any, ...]) -> None:
        self._args = coro_args
        self._transport: Transport | None = None

    def __await__(self) -> Generator[Any, None, Transport]:
        return _open(*self._args).__await__()

    async def __aenter__(self) -> Transport:
        self._transport = await _open(*self._args)
        return self._transport

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._transport is not None:
            await self._transport.aclose()


def open_transport(
    url: str | None = None,
    *,
    identity: Identity | str | os.PathLike[str],
    trust: TrustStore | str | os.PathLike[str],
    options: TransportOptions | None = None,
) -> _TransportOpener:
    """Open a transport on the carrier named by ``url``.

    Use ``transport = await open_transport(...)`` (then ``await
    transport.aclose()``), or ``async with open_transport(...) as transport``.

    Args:
        url: ``tcp://HOST:PORT`` (port 0 picks a free port), ``memory://HUB`` or
            ``pilot:///path/to/pilot.sock``. ``None`` reads ``PILOT_TRANSPORT``,
            then defaults to ``tcp://127.0.0.1:0``.
        identity: an :class:`Identity` or the path of its key file.
        trust: a :class:`TrustStore` or the path of its file.
        options: a :class:`TransportOptions`; defaults are safe.

    Raises:
        TransportURLError: the URL is malformed or names an unavailable carrier.
        IdentityError, InsecureKeyFileError: the key file cannot be used.
        TrustStoreError: the trust file is malformed.
    """
    return _TransportOpener((url, identity, trust, options))
