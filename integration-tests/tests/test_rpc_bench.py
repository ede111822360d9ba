"""The pilot-rpc benchmark runs in quick mode and prints its table and ratios (no timed asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_rpc.py"


@pytest.mark.benchmark
def test_bench_rpc_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in ("pilot-rpc", "raw asyncio", "grpc.aio"):
        assert name in out
    assert "ours/grpc" in out
    assert "ours/raw" in out
    assert "calls in flight: server RSS" in out
    assert "stalled subscriber" in out
