"""pilot_transport.config: one rule for where configuration comes from."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from pilot_transport import Identity, TrustStore, config, open_transport
from pilot_transport.errors import (
    IdentityError,
    IdentityNotFoundError,
    TrustFileNotFoundError,
    TrustStoreError,
    UnknownPeerError,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in (
        config.TRANSPORT_URL_ENV,
        config.LEGACY_TRANSPORT_ENV,
        config.IDENTITY_ENV,
        config.TRUST_ENV,
        config.CONFIG_DIR_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(config.XDG_CONFIG_HOME_ENV, raising=False)
    return home


def test_config_dir_lookup_order(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    assert config.config_dir() == clean_env / ".config" / "pilot"
    monkeypatch.setenv("XDG_CONFIG_HOME", "/xdg")
    assert config.config_dir() == Path("/xdg/pilot")
    monkeypatch.setenv("PILOT_CONFIG_DIR", "/explicit")
    assert config.config_dir() == Path("/explicit")
    assert config.config_dir("/arg") == Path("/arg")


def test_paths_say_where_they_came_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path))
    default = config.identity_path()
    assert default.path == tmp_path / "identity.key"
    assert default.source == "default"
    assert not default.named
    monkeypatch.setenv("PILOT_IDENTITY", str(tmp_path / "env.key"))
    from_env = config.identity_path()
    assert from_env.source == "environment"
    assert "$PILOT_IDENTITY" in from_env.describe()
    assert config.identity_path(tmp_path / "arg.key").source == "argument"
    assert config.trust_path().path == tmp_path / "trust.json"


def test_a_named_identity_that_does_not_exist_is_an_error_and_nothing_is_created(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    typo = tmp_path / "me.kye"
    monkeypatch.setenv("PILOT_IDENTITY", str(typo))
    with pytest.raises(IdentityNotFoundError) as caught:
        config.load_identity()
    assert str(typo) in str(caught.value)
    assert "$PILOT_IDENTITY" in str(caught.value)
    assert caught.value.path == str(typo)
    assert isinstance(caught.value, IdentityError)
    assert not typo.exists()
    with pytest.raises(IdentityNotFoundError):
        config.load_identity(tmp_path / "also-missing.key")
    assert not (tmp_path / "also-missing.key").exists()


def test_the_default_identity_is_created_once_and_the_log_says_where(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path / "cfg"))
    with caplog.at_level(logging.WARNING, logger="pilot_transport.config"):
        first = config.load_identity()
    key = tmp_path / "cfg" / "identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert any(str(key) in r.getMessage() and "created" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pilot_transport.config"):
        again = config.load_identity()
    assert again == first
    assert not caplog.records
    # Without create_default (show-style commands) a missing default is an error too.
    monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path / "empty"))
    with pytest.raises(IdentityNotFoundError):
        config.load_identity(create_default=False)


def test_a_named_trust_file_that_does_not_exist_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PILOT_TRUST", str(tmp_path / "trsut.json"))
    with pytest.raises(TrustFileNotFoundError) as caught:
        config.open_trust()
    assert "trsut.json" in str(caught.value)
    assert isinstance(caught.value, TrustStoreError)
    assert not (tmp_path / "trsut.json").exists()


def test_a_missing_default_trust_file_is_an_empty_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path))
    store = config.open_trust()
    assert len(store) == 0
    assert store.path == tmp_path / "trust.json"


def test_transport_url_has_its_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.transport_url() == config.DEFAULT_TRANSPORT_URL
    monkeypatch.setenv("PILOT_TRANSPORT_URL", "memory://ours")
    assert config.transport_url() == "memory://ours"
    assert config.transport_url("tcp://127.0.0.1:7") == "tcp://127.0.0.1:7"


@pytest.mark.parametrize("daemon_value", ["udp", "compat", "auto"])
def test_the_daemons_pilot_transport_values_are_ignored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, daemon_value: str
) -> None:
    monkeypatch.setenv("PILOT_TRANSPORT", daemon_value)
    with caplog.at_level(logging.DEBUG, logger="pilot_transport.config"):
        assert config.transport_url() == config.DEFAULT_TRANSPORT_URL
    assert any("Pilot daemon" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("PILOT_TRANSPORT_URL", "memory://ours")
    assert config.transport_url() == "memory://ours"


def test_a_url_in_the_old_variable_still_works_with_a_deprecation_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PILOT_TRANSPORT", "memory://legacy")
    with pytest.warns(DeprecationWarning, match="PILOT_TRANSPORT_URL"):
        assert config.transport_url() == "memory://legacy"


async def test_open_transport_ignores_a_daemon_value_of_pilot_transport(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PILOT_TRANSPORT", "compat")
    identity = Identity.generate()
    async with open_transport(identity=identity, trust=TrustStore.in_memory()) as transport:
        assert transport.carrier == "tcp"


def test_resolve_is_pure_and_keys_equal_configurations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path))
    one = config.resolve()
    assert not (tmp_path / "identity.key").exists()
    monkeypatch.setenv("PILOT_IDENTITY", str(tmp_path / "identity.key"))
    two = config.resolve()
    assert one.key() == two.key()
    assert config.resolve(url="memory://x").key() != one.key()
    identity, trust = one.load()
    assert (tmp_path / "identity.key").exists()
    assert len(trust) == 0
    assert identity == Identity.load(tmp_path / "identity.key")


async def test_unknown_peer_error_says_the_trust_file_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "trust.json"
    async with open_transport(
        "memory://unknown-peer", identity=Identity.generate(), trust=TrustStore.open(missing)
    ) as transport:
        with pytest.raises(UnknownPeerError, match="does not exist"):
            await transport.connect("worker-a", 5000)


async def test_preferred_pool_size_is_one_on_tcp_and_memory() -> None:
    for url in ("tcp://127.0.0.1:0", "memory://pool-size"):
        async with open_transport(
            url, identity=Identity.generate(), trust=TrustStore.in_memory()
        ) as transport:
            assert transport.preferred_pool_size == 1
