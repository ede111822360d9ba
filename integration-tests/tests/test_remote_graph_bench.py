"""The PilotRemoteGraph benchmark runs in quick mode and prints figures (no timed asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_remote_graph.py"


@pytest.mark.benchmark
def test_bench_remote_graph_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PilotRemoteGraph" in proc.stdout
    assert "runs/s c=16" in proc.stdout
    assert "anchor skipped" in proc.stdout
