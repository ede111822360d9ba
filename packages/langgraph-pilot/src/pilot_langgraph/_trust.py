"""ensure_trust: make peers trust each other in one call, on any carrier."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pilot_langgraph.errors import PilotUsageError

if TYPE_CHECKING:
    from pilot_transport import Identity, TrustStore

__all__ = ["PeerSpec", "ensure_trust"]


@dataclass(frozen=True, kw_only=True)
class PeerSpec:
    """One side of a pairing.

    Attributes:
        name: The name the *other* peers will know this one by (and dial it with).
        identity: Its identity, or the path of its key file (created, mode 0600,
            when missing).
        trust: Its trust store, or the path of its trust file (created when missing).
        endpoint: ``host:port`` of its ``tcp://`` listener, if it has one.
        address: Its Pilot address (``N:XXXX.XXXX.XXXX``) when it is on ``pilot://``.
    """

    name: str
    identity: Identity | str | os.PathLike[str]
    trust: TrustStore | str | os.PathLike[str]
    endpoint: str | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise PilotUsageError("PeerSpec.name must be non-empty")


def _load(spec: PeerSpec) -> tuple[Identity, TrustStore]:
    from pilot_transport import Identity, TrustStore

    identity: Any = spec.identity
    if not isinstance(identity, Identity):
        path = Path(identity).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = Identity.load_or_create(path)
    trust: Any = spec.trust
    if not isinstance(trust, TrustStore):
        path = Path(trust).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        trust = TrustStore.open(path)
    return identity, trust


def ensure_trust(*peers: PeerSpec) -> None:
    """Make every listed peer trust every other one (and know how to reach it).

    ``ensure_trust(a, b)`` pairs two peers; more peers are paired all-to-all.
    Entries are written with each peer's public key plus its endpoint/address,
    so it works the same on ``tcp://``, ``memory://`` and ``pilot://``. Safe to
    repeat: an existing, identical entry is left alone; a changed endpoint or
    key under the same name is replaced; an old entry holding the same key
    under another name is renamed.

    Raises:
        PilotUsageError: fewer than two peers, or two peers with the same name.
        pilot_transport.errors.TrustStoreError: a bad name, endpoint or address
            (raised before any file is created).
        pilot_transport.errors.TransportError: a key or trust file is unusable.
    """
    from pilot_transport import TrustedPeer

    if len(peers) < 2:
        raise PilotUsageError("ensure_trust needs at least two peers")
    names = [p.name for p in peers]
    if len(set(names)) != len(names):
        raise PilotUsageError(f"peer names must be distinct, got {names!r}")
    # Check every entry's name, endpoint and address before any key or trust file
    # is created, so a typo leaves nothing behind.
    for spec in peers:
        TrustedPeer(
            name=spec.name, public_key=bytes(32), endpoint=spec.endpoint, address=spec.address
        )
    loaded = [(spec, *_load(spec)) for spec in peers]
    for spec, _identity, trust in loaded:
        for other, other_identity, _ in loaded:
            if other is spec:
                continue
            entry = TrustedPeer(
                name=other.name,
                public_key=other_identity.public_key,
                endpoint=other.endpoint,
                address=other.address,
            )
            if trust.get(other.name) == entry:
                continue
            holder = trust.by_public_key(other_identity.public_key)
            if holder is not None and holder.name != other.name:
                trust.remove(holder.name)
            trust.add(entry, replace=True)
