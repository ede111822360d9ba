"""Command-line parsing that needs no network."""

from __future__ import annotations

from pathlib import Path

import pytest
from pilot_langgraph import PilotUsageError
from pilot_langgraph._cli import _parse_peer, main
from pilot_langgraph._worker_cli import worker_argv
from pilot_transport import TrustStore


def test_worker_argv_adds_the_builtin_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PILOT_WORKER_HANDLERS", raising=False)
    assert worker_argv(["--handlers", "mine", "--port", "5000"]) == [
        "--handlers",
        "mine",
        "--port",
        "5000",
        "--handlers",
        "pilot_langgraph._builtin_handlers",
    ]
    # the worker's env default still applies when no --handlers is given
    monkeypatch.setenv("PILOT_WORKER_HANDLERS", "a, b")
    assert worker_argv([]) == [
        "--handlers",
        "a",
        "--handlers",
        "b",
        "--handlers",
        "pilot_langgraph._builtin_handlers",
    ]
    assert worker_argv(["--help"]) == ["--help"]


def test_parse_peer() -> None:
    spec = _parse_peer("name=a,identity=a.key,trust=a.json,endpoint=127.0.0.1:7001")
    assert (spec.name, spec.endpoint) == ("a", "127.0.0.1:7001")
    with pytest.raises(PilotUsageError, match="missing"):
        _parse_peer("name=a")
    with pytest.raises(PilotUsageError, match="bad --peer"):
        _parse_peer("name=a,colour=blue")


def test_trust_command_pairs_and_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    argv = ["trust"]
    for name, base in (("a", a), ("b", b), ("c", c)):
        argv += ["--peer", f"name={name},identity={base}.key,trust={base}.json"]
    assert main(argv) == 0
    assert main(argv) == 0  # safe to repeat
    for base, others in ((a, {"b", "c"}), (b, {"a", "c"}), (c, {"a", "b"})):
        assert {p.name for p in TrustStore.open(f"{base}.json").list()} == others
    assert "a: trusts b, c" in capsys.readouterr().out
    assert main(["trust", "--peer", f"name=a,identity={a}.key,trust={a}.json"]) == 1


def test_trust_with_a_bad_endpoint_fails_in_one_line_and_creates_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    argv = [
        "trust",
        "--peer",
        f"name=a,identity={a}.key,trust={a}.json,endpoint=localhost-no-port",
        "--peer",
        f"name=b,identity={b}.key,trust={b}.json",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("pilot-langgraph: ")
    assert "localhost-no-port" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def _discover_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path / "cfg"))
    for name in ("PILOT_IDENTITY", "PILOT_TRUST", "PILOT_TRANSPORT", "PILOT_TRANSPORT_URL"):
        monkeypatch.delenv(name, raising=False)


def test_discover_with_a_key_readable_by_others_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pilot_transport import Identity

    _discover_env(monkeypatch, tmp_path)
    key = tmp_path / "loose.key"
    Identity.generate().save(key)
    key.chmod(0o644)
    assert main(["discover", "worker-a", "--identity", str(key)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "chmod 600" in err
    assert "Traceback" not in err


def test_discover_with_a_bad_transport_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _discover_env(monkeypatch, tmp_path)
    assert main(["discover", "worker-a", "--transport", "compat"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "compat" in err
    assert "Traceback" not in err


def test_discover_with_no_trust_file_says_it_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _discover_env(monkeypatch, tmp_path)
    assert main(["discover", "worker-a"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err
    assert str(tmp_path / "cfg" / "trust.json") in err


def test_discover_with_a_named_identity_that_does_not_exist_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _discover_env(monkeypatch, tmp_path)
    monkeypatch.setenv("PILOT_IDENTITY", str(tmp_path / "me.kye"))
    assert main(["discover", "worker-a"]) == 1
    err = capsys.readouterr().err
    assert "me.kye" in err
    assert "does not exist" in err
    assert not (tmp_path / "me.kye").exists()
