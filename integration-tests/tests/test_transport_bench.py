"""The transport benchmark runs (quick mode) and prints its ratios; no timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_transport.py"


@pytest.mark.benchmark
def test_bench_transport_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for metric in ("ping-pong 200 B", "bulk, 64 KiB writes", "new connection"):
        row = next((line for line in lines if line.startswith(metric)), None)
        assert row is not None, f"no {metric!r} row in:\n{result.stdout}"
        ratio = float(row.split()[-3])  # ... anchor ours RATIO <op> <goal>
        assert ratio > 0
