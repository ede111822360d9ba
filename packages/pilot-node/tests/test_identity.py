"""The identity file: created 0600, refused when others can read it, malformed files rejected."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from pilot_node import IdentityError, NodeIdentity


def test_created_with_mode_0600_and_loaded_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "identity.json"
    first = NodeIdentity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = NodeIdentity.load_or_create(path)
    assert again.public_key == first.public_key
    assert first.fingerprint.startswith("sha256:")
    assert len(first.public_key) == 32


def test_group_readable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    NodeIdentity.generate().save(path)
    path.chmod(0o640)
    with pytest.raises(IdentityError, match="chmod 600"):
        NodeIdentity.load(path)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"format": "other"}),
        json.dumps({"format": "pilot-node-identity/1", "ed25519_seed": "!!"}),
        json.dumps({"format": "pilot-node-identity/1", "ed25519_seed": "AAAA"}),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "identity.json"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError):
        NodeIdentity.load(path)


def test_signatures_verify_with_the_public_key() -> None:
    from pilot_node._identity import verify_signature

    identity = NodeIdentity.generate()
    signature = identity.sign(b"challenge")
    assert verify_signature(identity.public_key, b"challenge", signature)
    assert not verify_signature(identity.public_key, b"other", signature)
    assert not verify_signature(identity.public_key, b"challenge", signature[:10])
