"""``pilot-langgraph demo`` (the README's main job) runs and cleans up after itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_end_to_end() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pilot_langgraph._cli", "demo"],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in out
    assert "fan-out: broad <- worker-a" in out
    assert re.search(r"SIGKILL -> pid \d+ \(mid-run", out)
    assert "killed process exit status: -9" in out
    assert "final states IDENTICAL" in out
    # each node ran on its own worker
    for node, worker in (
        ("planner", "worker-a"),
        ("executor", "worker-b"),
        ("verifier", "worker-c"),
    ):
        assert re.search(rf"{node}\s+{worker} \(pid \d+\)", out), node
    stopped = re.search(r"stopped 4 workers \(pids ([\d, ]+)\)", out)
    assert stopped is not None
    pids = [int(p) for p in stopped[1].split(", ")]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
