"""The langgraph benchmark runs in quick mode and prints its ratios (no timed assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_langgraph.py"


@pytest.mark.benchmark
def test_bench_langgraph_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratio pilot / langserve" in proc.stdout
    assert "remote overhead per node" in proc.stdout
    assert "ratios: c=1 " in proc.stdout
