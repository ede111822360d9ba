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
