"""Errors raised by pilot-transport.

Every exception this package raises derives from :class:`TransportError`.
``ssl``, ``OSError`` and ``asyncio`` errors are translated at the boundary and
chained with ``from``; none of them reaches a caller unwrapped.

Two families are kept apart: *usage* errors (you called the API wrong or
configured something wrong; retrying will not help) and *network/peer* errors
(the peer, the daemon or the network failed; a retry may help)::

    TransportError
    ├── TransportUsageError
    │   ├── AddressError (ValueError)          malformed Pilot address text or bytes
    │   ├── TransportURLError (ValueError)     bad or unsupported transport URL
    │   ├── IdentityError                      key file missing, malformed or too open
    │   │   ├── InsecureKeyFileError           key file readable by group/others
    │   │   └── IdentityNotFoundError          a key file the user named does not exist
    │   ├── TrustStoreError                    trust file malformed, duplicate name, ...
    │   │   └── TrustFileNotFoundError         a trust file the user named does not exist
    │   ├── UnknownPeerError (LookupError)     a peer name with no trust/address-book entry
    │   └── PortInUseError                     a virtual port already has a listener
    └── TransportNetworkError (ConnectionError)
        ├── ConnectError                       could not open a stream to the peer
        │   ├── ConnectTimeoutError (TimeoutError)
        │   ├── PeerUnreachableError           refused, no route, daemon dial error
        │   └── PortNotListeningError          the peer has no listener on that port
        ├── HandshakeError                     TLS handshake failed
        │   ├── PeerNotTrustedError            the peer's key is not in our TrustStore
        │   ├── RejectedByPeerError            the peer does not trust our key
        │   └── PeerIdentityMismatchError      trusted, but not the peer we dialled
        ├── StreamError                        an established stream failed
        │   ├── StreamClosedError              used after aclose() / write after EOF
        │   └── StreamResetError               the connection broke under us
        │       └── PeerRevokedError           the peer's key left our trust store: closed
        ├── ListenerClosedError                accept() on a closed listener
        └── DaemonError                        the Pilot daemon refused or vanished
            └── DaemonUnavailableError         cannot reach the daemon's socket
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "ConnectError",
    "ConnectTimeoutError",
    "DaemonError",
    "DaemonUnavailableError",
    "HandshakeError",
    "IdentityError",
    "IdentityNotFoundError",
    "InsecureKeyFileError",
    "ListenerClosedError",
    "PeerIdentityMismatchError",
    "PeerNotTrustedError",
    "PeerRevokedError",
    "PeerUnreachableError",
    "PortInUseError",
    "PortNotListeningError",
    "RejectedByPeerError",
    "StreamClosedError",
    "StreamError",
    "StreamResetError",
    "TransportError",
    "TransportNetworkError",
    "TransportURLError",
    "TransportUsageError",
    "TrustFileNotFoundError",
    "TrustStoreError",
    "UnknownPeerError",
]


class TransportError(Exception):
    """Root of every error raised by pilot-transport."""


class TransportUsageError(TransportError):
    """The API was called or configured wrongly; retrying will not help."""


class AddressError(TransportUsageError, ValueError):
    """Malformed Pilot address text or bytes; the message names the bad part."""


class TransportURLError(TransportUsageError, ValueError):
    """A transport URL that is malformed or names an unknown carrier."""


class IdentityError(TransportUsageError):
    """An identity key file is missing, malformed or unusable."""


class InsecureKeyFileError(IdentityError):
    """A key file is readable or writable by group or others (as ssh refuses)."""


class TrustStoreError(TransportUsageError):
    """A trust store file is malformed or an edit to it is invalid."""


class UnknownPeerError(TransportUsageError, LookupError):
    """A peer was named that neither the trust store nor the address book knows."""


class PortInUseError(TransportUsageError):
    """A listener already exists on that (virtual) port."""


class TransportNetworkError(TransportError, ConnectionError):
    """The peer, the daemon or the network failed; a retry may succeed."""


class ConnectError(TransportNetworkError):
    """A stream to the peer could not be opened."""


class ConnectTimeoutError(ConnectError, TimeoutError):
    """Opening a stream (carrier dial plus handshake) took longer than allowed."""


class PeerUnreachableError(ConnectError):
    """The carrier could not reach the peer (refused, no route, dial error)."""


class PortNotListeningError(ConnectError):
    """The peer is reachable but nothing listens on the requested port."""


class HandshakeError(TransportNetworkError):
    """The TLS 1.3 mutual-authentication handshake failed."""

    def __init__(self, message: str, *, fingerprint: str | None = None) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint
        """Fingerprint of the key involved (the peer's, or ours when the peer rejected us)."""


class PeerNotTrustedError(HandshakeError):
    """The peer's public key is not in our TrustStore; ``fingerprint`` is the peer's."""


class RejectedByPeerError(HandshakeError):
    """The peer does not trust our key; ``fingerprint`` is ours, to give its operator."""


class PeerIdentityMismatchError(HandshakeError):
    """The peer is trusted but is not the peer that was dialled."""


class StreamError(TransportNetworkError):
    """An established stream failed."""


class StreamClosedError(StreamError):
    """The stream was closed locally (or written after ``write_eof``)."""


class StreamResetError(StreamError):
    """The connection under the stream broke (reset, daemon restart, peer died)."""


class PeerRevokedError(StreamResetError):
    """The peer's key was removed from our trust store, so its open streams were closed.

    Raised by reads and writes of every stream authenticated as that key (on
    both the accepting and the dialling side) once the transport notices the
    trust store changed (within ``TransportOptions.trust_check_interval``).
    """


class ListenerClosedError(TransportNetworkError):
    """``accept()`` was called on, or was waiting on, a listener that was closed."""


class DaemonError(TransportNetworkError):
    """The Pilot daemon answered with an error, or broke its protocol."""


class DaemonUnavailableError(DaemonError):
    """The Pilot daemon's socket cannot be reached (not running, wrong path)."""


class IdentityNotFoundError(IdentityError):
    """A key file that was named (argument or ``PILOT_IDENTITY``) does not exist.

    Nothing is created in its place: a typo must not become a new identity.
    ``path`` is the missing file.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class TrustFileNotFoundError(TrustStoreError):
    """A trust file that was named (argument or ``PILOT_TRUST``) does not exist.

    ``path`` is the missing file.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path
