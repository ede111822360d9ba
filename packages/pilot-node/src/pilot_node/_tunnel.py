"""The encrypted UDP tunnel between Pilot nodes, as the ``pilotprotocol`` 1.18.0 daemon speaks it.

Sans-IO: frame codecs, key derivation, the AEAD and the replay window. No sockets, no clocks
(callers pass ``now``).

Wire facts (from the protocol documentation and observed 1.18.0 traffic; all integers
big-endian):

* Every tunnel datagram starts with a 4-byte magic:

  - ``PILA`` authenticated key exchange, 136 bytes:
    ``PILA | u32 sender node id | X25519 public key (32) | Ed25519 public key (32) |
    Ed25519 signature (64)``. The signature covers ``b"auth" | u32 node id | X25519 key``
    and is checked against the key the registry holds for that node id.
  - ``PILK`` unauthenticated key exchange, 40 bytes: ``PILK | u32 node id | X25519 key``.
    The 1.18.0 daemon refuses it from any node that has a registered key; so do we.
  - ``PILS`` encrypted packet: ``PILS | u32 sender node id | nonce (12) | ciphertext + tag``.
    The nonce is a random 4-byte prefix (per key) followed by a u64 send counter that
    starts at 1. The AEAD is AES-256-GCM with the 4-byte sender node id as associated data.
  - ``PILT`` plaintext packet and ``PILP`` NAT punch: never accepted as traffic here (a
    plaintext packet carries no proof of its sender).

* The AEAD key is HKDF-SHA256 (empty salt, info ``pilot-tunnel-v1``, 32 bytes) of the X25519
  shared secret. Each side announces an ephemeral X25519 key per run: a peer whose key
  changed has restarted, and both sides install the new key and reply with their own.

* The receive replay window covers the last 256 counters above the highest seen; it is only
  advanced by a frame that authenticated.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ._identity import NodeIdentity, verify_signature
from .errors import TunnelError

__all__ = [
    "AUTH_FRAME_SIZE",
    "HKDF_INFO",
    "MAGIC_AUTH",
    "MAGIC_KEYEX",
    "MAGIC_PLAIN",
    "MAGIC_PUNCH",
    "MAGIC_SECURE",
    "REPLAY_WINDOW",
    "AuthFrame",
    "FrameError",
    "KeyExchange",
    "PeerCrypto",
    "ReplayWindow",
    "SecureFrame",
    "UnauthFrame",
    "auth_challenge",
    "build_auth_frame",
    "derive_key",
    "parse_frame",
]

MAGIC_PLAIN: Final = b"PILT"
MAGIC_SECURE: Final = b"PILS"
MAGIC_KEYEX: Final = b"PILK"
MAGIC_AUTH: Final = b"PILA"
MAGIC_PUNCH: Final = b"PILP"
HKDF_INFO: Final = b"pilot-tunnel-v1"
AUTH_FRAME_SIZE: Final = 136
REPLAY_WINDOW: Final = 256
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class FrameError(TunnelError):
    """A tunnel datagram is malformed or fails authentication."""


@dataclass(frozen=True, slots=True)
class AuthFrame:
    """A ``PILA`` key announcement."""

    node_id: int
    x25519: bytes
    ed25519: bytes
    signature: bytes

    def verify(self, registered_key: bytes) -> bool:
        """Whether the frame is signed by ``registered_key`` and names that key."""
        return self.ed25519 == registered_key and verify_signature(
            registered_key, auth_challenge(self.node_id, self.x25519), self.signature
        )


@dataclass(frozen=True, slots=True)
class UnauthFrame:
    """A ``PILK`` key announcement (no signature)."""

    node_id: int
    x25519: bytes


@dataclass(frozen=True, slots=True)
class SecureFrame:
    """A ``PILS`` encrypted packet, not yet opened."""

    node_id: int
    nonce: bytes
    ciphertext: bytes

    @property
    def counter(self) -> int:
        """The sender's u64 send counter carried in the nonce."""
        return _U64.unpack_from(self.nonce, 4)[0]


def parse_frame(data: bytes) -> AuthFrame | UnauthFrame | SecureFrame | None:
    """Classify one tunnel datagram; ``None`` for plaintext, punch and unknown magics.

    Raises:
        FrameError: a known magic with a malformed body.
    """
    magic = data[:4]
    if magic == MAGIC_SECURE:
        if len(data) < 4 + 4 + _NONCE_SIZE + _TAG_SIZE:
            raise FrameError(f"PILS frame too short: {len(data)} bytes")
        (node_id,) = _U32.unpack_from(data, 4)
        return SecureFrame(node_id, data[8:20], data[20:])
    if magic == MAGIC_AUTH:
        if len(data) < AUTH_FRAME_SIZE:
            raise FrameError(f"PILA frame too short: {len(data)} bytes")
        (node_id,) = _U32.unpack_from(data, 4)
        return AuthFrame(node_id, data[8:40], data[40:72], data[72:136])
    if magic == MAGIC_KEYEX:
        if len(data) < 40:
            raise FrameError(f"PILK frame too short: {len(data)} bytes")
        (node_id,) = _U32.unpack_from(data, 4)
        return UnauthFrame(node_id, data[8:40])
    return None


def auth_challenge(node_id: int, x25519: bytes) -> bytes:
    """The bytes a ``PILA`` signature covers."""
    return b"auth" + _U32.pack(node_id) + x25519


def build_auth_frame(identity: NodeIdentity, node_id: int, x25519: bytes) -> bytes:
    """Our signed ``PILA`` announcing ``x25519`` for ``node_id``."""
    if len(x25519) != 32:
        raise TunnelError("an X25519 public key is 32 bytes")
    signature = identity.sign(auth_challenge(node_id, x25519))
    return MAGIC_AUTH + _U32.pack(node_id) + x25519 + identity.public_key + signature


def derive_key(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The 32-byte AES-256-GCM key shared with the owner of ``peer_public``.

    Raises:
        TunnelError: ``peer_public`` is not a usable X25519 key.
    """
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise TunnelError(f"bad X25519 key: {exc}") from exc
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(shared)


class KeyExchange:
    """This node's ephemeral X25519 key for one run."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self.private = private or X25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def crypto_for(self, peer_x25519: bytes, now: float) -> PeerCrypto:
        """A fresh :class:`PeerCrypto` for a peer that announced ``peer_x25519``."""
        return PeerCrypto(derive_key(self.private, peer_x25519), peer_x25519, created_at=now)


@dataclass(slots=True)
class ReplayWindow:
    """Accepts each counter at most once, within :data:`REPLAY_WINDOW` of the highest seen."""

    highest: int = 0
    _bits: int = 0

    def would_accept(self, counter: int) -> bool:
        """Whether ``counter`` is new (no state change)."""
        if counter <= 0:
            return False
        if counter > self.highest:
            return True
        offset = self.highest - counter
        if offset >= REPLAY_WINDOW:
            return False
        return not (self._bits >> offset) & 1

    def outside(self, counter: int) -> bool:
        """Whether ``counter`` is older than the window (a reset sender, or a very late frame)."""
        return self.highest - counter >= REPLAY_WINDOW

    def record(self, counter: int) -> None:
        """Mark ``counter`` seen (call only after the frame authenticated)."""
        if counter > self.highest:
            shift = counter - self.highest
            self._bits = ((self._bits << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.highest = counter
        else:
            self._bits |= 1 << (self.highest - counter)


@dataclass(slots=True)
class PeerCrypto:
    """The AEAD state shared with one peer: send counter, nonce prefix, replay window."""

    key: bytes = field(repr=False)
    peer_x25519: bytes
    created_at: float = 0.0
    nonce_prefix: bytes = field(default_factory=lambda: os.urandom(4))
    send_counter: int = 0
    window: ReplayWindow = field(default_factory=ReplayWindow)
    failures: int = 0
    last_ok: float = 0.0
    _aead: AESGCM | None = field(default=None, repr=False)

    @property
    def aead(self) -> AESGCM:
        if self._aead is None:
            self._aead = AESGCM(self.key)
        return self._aead

    def seal(self, local_node_id: int, plaintext: bytes) -> bytes:
        """A ``PILS`` frame carrying ``plaintext`` from ``local_node_id``."""
        self.send_counter += 1
        nonce = self.nonce_prefix + _U64.pack(self.send_counter)
        sender = _U32.pack(local_node_id)
        return MAGIC_SECURE + sender + nonce + self.aead.encrypt(nonce, plaintext, sender)

    def open(self, frame: SecureFrame, now: float) -> bytes:
        """Authenticate and decrypt ``frame``; a replayed or forged frame raises.

        Raises:
            FrameError: replayed, older than the window, or failed authentication
                (``failures`` counts consecutive failures; a success resets it).
        """
        counter = frame.counter
        if not self.window.would_accept(counter):
            self.failures += 1
            kind = "older than the replay window" if self.window.outside(counter) else "a replay"
            raise FrameError(f"frame counter {counter} from node {frame.node_id} is {kind}")
        try:
            plain = self.aead.decrypt(frame.nonce, frame.ciphertext, _U32.pack(frame.node_id))
        except InvalidTag:
            self.failures += 1
            raise FrameError(f"frame from node {frame.node_id} failed authentication") from None
        self.window.record(counter)
        self.failures = 0
        self.last_ok = now
        return plain

    def older_dialect(self, frame: SecureFrame) -> str:
        """Why ``frame`` (which failed :meth:`open`) looks like an older peer's, or ``""``.

        Older builds sealed frames without the sender id as associated data; such a frame
        opens under the same key with no associated data.
        """
        try:
            self.aead.decrypt(frame.nonce, frame.ciphertext, None)
        except InvalidTag:
            return ""
        return (
            "its frames are sealed without the sender node id as associated data (an older "
            "tunnel dialect than pilotprotocol 1.18.0's); upgrade the peer"
        )
