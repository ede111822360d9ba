"""The error tree of ``pilot_node``: every error it raises derives from :class:`PilotNodeError`."""

from __future__ import annotations

__all__ = [
    "AddressFormatError",
    "DialTimeoutError",
    "IdentityError",
    "IncompatiblePeerError",
    "NodeClosedError",
    "PacketError",
    "PeerUnreachableError",
    "PilotNodeError",
    "PilotTimeoutError",
    "RegistryError",
    "RegistryRefusedError",
    "RegistryUnavailableError",
    "StreamClosedError",
    "StreamError",
    "StreamRefusedError",
    "StreamResetError",
    "StreamTruncatedError",
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


class PacketError(PilotNodeError, ValueError):
    """A packet's bytes are malformed: too short, truncated, bad checksum, bad field."""


class AddressFormatError(PilotNodeError, ValueError):
    """A Pilot address in text or bytes is malformed or out of range."""


class StreamError(PilotNodeError, ConnectionError):
    """A stream could not be opened or failed."""


class StreamRefusedError(StreamError):
    """The peer answered our SYN with RST (nothing listens on that port)."""


class StreamResetError(StreamError):
    """The connection broke: the peer reset it, or stopped acknowledging."""


class StreamTruncatedError(StreamError):
    """The stream ended with data missing: bytes the peer sent before its end never arrived,
    or bytes we wrote were not acknowledged before the close had to give up."""


class StreamClosedError(StreamError):
    """The stream was used after it was closed locally (or written after ``write_eof``)."""


class DialTimeoutError(StreamError, PilotTimeoutError):
    """The peer did not answer our SYN."""
