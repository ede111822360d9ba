"""The error tree of ``pilot_node``: every error it raises derives from :class:`PilotNodeError`."""

from __future__ import annotations

__all__ = [
    "IdentityError",
    "IncompatiblePeerError",
    "NodeClosedError",
    "PeerUnreachableError",
    "PilotNodeError",
    "PilotTimeoutError",
    "RegistryError",
    "RegistryRefusedError",
    "RegistryUnavailableError",
    "TunnelError",
]


class PilotNodeError(Exception):
    """Root of every error raised by ``pilot_node``."""


class IdentityError(PilotNodeError):
    """The node's identity file is missing, unreadable, malformed or too widely readable."""


class RegistryError(PilotNodeError):
    """A registry call failed."""


class RegistryUnavailableError(RegistryError):
    """The registry could not be reached, or the connection broke mid-call."""


class RegistryRefusedError(RegistryError):
    """The registry answered with an error (unknown node, bad signature, not trusted...).

    Attributes:
        message: the registry's own error text.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"registry refused: {message}")
        self.message = message


class TunnelError(PilotNodeError):
    """A tunnel frame could not be built, sent or accepted."""


class IncompatiblePeerError(TunnelError):
    """The peer speaks a tunnel dialect this node does not (for example an older daemon).

    Attributes:
        node_id: the peer's node id.
    """

    def __init__(self, node_id: int, detail: str) -> None:
        super().__init__(f"peer node {node_id} is incompatible: {detail}")
        self.node_id = node_id


class PeerUnreachableError(PilotNodeError):
    """No tunnel to the peer could be established (unknown, private and untrusted, or silent)."""


class PilotTimeoutError(PilotNodeError, TimeoutError):
    """An operation on the Pilot network did not finish within its deadline."""


class NodeClosedError(PilotNodeError):
    """The node is not running (not started yet, or closed)."""
