"""The ``pilotnode://`` carrier for pilot-transport: Pilot streams from an in-process node.

pilot-transport finds this carrier through the ``pilot_transport.carriers`` entry
point that pilot-node declares, so neither distribution depends on the other: this is
the only module of ``pilot_node`` that imports ``pilot_transport``, and only when it is
imported itself (pilot-transport must be installed to use it: the ``transport`` extra,
``pip install "pilot-node[transport]"``). The carrier only moves
bytes: TLS 1.3 with pinned identities runs on top of every stream, as over any carrier
(a Pilot address is not an authentication).

URL::

    pilotnode://REGISTRY_HOST:PORT?beacon=HOST:PORT&listen=HOST:PORT&hostname=NAME
        &identity=/path/to/node.key&public=1

* ``REGISTRY_HOST:PORT``: the registry (required).
* ``beacon``: the beacon (endpoint discovery, hole punching, relay); none by default.
* ``listen``: the node's UDP socket, ``127.0.0.1:0`` by default.
* ``hostname``: register this hostname.
* ``identity``: the node's own key file (created 0600 when missing). Without it the
  node signs with the transport identity's Ed25519 key, so its Pilot address stays the
  same across runs with the same identity.
* ``public``: ``1`` (default) or ``0``.

Peers are dialled by the ``address`` of their trust-store entry (a Pilot address).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pilot_transport import Address as TransportAddress
from pilot_transport import Identity, SocketAddress, TransportOptions
from pilot_transport.carriers import Carrier, CarrierListener, CarrierStream, DialTarget
from pilot_transport.errors import (
    ConnectError,
    ConnectTimeoutError,
    ListenerClosedError,
    PeerUnreachableError,
    PortInUseError,
    PortNotListeningError,
    StreamClosedError,
    StreamResetError,
    TransportURLError,
)

from ._api import open_stream
from ._identity import NodeIdentity
from ._node import Node, NodeConfig
from ._packet import Address, AddressFormatError
from ._streams import (
    PilotListener,
    PilotStream,
    StreamError,
    StreamLayer,
    StreamRefusedError,
)
from ._streams import StreamClosedError as NodeStreamClosedError
from .errors import PilotNodeError, PilotTimeoutError

__all__ = ["PilotNodeCarrier", "carrier_factory", "parse_url"]


def parse_url(url: str) -> NodeConfig:
    """The :class:`NodeConfig` a ``pilotnode://`` URL describes.

    Raises:
        TransportURLError: the URL is malformed.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "pilotnode":
        raise TransportURLError(f"{url!r} is not a pilotnode:// URL")
    if not parts.hostname or parts.port is None or parts.path not in ("", "/"):
        raise TransportURLError(
            f"{url!r}: a pilotnode URL is pilotnode://REGISTRY_HOST:PORT[?beacon=...&listen=...]"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query, strict_parsing=False).items()}
    unknown = set(query) - {"beacon", "listen", "hostname", "identity", "public"}
    if unknown:
        raise TransportURLError(f"{url!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
    public = query.get("public", "1")
    if public not in ("0", "1"):
        raise TransportURLError(f"{url!r}: public must be 0 or 1")
    return NodeConfig(
        registry=f"{parts.hostname}:{parts.port}",
        beacon=query.get("beacon", ""),
        listen=query.get("listen", "127.0.0.1:0"),
        hostname=query.get("hostname", ""),
        identity_path=query.get("identity"),
        public=public == "1",
    )


def carrier_factory(url: str, identity: Identity, options: TransportOptions) -> PilotNodeCarrier:
    """The entry point pilot-transport calls for ``pilotnode://`` URLs.

    Raises:
        TransportURLError: the URL is malformed.
    """
    config = parse_url(url)
    node_identity = None if config.identity_path else NodeIdentity(identity.private_key)
    return PilotNodeCarrier(config, identity=node_identity)


def _map_error(exc: BaseException, what: str) -> Exception:
    if isinstance(exc, StreamRefusedError):
        return PortNotListeningError(f"{what}: {exc}")
    if isinstance(exc, (PilotTimeoutError, TimeoutError)):
        return ConnectTimeoutError(f"{what}: {exc}")
    if isinstance(exc, NodeStreamClosedError):
        return StreamClosedError(str(exc))
    if isinstance(exc, StreamError):
        return StreamResetError(f"{what}: {exc}")
    return PeerUnreachableError(f"{what}: {exc}")


class _Stream(CarrierStream):
    def __init__(self, stream: PilotStream) -> None:
        self._stream = stream
        self.remote = SocketAddress(
            TransportAddress.parse(str(stream.remote_address)), stream.remote_port
        )
        self.remote_hint = str(self.remote)
        self._eof_sent = False
        self._closed = False
        self._writing = False  # a write() waits for room: try_write must not overtake it

    async def read(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise StreamClosedError("read on a closed stream")
        try:
            return await self._stream.read(max_bytes)
        except NodeStreamClosedError as exc:
            raise StreamClosedError(str(exc)) from exc
        except StreamError as exc:
            raise StreamResetError(str(exc)) from exc

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self._eof_sent:
            raise StreamClosedError("write after close or write_eof")
        if not data:
            return
        self._writing = True
        try:
            await self._stream.write(data)
        except NodeStreamClosedError as exc:
            raise StreamClosedError(str(exc)) from exc
        except StreamError as exc:
            raise StreamResetError(str(exc)) from exc
        finally:
            self._writing = False

    def write_room(self) -> int:
        """Bytes :meth:`try_write` takes now: the stream's free send buffer.

        0 while data is in flight or a :meth:`write` waits for room, and once the
        stream is closed, half-closed or broken.
        """
        if self._closed or self._eof_sent or self._writing:
            return 0
        conn = self._stream.connection
        if conn.snd_nxt != conn.snd_una:
            # Data in flight: concurrent callers are about; pilot-transport's caller
            # then writes through its writer task, which gathers what they queued in
            # this loop iteration into one TLS record.
            return 0
        return self._stream.write_room()

    def try_write(self, data: bytes) -> bool:
        """Queue all of ``data`` on the stream now if :meth:`write_room` allows it.

        The segments leave before this returns, so a small write costs no
        event-loop iteration.
        """
        if len(data) > self.write_room():
            return False
        return self._stream.try_write(data)

    async def write_eof(self) -> None:
        if self._closed or self._eof_sent:
            return
        self._eof_sent = True
        try:
            await self._stream.write_eof()
        except StreamError as exc:
            raise StreamResetError(str(exc)) from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Waits (bounded) until the peer acknowledged what we wrote; a close that had to
        # give up has already reset the stream, so the peer's reader sees an error.
        with contextlib.suppress(StreamError):
            await self._stream.aclose()


class _Listener(CarrierListener):
    def __init__(self, listener: PilotListener) -> None:
        self._listener = listener
        self.port = listener.port

    async def accept(self) -> CarrierStream:
        try:
            return _Stream(await self._listener.accept())
        except NodeStreamClosedError as exc:
            raise ListenerClosedError(str(exc)) from exc

    async def aclose(self) -> None:
        await self._listener.aclose()


class PilotNodeCarrier(Carrier):
    """pilot-transport's carrier over an in-process Pilot node (started on first use)."""

    scheme = "pilotnode"

    def __init__(self, config: NodeConfig, *, identity: NodeIdentity | None = None) -> None:
        self._config = config
        self._identity = identity
        self._node: Node | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def node(self) -> Node:
        """The running node (started on the first call).

        Raises:
            ConnectError: the node could not join its network (registry unreachable...).
        """
        async with self._lock:
            if self._closed:
                raise StreamClosedError("the carrier is closed")
            if self._node is None:
                node = Node(self._config, identity=self._identity)
                try:
                    await node.start()
                except (PilotNodeError, OSError) as exc:
                    raise ConnectError(f"the Pilot node could not start: {exc}") from exc
                self._node = node
            return self._node

    async def dial(self, target: DialTarget, port: int) -> CarrierStream:
        if target.address is None:
            raise PeerUnreachableError(
                f"pilotnode:// dials Pilot addresses; the peer {target.name or target.node_id!r} "
                "has none in the trust store"
            )
        try:
            address = Address.parse(target.address)
        except AddressFormatError as exc:
            raise PeerUnreachableError(str(exc)) from exc
        node = await self.node()
        what = f"{address}:{port}"
        try:
            stream = await open_stream(node, address, port, timeout=None)
        except (PilotNodeError, TimeoutError) as exc:
            raise _map_error(exc, what) from exc
        return _Stream(stream)

    async def bind(self, port: int) -> CarrierListener:
        node = await self.node()
        layer = node.stream_layer
        if not isinstance(layer, StreamLayer):
            raise ConnectError("the Pilot node has no stream layer")
        try:
            return _Listener(layer.listen(port))
        except NodeStreamClosedError as exc:
            raise ListenerClosedError(str(exc)) from exc
        except StreamError as exc:
            raise PortInUseError(str(exc)) from exc

    async def info(self) -> dict[str, Any]:
        node = await self.node()
        return {
            "carrier": self.scheme,
            "address": str(node.address),
            "node_id": node.node_id,
            "udp_endpoint": f"{node.endpoint[0]}:{node.endpoint[1]}",
            "fingerprint": node.fingerprint,
        }

    async def aclose(self) -> None:
        async with self._lock:
            self._closed = True
            node, self._node = self._node, None
        if node is not None:
            await node.aclose()
