"""`pilot-transport info` asks a Pilot daemon (the in-process double) from a real CLI process."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from pilot_transport.testing import PilotDaemonDouble


async def test_info_reports_the_daemon(tmp_path: Path) -> None:
    socket_path = tmp_path / "pilot.sock"
    async with PilotDaemonDouble(str(socket_path), hostname="cli-test"):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pilot_transport",
            "--config-dir",
            str(tmp_path / "conf"),
            "info",
            "--json",
            "--transport",
            f"pilot://{socket_path}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    facts = json.loads(out)
    assert facts["transport"] == f"pilot://{socket_path}"
    daemon = facts["daemon"]
    assert daemon["carrier"] == "pilot"
    assert daemon["address"]
    assert "error" in facts["identity"]  # no identity created in this config dir


async def _run_cli(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pilot_transport",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_user_errors_print_one_line_and_exit_2(tmp_path: Path) -> None:
    config = ["--config-dir", str(tmp_path / "conf")]
    code, _, _ = await _run_cli(*config, "identity", "create")
    assert code == 0
    key_file = tmp_path / "conf" / "identity.key"
    key_file.chmod(0o644)
    cases = [
        ((*config, "identity", "show"), str(key_file)),
        ((*config, "info", "--transport", "tcp://127.0.0.1:notaport"), "notaport"),
        ((*config, "--identity", str(tmp_path / "nope.key"), "identity", "show"), "nope.key"),
        ((*config, "--trust", str(tmp_path), "trust", "list"), str(tmp_path)),
    ]
    for argv, named in cases:
        code, out, err = await _run_cli(*argv)
        assert code == 2, (argv, err)
        assert "Traceback" not in err
        assert err.startswith("error: "), err
        assert err.count("\n") == 1, err
        assert named in err
        assert not out
