"""Where the default transport finds its identity and trust store."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pilot_langgraph._runtime import DefaultTransportSettings, _identity_and_trust


def test_files_come_from_the_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PILOT_IDENTITY", "PILOT_TRUST", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path / "cfg"))
    identity, trust = _identity_and_trust(DefaultTransportSettings())
    key = tmp_path / "cfg" / "identity.key"
    assert key.exists()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert trust.path == tmp_path / "cfg" / "trust.json"
    again, _ = _identity_and_trust(DefaultTransportSettings())
    assert again.node_id == identity.node_id  # stable across processes


def test_xdg_and_explicit_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PILOT_IDENTITY", "PILOT_TRUST", "PILOT_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    _identity_and_trust(DefaultTransportSettings())
    assert (tmp_path / "xdg" / "pilot" / "identity.key").exists()
    monkeypatch.setenv("PILOT_IDENTITY", str(tmp_path / "me.key"))
    settings = DefaultTransportSettings(trust=tmp_path / "t.json")
    _, trust = _identity_and_trust(settings)
    assert (tmp_path / "me.key").exists()
    assert trust.path == tmp_path / "t.json"
