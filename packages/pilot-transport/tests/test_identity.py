from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pilot_transport import Identity
from pilot_transport._identity import decode_public_key, encode_public_key, node_id_of
from pilot_transport.errors import IdentityError, InsecureKeyFileError


def test_generate_save_load_round_trip(tmp_path: Path) -> None:
    identity = Identity.generate()
    path = tmp_path / "sub" / "identity.key"
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = Identity.load(path)
    assert loaded == identity
    assert loaded.node_id == identity.node_id
    assert loaded.public_key == identity.public_key
    assert not list(path.parent.glob(".*tmp")), "the temporary file must be gone"


def test_names_derived_from_the_public_key() -> None:
    identity = Identity.generate()
    assert len(identity.public_key) == 32
    assert len(identity.node_id) == 26
    assert identity.node_id == identity.node_id.lower()
    assert identity.node_id == node_id_of(identity.public_key)
    assert identity.fingerprint.startswith("SHA256:")
    assert len(identity.fingerprint) == 50
    assert decode_public_key(identity.public_key_text) == identity.public_key
    assert Identity.generate().node_id != identity.node_id
    assert "PRIVATE" not in repr(identity)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o601])
def test_load_refuses_key_files_open_to_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.key"
    Identity.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(InsecureKeyFileError, match="chmod 600"):
        Identity.load(path)


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load(tmp_path / "missing.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    os.chmod(garbage, 0o600)
    with pytest.raises(IdentityError, match="PKCS#8"):
        Identity.load(garbage)
    with pytest.raises(IdentityError, match="not a regular file"):
        Identity.load(tmp_path)


def test_load_or_create_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    first = Identity.load_or_create(path)
    assert Identity.load_or_create(path) == first


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    Identity.generate().save(path)
    second = Identity.generate()
    second.save(path)
    assert Identity.load(path) == second


@given(st.binary(min_size=32, max_size=32))
def test_public_key_text_round_trip(raw: bytes) -> None:
    assert decode_public_key(encode_public_key(raw)) == raw
    assert decode_public_key(raw.hex()) == raw
    assert decode_public_key(raw) == raw


@given(st.text(max_size=80))
def test_decode_public_key_rejects_garbage_with_value_error(text: str) -> None:
    try:
        raw = decode_public_key(text)
    except ValueError:
        return
    assert len(raw) == 32


def test_symlinked_key_files_are_followed_and_the_target_mode_checked(tmp_path: Path) -> None:
    identity = Identity.generate()
    target = tmp_path / "secret" / "key"
    identity.save(target)
    link = tmp_path / "identity.key"
    link.symlink_to(target)
    assert Identity.load(link) == identity
    os.chmod(target, 0o644)
    with pytest.raises(InsecureKeyFileError):
        Identity.load(link)


def test_paths_expand_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    identity = Identity.load_or_create("~/.config/pilot/identity.key")
    assert (tmp_path / ".config" / "pilot" / "identity.key").exists()
    assert Identity.load("~/.config/pilot/identity.key") == identity
