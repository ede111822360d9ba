from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pilot_transport import Identity, TrustedPeer, TrustStore
from pilot_transport.errors import TrustStoreError, UnknownPeerError

KEY_A = Identity.generate().public_key
KEY_B = Identity.generate().public_key


def test_missing_file_is_empty_and_first_edit_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "trust.json"
    store = TrustStore.open(path)
    assert store.list() == []
    assert len(store) == 0
    store.add(TrustedPeer("worker-a", KEY_A, endpoint="127.0.0.1:7001"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert document["peers"][0]["name"] == "worker-a"
    assert TrustStore.open(path).get("worker-a") == TrustedPeer(
        "worker-a", KEY_A, endpoint="127.0.0.1:7001"
    )


def test_lookups() -> None:
    a = TrustedPeer("a", KEY_A, address="0:0000.0000.0001")
    store = TrustStore.in_memory([a, TrustedPeer("b", KEY_B)])
    assert store.get("a") == a
    assert store.get("zzz") is None
    assert store.by_public_key(KEY_A) == a
    assert store.by_node_id(a.node_id) == a
    assert store.by_address("0:0000.0000.0001") == a
    assert store.is_trusted(KEY_B)
    assert not store.is_trusted(b"\x00" * 32)
    assert [peer.name for peer in store] == ["a", "b"]
    assert "a" in store


def test_edits_are_validated() -> None:
    store = TrustStore.in_memory([TrustedPeer("a", KEY_A)])
    store.add(TrustedPeer("a", KEY_A))  # same entry again: fine
    with pytest.raises(TrustStoreError, match="already named"):
        store.add(TrustedPeer("a", KEY_B))
    with pytest.raises(TrustStoreError, match="same public key"):
        store.add(TrustedPeer("other", KEY_A))
    store.add(TrustedPeer("a", KEY_B), replace=True)
    assert store.get("a") == TrustedPeer("a", KEY_B)
    with pytest.raises(UnknownPeerError):
        store.remove("nobody")
    assert store.remove("a").name == "a"
    assert len(store) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "", "public_key": KEY_A}, "peer name"),
        ({"name": "has space", "public_key": KEY_A}, "peer name"),
        ({"name": "a", "public_key": "short"}, "bad public key"),
        ({"name": "a", "public_key": KEY_A, "endpoint": "nohost"}, "host:port"),
        ({"name": "a", "public_key": KEY_A, "endpoint": "h:99999"}, "host:port"),
        ({"name": "a", "public_key": KEY_A, "address": "1:2"}, "bad address"),
    ],
)
def test_bad_entries(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TrustStoreError, match=message):
        TrustedPeer(**kwargs)  # type: ignore[arg-type]


def test_reloads_when_another_process_edits_the_file(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    reader = TrustStore.open(path)
    version = reader.version
    TrustStore.open(path).add(TrustedPeer("b", KEY_B))
    assert reader.is_trusted(KEY_B)
    assert reader.version != version
    TrustStore.open(path).remove("b")
    assert not reader.is_trusted(KEY_B)


def test_hand_edited_file_is_picked_up_and_bad_edits_keep_the_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "trust.json"
    store = TrustStore.open(path)
    store.add(TrustedPeer("a", KEY_A))
    with open(path, "w") as handle:  # in place, not atomic: same inode
        handle.write("{ broken json and longer than before ")
    assert store.is_trusted(KEY_A)
    assert "keeping the previous trust store content" in caplog.text
    with pytest.raises(TrustStoreError, match="not valid JSON"):
        TrustStore.open(path)


def test_deeply_nested_file_is_a_clear_error_at_open(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    path.write_text('{"peers": ' + "[" * 200_000 + "]" * 200_000 + "}")
    os.chmod(path, 0o600)
    with pytest.raises(TrustStoreError, match="nested too deeply"):
        TrustStore.open(path)


def test_deeply_nested_edit_keeps_the_last_good_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "trust.json"
    store = TrustStore.open(path)
    store.add(TrustedPeer("a", KEY_A))
    version = store.version
    with open(path, "w") as handle:  # in place: same inode, new size
        handle.write("[" * 200_000)
    assert store.is_trusted(KEY_A)
    assert store.get("a") is not None
    assert store.version == version
    assert "keeping the previous trust store content" in caplog.text
    assert "nested too deeply" in caplog.text
    with pytest.raises(TrustStoreError, match="nested too deeply"):
        store.reload()
    assert store.is_trusted(KEY_A)


def test_refuses_group_writable_file(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    TrustStore.open(path).add(TrustedPeer("a", KEY_A))
    os.chmod(path, 0o666)  # noqa: S103  # the insecure mode under test
    with pytest.raises(TrustStoreError, match="writable by group or others"):
        TrustStore.open(path)


@pytest.mark.parametrize(
    "content",
    [
        "[]",
        '{"peers": {}}',
        '{"version": 2, "peers": []}',
        '{"peers": [{"name": "a"}]}',
        '{"peers": [{"name": "a", "public_key": "x", "colour": "red"}]}',
    ],
)
def test_malformed_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "trust.json"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(TrustStoreError):
        TrustStore.open(path)


def test_concurrent_editors_lose_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    keys = [Identity.generate().public_key for _ in range(20)]

    def add(index: int) -> None:
        TrustStore.open(path).add(TrustedPeer(f"p{index}", keys[index]))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(TrustStore.open(path)) == 20


_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_ALNUM),
    st.text(alphabet=_ALNUM + "._@+-", max_size=20),
)


@given(
    name=names,
    key=st.binary(min_size=32, max_size=32),
    endpoint=st.none() | st.builds(lambda p: f"127.0.0.1:{p}", st.integers(1, 65535)),
)
def test_entry_json_round_trip(name: str, key: bytes, endpoint: str | None) -> None:
    peer = TrustedPeer(name, key, endpoint=endpoint)
    assert TrustedPeer.from_json(json.loads(json.dumps(peer.to_json()))) == peer
