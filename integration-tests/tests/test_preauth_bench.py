"""The pre-authentication benchmark runs (quick mode) and prints its rows; no timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_preauth.py"


@pytest.mark.benchmark
def test_bench_preauth_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for scenario in ("baseline", "one address", "many addresses"):
        row = next((line for line in lines if line.startswith(scenario)), None)
        assert row is not None, f"no {scenario!r} row in:\n{result.stdout}"
        succeeded, attempted = row[len(scenario) :].split()[0].split("/")
        assert int(attempted) > 0
        assert 0 <= int(succeeded) <= int(attempted)
    assert any(line.startswith("goal ") for line in lines), result.stdout
