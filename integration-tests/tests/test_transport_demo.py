"""The README's main-job demo runs, shows the trusted exchange and the refused third process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).parents[2] / "examples" / "transport_demo.py"


def test_transport_demo_runs_and_stops_everything() -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "alice saw peer 'bob'" in out
    assert "bob saw peer 'alice'" in out
    assert "mallory got RejectedByPeerError" in out
    assert "bob logged: refused inbound connection" in out
    assert "4. stopped bob (pid" in out
    # Every pid the demo reports is gone once it returns.
    for line in out.splitlines():
        if line.startswith("4. stopped"):
            for pid in [int(part.split(")")[0]) for part in line.split("pid ")[1:]]:
                assert not Path(f"/proc/{pid}").exists(), f"pid {pid} is still running"
