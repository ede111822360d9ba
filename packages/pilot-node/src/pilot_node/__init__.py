"""A Pilot Protocol network node in pure Python.

Start a :class:`Node` (it registers with the network's registry and keeps its
tunnels), then open byte streams to ``(address, port)`` with
:func:`open_connection` / :func:`open_stream` or accept them with
:func:`start_server`; datagrams go through :meth:`Node.send_datagram`. The
``pilotnode://`` carrier for pilot-transport lives in :mod:`pilot_node.carrier`
(install ``pilot-node[transport]``).
"""

from ._api import (
    ECHO_PORT,
    PilotServer,
    PilotStreamReader,
    PilotStreamWriter,
    open_connection,
    open_stream,
    serve_echo,
    start_server,
)
from ._identity import NodeIdentity
from ._node import Datagram, DatagramHandler, Node, NodeConfig
from ._packet import Address
from ._registry import HandshakeInbox, LookupResult
from ._streams import PilotListener, PilotStream, StreamConfig
from .errors import (
    AddressFormatError,
    DialTimeoutError,
    IdentityError,
    IncompatiblePeerError,
    NodeClosedError,
    PacketError,
    PeerUnreachableError,
    PilotNodeError,
    PilotTimeoutError,
    RegistryError,
    RegistryRefusedError,
    RegistryUnavailableError,
    StreamClosedError,
    StreamError,
    StreamRefusedError,
    StreamResetError,
    StreamTruncatedError,
    TunnelError,
)

__all__: list[str] = [
    "ECHO_PORT",
    "Address",
    "AddressFormatError",
    "Datagram",
    "DatagramHandler",
    "DialTimeoutError",
    "HandshakeInbox",
    "IdentityError",
    "IncompatiblePeerError",
    "LookupResult",
    "Node",
    "NodeClosedError",
    "NodeConfig",
    "NodeIdentity",
    "PacketError",
    "PeerUnreachableError",
    "PilotListener",
    "PilotNodeError",
    "PilotServer",
    "PilotStream",
    "PilotStreamReader",
    "PilotStreamWriter",
    "PilotTimeoutError",
    "RegistryError",
    "RegistryRefusedError",
    "RegistryUnavailableError",
    "StreamClosedError",
    "StreamConfig",
    "StreamError",
    "StreamRefusedError",
    "StreamResetError",
    "StreamTruncatedError",
    "TunnelError",
    "open_connection",
    "open_stream",
    "serve_echo",
    "start_server",
]
