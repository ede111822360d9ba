"""The command line: help, plugin options, and clear configuration errors."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from pilot_transport import Identity, TrustedPeer, TrustStore
from pilot_worker import Plugin, PluginOption
from pilot_worker._cli import READY_FILE_KEYS
from pilot_worker.cli import EXIT_CONFIG, build_parser, main

DUPLICATE = """
from pilot_worker import pilot_handler

@pilot_handler("same")
def one(payload):
    return 1
"""

DUPLICATE_2 = """
from pilot_worker import pilot_handler

@pilot_handler("same")
def two(payload):
    return 2
"""


def _base(tmp_path: Path) -> list[str]:
    # Named files must exist (a typo must not mint a new key).
    key = tmp_path / "worker.key"
    if not key.exists():
        Identity.generate().save(key)
        TrustStore.open(tmp_path / "trust.json").add(
            TrustedPeer("caller", Identity.generate().public_key)
        )
    return [
        "--transport",
        "tcp://127.0.0.1:0",
        "--identity",
        str(tmp_path / "worker.key"),
        "--trust",
        str(tmp_path / "trust.json"),
    ]


def test_help_reads_well(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--transport",
        "--identity",
        "--trust",
        "--port",
        "--handlers",
        "--plugin",
        "--list-plugins",
        "--metrics-port",
        "--log-format",
        "--log-level",
        "--drain-timeout",
        "--reload",
        "--default-policy",
        "--ready-file",
        "--otel-endpoint",
        "--max-connections-per-peer",
        "--idempotency-store",
        "--idempotency-lease",
    ):
        assert flag in out
    assert "exit status" in out


def test_help_lists_every_ready_file_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    # The keys the worker writes (checked against a real ready file in the
    # integration tests) all appear in the --ready-file help.
    assert f"with the keys {', '.join(READY_FILE_KEYS)}" in help_text
    assert set(READY_FILE_KEYS) >= {"node_id", "endpoint", "port", "pid", "metrics_port"}


def test_module_without_handlers_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty_handlers.py"
    empty.write_text("def not_a_handler(payload):\n    return payload\n")
    assert main([*_base(tmp_path), "--handlers", str(empty)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"handlers module {str(empty)!r}" in err
    assert "defines no handlers" in err
    assert "@pilot_handler" in err


def test_plugin_options_join_the_parser() -> None:
    plugin = Plugin(
        name="store",
        description="A store.",
        options=[PluginOption(flag="--store-db", help="database URL", env="STORE_DB")],
        setup=lambda ctx: None,
    )
    parser = build_parser(plugins=[plugin])
    args = parser.parse_args(["--store-db", "sqlite:///x.db"])
    assert args.plugin__store__store_db == "sqlite:///x.db"
    assert "database URL (env STORE_DB)" in parser.format_help()


def test_plugin_flag_clash_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    clash = Plugin(name="clash", options=[PluginOption(flag="--port", help="")], setup=print)
    assert main(["--identity", "k", "--trust", "t"], plugins=[clash]) == EXIT_CONFIG
    assert "--port is already used" in capsys.readouterr().err


def test_required_plugin_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = Plugin(
        name="needs",
        options=[PluginOption(flag="--needs-db", help="", env="NEEDS_DB", required=True)],
        setup=lambda ctx: None,
    )
    monkeypatch.delenv("NEEDS_DB", raising=False)
    with pytest.raises(SystemExit) as info:
        main(_base(tmp_path), plugins=[plugin])
    assert info.value.code == EXIT_CONFIG
    assert "needs --needs-db or set NEEDS_DB" in capsys.readouterr().err


def test_a_named_identity_that_does_not_exist_is_refused_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("PILOT_IDENTITY", str(tmp_path / "me.kye"))
    code = main(["--transport", "tcp://127.0.0.1:0"])
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "me.kye" in err
    assert "does not exist" in err
    assert "Traceback" not in err
    assert not (tmp_path / "me.kye").exists()
    assert not (tmp_path / "cfg" / "identity.key").exists()


def test_a_named_trust_file_that_does_not_exist_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PILOT_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv("PILOT_IDENTITY", raising=False)
    code = main(["--trust", str(tmp_path / "t.json")])
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "t.json" in err
    assert "does not exist" in err


def test_missing_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*_base(tmp_path), "--handlers", "no_such_handlers_module_xyz"])
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "handler module 'no_such_handlers_module_xyz' not found" in err


def test_module_raising_on_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad_handlers.py"
    bad.write_text("raise RuntimeError('broken at import')\n")
    assert main([*_base(tmp_path), "--handlers", str(bad)]) == EXIT_CONFIG
    assert "RuntimeError: broken at import" in capsys.readouterr().err


def test_handler_defined_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dup_a.py").write_text(DUPLICATE)
    (tmp_path / "dup_b.py").write_text(DUPLICATE_2)
    code = main(
        [
            *_base(tmp_path),
            "--handlers",
            str(tmp_path / "dup_a.py"),
            "--handlers",
            str(tmp_path / "dup_b.py"),
        ]
    )
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "handler name 'same' is defined twice" in err
    assert "one" in err
    assert "two" in err


def test_unusable_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "worker.key"
    key.write_text("not a key")
    key.chmod(0o600)
    assert main(_base(tmp_path)) == EXIT_CONFIG
    assert "identity key file" in capsys.readouterr().err
    key.chmod(0o644)
    assert main(_base(tmp_path)) == EXIT_CONFIG
    assert "chmod 600" in capsys.readouterr().err


def test_key_path_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "worker.key").mkdir()
    assert main(_base(tmp_path)) == EXIT_CONFIG
    assert "identity key file" in capsys.readouterr().err


def test_unknown_plugin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_base(tmp_path), "--plugin", "no-such-plugin"]) == EXIT_CONFIG
    assert "no plugin named 'no-such-plugin'" in capsys.readouterr().err


def test_list_plugins(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    module = tmp_path / "listed_plugin_mod.py"
    module.write_text(
        textwrap.dedent(
            """
            from pilot_worker import Plugin, PluginOption
            plugin = Plugin(name="listed", description="Listed plugin.",
                            options=[PluginOption(flag="--listed-x", help="an option",
                                                  env="LISTED_X", default="1")],
                            setup=lambda ctx: None)
            """
        )
    )
    dist = tmp_path / "listed-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: listed\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[pilot_worker.plugins]\nlisted = listed_plugin_mod:plugin\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["--list-plugins"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("listed_plugin_mod", None)
    out = capsys.readouterr().out
    assert "listed  Listed plugin." in out
    assert "--listed-x VALUE  an option; env LISTED_X; default 1" in out


def test_bad_idempotency_store_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_base(tmp_path), "--idempotency-store", "mysql://u@h/db"]) == EXIT_CONFIG
    assert "unsupported database 'mysql'" in capsys.readouterr().err


def test_idempotency_store_without_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def no_sqlalchemy(name: str, *args: object) -> object:
        return None if name == "sqlalchemy" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", no_sqlalchemy)
    monkeypatch.delitem(sys.modules, "pilot_worker.journal", raising=False)
    store = f"sqlite:///{tmp_path / 'journal.db'}"
    assert main([*_base(tmp_path), "--idempotency-store", store]) == EXIT_CONFIG
    assert "needs SQLAlchemy: pip install 'pilot-worker[journal]'" in capsys.readouterr().err
    assert not (tmp_path / "journal.db").exists()
