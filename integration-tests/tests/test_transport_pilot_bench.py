"""The pilot:// carrier benchmark runs (--quick) and prints its ratios; no timed assertions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pilot_carrier.py"


@pytest.mark.benchmark
def test_bench_pilot_carrier_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ratio" in result.stdout
    for variant in ("anchor: bare IPC client", "ours: raw stream", "ours: TLS over pilot://"):
        assert variant in result.stdout
