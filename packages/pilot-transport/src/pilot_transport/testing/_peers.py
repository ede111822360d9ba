"""Ready-made identities and trust stores for tests."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pilot_transport._identity import Identity
from pilot_transport._trust import TrustedPeer, TrustStore

__all__ = ["TestPeer", "TestPeers", "create_test_peers"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TestPeer:
    """One test peer: its identity and trust store, and the files behind them."""

    __test__ = False  # not a pytest test class

    name: str
    identity: Identity
    trust: TrustStore
    identity_path: Path
    trust_path: Path

    @property
    def node_id(self) -> str:
        """The peer's node id."""
        return self.identity.node_id


class TestPeers(Mapping[str, TestPeer]):
    """The peers made by :func:`create_test_peers`, by name; edits every trust file."""

    __test__ = False  # not a pytest test class

    def __init__(self, peers: dict[str, TestPeer]) -> None:
        self._peers = peers

    def __getitem__(self, name: str) -> TestPeer:
        return self._peers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._peers)

    def __len__(self) -> int:
        return len(self._peers)

    def set_endpoint(self, name: str, endpoint: str | None) -> None:
        """Record ``name``'s tcp ``endpoint`` (``host:port``) in every other trust file."""
        self._update(name, endpoint=endpoint, address=self._current(name).address)

    def set_address(self, name: str, address: str | None) -> None:
        """Record Pilot ``address`` for ``name`` in every other trust file."""
        self._update(name, endpoint=self._current(name).endpoint, address=address)

    def _current(self, name: str) -> TrustedPeer:
        for other in self._peers.values():
            if other.name != name:
                entry = other.trust.get(name)
                if entry is not None:
                    return entry
        return TrustedPeer(name, self._peers[name].identity.public_key)

    def _update(self, name: str, *, endpoint: str | None, address: str | None) -> None:
        peer = self._peers[name]
        entry = TrustedPeer(name, peer.identity.public_key, endpoint=endpoint, address=address)
        for other in self._peers.values():
            if other.name != name:
                other.trust.add(entry, replace=True)


def create_test_peers(
    directory: str | os.PathLike[str],
    names: Iterable[str],
    *,
    endpoints: Mapping[str, str] | None = None,
) -> TestPeers:
    """Create an identity and a trust store per name; every peer trusts every other.

    Files go to ``directory/<name>/identity.key`` (0600) and
    ``directory/<name>/trust.json``; each peer's ``trust`` is the file-backed
    store, so edits (:meth:`TestPeers.set_endpoint`) reach running transports.

    Args:
        directory: where to write the files (e.g. pytest's ``tmp_path``).
        names: peer names (also their names in each other's trust stores).
        endpoints: optional ``name -> "host:port"`` recorded for tcp:// dialing.

    Raises:
        ValueError: a name is repeated.
        TrustStoreError: a name is not a valid peer name.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"peer names must be unique: {names}")
    endpoints = dict(endpoints or {})
    root = Path(directory).expanduser()
    identities: dict[str, tuple[Identity, Path]] = {}
    for name in names:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = Identity.generate()
        key_path = folder / "identity.key"
        identity.save(key_path)
        identities[name] = (identity, key_path)
    peers: dict[str, TestPeer] = {}
    for name in names:
        trust_path = root / name / "trust.json"
        trust = TrustStore.open(trust_path)
        for other, (other_identity, _) in identities.items():
            if other != name:
                trust.add(
                    TrustedPeer(other, other_identity.public_key, endpoint=endpoints.get(other)),
                    replace=True,
                )
        identity, key_path = identities[name]
        peers[name] = TestPeer(
            name=name,
            identity=identity,
            trust=trust,
            identity_path=key_path,
            trust_path=trust_path,
        )
    return TestPeers(peers)
