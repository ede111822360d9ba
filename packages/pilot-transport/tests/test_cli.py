from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest
from pilot_transport import Identity, TrustStore
from pilot_transport._cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue(), capsys.readouterr().err


def test_identity_create_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config-dir", str(tmp_path), "identity", "create")
    assert code == 0
    key_file = tmp_path / "identity.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    identity = Identity.load(key_file)
    assert identity.node_id in out
    assert identity.fingerprint in out
    assert f"trust add NAME {identity.public_key_text}" in out
    code, _, err = run(capsys, "--config-dir", str(tmp_path), "identity", "create")
    assert code == 1
    assert "already exists" in err
    code, out, _ = run(capsys, "--config-dir", str(tmp_path), "identity", "show", "--json")
    assert code == 0
    assert json.loads(out)["public_key"] == identity.public_key_text


def test_env_vars_choose_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PILOT_IDENTITY", str(tmp_path / "me.key"))
    monkeypatch.setenv("PILOT_TRUST", str(tmp_path / "friends.json"))
    assert run(capsys, "identity", "create")[0] == 0
    assert (tmp_path / "me.key").exists()
    key = Identity.generate().public_key_text
    assert run(capsys, "trust", "add", "bob", key)[0] == 0
    assert TrustStore.open(tmp_path / "friends.json").get("bob") is not None


def test_trust_add_set_list_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--trust", str(tmp_path / "trust.json")]
    key = Identity.generate()
    code, out, _ = run(
        capsys,
        *base,
        "trust",
        "add",
        "worker-a",
        key.public_key_text,
        "--endpoint",
        "127.0.0.1:7001",
    )
    assert code == 0
    assert key.fingerprint in out
    code, _, err = run(
        capsys, *base, "trust", "add", "worker-a", Identity.generate().public_key_text
    )
    assert code == 2
    assert "already named" in err
    code, _, _ = run(capsys, *base, "trust", "set", "worker-a", "--address", "0:0000.0000.0007")
    assert code == 0
    code, out, _ = run(capsys, *base, "trust", "list")
    assert "worker-a" in out
    assert "127.0.0.1:7001" in out
    assert "0:0000.0000.0007" in out
    code, out, _ = run(capsys, *base, "trust", "list", "--json")
    assert json.loads(out)[0]["node_id"] == key.node_id
    code, _, _ = run(capsys, *base, "trust", "set", "worker-a", "--endpoint", "")
    assert TrustStore.open(tmp_path / "trust.json").get("worker-a").endpoint is None  # type: ignore[union-attr]
    assert run(capsys, *base, "trust", "remove", "worker-a")[0] == 0
    code, _, err = run(capsys, *base, "trust", "remove", "worker-a")
    assert code == 2
    assert "no trusted peer" in err
    code, out, _ = run(capsys, *base, "trust", "list")
    assert "no trusted peers" in out


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--trust", str(tmp_path / "trust.json")]
    code, _, err = run(capsys, *base, "trust", "add", "x", "not-a-key")
    assert code == 2
    assert "bad public key" in err
    code, _, err = run(
        capsys, *base, "trust", "add", "x", Identity.generate().public_key_text, "--endpoint", "x"
    )
    assert code == 2
    assert "host:port" in err
    key_file = tmp_path / "open.key"
    Identity.generate().save(key_file)
    os.chmod(key_file, 0o644)
    code, _, err = run(capsys, "--identity", str(key_file), "identity", "show")
    assert code == 2
    assert "chmod 600" in err
    assert str(key_file) in err
    with pytest.raises(SystemExit) as usage:
        main(["trust"])
    assert usage.value.code == 2


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["info", "--transport", "bogus"], "bogus"),
        (["info", "--transport", "tcp://127.0.0.1:99999"], "tcp://127.0.0.1:99999"),
        (["info", "--transport", "udp://x:1"], "udp"),
        (["--identity", "{tmp}/missing.key", "identity", "show"], "{tmp}/missing.key"),
        (["--trust", "{tmp}", "trust", "list"], "{tmp}"),
    ],
)
def test_user_errors_are_one_line_with_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    code, out, err = run(capsys, "--config-dir", str(tmp_path), *argv)
    assert code == 2
    assert not out
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert named.replace("{tmp}", str(tmp_path)) in err


def test_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--config-dir", str(tmp_path)]
    run(capsys, *base, "identity", "create")
    code, out, _ = run(capsys, *base, "info", "--json", "--transport", "tcp://127.0.0.1:7001")
    facts = json.loads(out)
    assert code == 0
    assert facts["transport"] == "tcp://127.0.0.1:7001"
    assert facts["identity"]["node_id"] == Identity.load(tmp_path / "identity.key").node_id
    assert facts["trust"]["peers"] == 0
    code, _, err = run(capsys, *base, "info", "--transport", f"pilot://{tmp_path}/no-daemon.sock")
    assert code == 1
    assert "daemon" in err
