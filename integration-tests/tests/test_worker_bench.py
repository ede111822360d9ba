"""The pilot-worker benchmark runs in quick mode and prints its table and ratios.

No timed assertions: the machine is shared; the figures live in the package README.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_worker.py"


@pytest.mark.benchmark
def test_bench_worker_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in ("bare rpc", "worker (all features)", "worker (sync handler)", "idle RSS"):
        assert name in out
    ratios = re.findall(r"c=64 (\d+\.\d+) \(cost", out)
    assert len(ratios) == 2, out
    # Every call was logged by the worker (the logging feature really ran).
    logged = re.search(r"worker call log lines written: (\d+)", out)
    assert logged is not None
    assert int(logged.group(1)) > 0
