"""What we know about an authenticated peer."""

from __future__ import annotations

from dataclasses import dataclass, field

from pilot_transport._identity import Identity, fingerprint_of, node_id_of

__all__ = ["PeerInfo"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerInfo:
    """One end of a :class:`SecureStream`, as authenticated by the TLS handshake.

    Attributes:
        node_id: stable id derived from the peer's public key.
        name: the peer's name in *our* trust store (``None`` for ourselves).
        address: the peer's Pilot address if known (trust store entry or carrier).
        public_key: the raw 32-byte Ed25519 public key proven in the handshake.
        fingerprint: ``SHA256:<base64>`` of ``public_key``.
    """

    node_id: str
    name: str | None
    address: str | None
    public_key: bytes = field(repr=False)
    fingerprint: str

    @classmethod
    def from_public_key(
        cls, public_key: bytes, *, name: str | None = None, address: str | None = None
    ) -> PeerInfo:
        """Build the info of the peer holding ``public_key``."""
        return cls(
            node_id=node_id_of(public_key),
            name=name,
            address=address,
            public_key=public_key,
            fingerprint=fingerprint_of(public_key),
        )

    @classmethod
    def of_identity(cls, identity: Identity, *, address: str | None = None) -> PeerInfo:
        """Our own info, for ``stream.local``."""
        return cls.from_public_key(identity.public_key, address=address)
