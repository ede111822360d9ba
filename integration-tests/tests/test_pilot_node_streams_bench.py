"""The pilot-node benchmark runs (--quick) and prints its ratios; no timed assertions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pilot_daemons import pilot_binaries

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pilot_node.py"


@pytest.mark.benchmark
@pytest.mark.skipif(pilot_binaries() is None, reason="pilotprotocol wheel not installed")
def test_bench_pilot_node_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for heading in ("pilotnode:// between our nodes", "our node -> Go daemon"):
        assert heading in result.stdout
    for figure in ("c=1 calls/s", "c=8 calls/s", "bulk MB/s", "c=1 round trips/s"):
        assert figure in result.stdout
    assert result.stdout.count("x\n") >= 6, result.stdout  # every figure has its ratio
