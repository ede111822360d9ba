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
