"""Several identities behind one Pilot address (one daemon, several processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pilot_transport import Identity, TrustedPeer, TrustStore
from pilot_transport.errors import TrustStoreError

ADDRESS = "0:0000.0000.0007"


def _key() -> bytes:
    return Identity.generate().public_key


def test_two_peers_may_share_an_address_and_are_resolved_by_port() -> None:
    worker = TrustedPeer("lg-worker", _key(), address=ADDRESS, port=5000)
    state = TrustedPeer("state-worker", _key(), address=ADDRESS, port=5001)
    store = TrustStore.in_memory([worker, state])
    assert store.by_address(ADDRESS, 5000) == worker
    assert store.by_address(ADDRESS, 5001) == state
    assert store.by_address(ADDRESS) is None  # ambiguous without a port
    assert store.by_address(ADDRESS, 6000) is None
    assert {p.name for p in store.all_at_address(ADDRESS)} == {"lg-worker", "state-worker"}
    assert store.by_public_key(state.public_key) == state


def test_entries_without_ports_share_an_address_and_a_single_one_still_resolves() -> None:
    one = TrustedPeer("one", _key(), address=ADDRESS)
    store = TrustStore.in_memory([one])
    assert store.by_address(ADDRESS) == one
    assert store.by_address(ADDRESS, 5000) == one  # no entry for that port: the only one
    two = TrustedPeer("two", _key(), address=ADDRESS)
    store = TrustStore.in_memory([one, two])
    assert store.by_address(ADDRESS) is None
    assert store.by_address(ADDRESS, 5000) is None


def test_same_address_and_same_port_is_refused() -> None:
    with pytest.raises(TrustStoreError, match="same address and port"):
        TrustStore.in_memory(
            [
                TrustedPeer("a", _key(), address=ADDRESS, port=5000),
                TrustedPeer("b", _key(), address=ADDRESS, port=5000),
            ]
        )


def test_port_round_trips_through_the_file_and_old_entries_stay_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    store = TrustStore.open(path)
    store.add(TrustedPeer("a", _key(), address=ADDRESS, port=5000))
    store.add(TrustedPeer("b", _key(), address=ADDRESS))
    again = TrustStore.open(path)
    a, b = again.get("a"), again.get("b")
    assert a is not None
    assert a.port == 5000
    assert b is not None
    assert b.port is None
    assert "port" not in b.to_json()


@pytest.mark.parametrize("port", [-1, 65536, True, "5000"])
def test_bad_ports_are_refused(port: object) -> None:
    with pytest.raises(TrustStoreError, match="port"):
        TrustedPeer("a", _key(), address=ADDRESS, port=port)  # type: ignore[arg-type]
