"""Identities, trust, and mutually authenticated TLS 1.3 byte streams between peers.

>>> async with open_transport("tcp://127.0.0.1:0", identity=key_path, trust=trust_path) as t:
...     stream = await t.connect("worker-a", 5000)

See the package README for carriers, file formats and the security model.
"""

from pilot_transport._address import Address, SocketAddress
from pilot_transport._identity import Identity
from pilot_transport._peer import PeerInfo
from pilot_transport._tls import SecureStream
from pilot_transport._transport import (
    Listener,
    Transport,
    TransportInfo,
    TransportOptions,
    open_transport,
)
from pilot_transport._trust import TrustedPeer, TrustStore

__all__ = [
    "Address",
    "Identity",
    "Listener",
    "PeerInfo",
    "SecureStream",
    "SocketAddress",
    "Transport",
    "TransportInfo",
    "TransportOptions",
    "TrustStore",
    "TrustedPeer",
    "open_transport",
]

__version__ = "0.1.0"
