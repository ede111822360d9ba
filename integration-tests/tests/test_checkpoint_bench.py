"""The checkpoint benchmark runs in quick mode, printing its table and ratios (no timed asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_checkpoint.py"


@pytest.mark.benchmark
def test_bench_checkpoint_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in (
        "ours: remote store over tcp://",
        "AsyncSqliteSaver",
        "SqliteSaver",
        "InMemorySaver",
    ):
        assert name in out
    assert "ratios (ours: remote store over tcp:// / AsyncSqliteSaver)" in out
    assert "group commit" in out
    assert "RATIOS-OK" in out
