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


def test_cli_trust_add_records_the_port_and_set_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from pilot_transport._cli import main

    def run(*argv: str) -> int:
        return main(["--config-dir", str(tmp_path), *argv], out=io.StringIO())

    worker, state = Identity.generate(), Identity.generate()
    assert run("trust", "add", "lg-worker", worker.public_key_text, "--address", ADDRESS,
               "--port", "5000") == 0  # fmt: skip
    assert run("trust", "add", "state-worker", state.public_key_text, "--address", ADDRESS,
               "--port", "5001") == 0  # fmt: skip
    assert run("trust", "set", "lg-worker", "--endpoint", "127.0.0.1:7000") == 0
    store = TrustStore.open(tmp_path / "trust.json")
    assert store.by_address(ADDRESS, 5000) == store.get("lg-worker")
    assert store.by_address(ADDRESS, 5001) == store.get("state-worker")
    lg = store.get("lg-worker")
    assert lg is not None
    assert lg.port == 5000
    assert lg.endpoint == "127.0.0.1:7000"
    capsys.readouterr()


async def test_connect_by_a_shared_address_picks_the_entry_for_the_port(tmp_path: Path) -> None:
    from pilot_transport import open_transport

    me = Identity.generate()
    worker = TrustedPeer("lg-worker", _key(), address=ADDRESS, port=5000)
    state = TrustedPeer("state-worker", _key(), address=ADDRESS, port=5001)
    async with open_transport(
        "memory://shared-address", identity=me, trust=TrustStore.in_memory([worker, state])
    ) as transport:
        for port, entry in ((5000, worker), (5001, state)):
            target, expected_key, label = transport._dial_target(ADDRESS, port)
            assert (label, expected_key) == (repr(entry.name), entry.public_key)
            assert target.name == entry.name
