"""A Pilot Protocol network node in pure Python."""

from ._identity import NodeIdentity
from ._node import Datagram, DatagramHandler, Node, NodeConfig
from ._registry import HandshakeInbox, LookupResult
from .errors import (
    IdentityError,
    IncompatiblePeerError,
    NodeClosedError,
    PeerUnreachableError,
    PilotNodeError,
    PilotTimeoutError,
    RegistryError,
    RegistryRefusedError,
    RegistryUnavailableError,
    TunnelError,
)

__all__: list[str] = [
    # the node (pilot_node._node, _identity, _registry, errors)
    "Datagram",
    "DatagramHandler",
    "HandshakeInbox",
    "IdentityError",
    "IncompatiblePeerError",
    "LookupResult",
    "Node",
    "NodeClosedError",
    "NodeConfig",
    "NodeIdentity",
    "PeerUnreachableError",
    "PilotNodeError",
    "PilotTimeoutError",
    "RegistryError",
    "RegistryRefusedError",
    "RegistryUnavailableError",
    "TunnelError",
]
