"""The channels benchmark runs (quick mode) and prints its ratios; no timed assertions.

redis-server (the anchor) must be installed; scripts/test.sh installs it.
Without it this test fails rather than skips, so a missing anchor is noticed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_channels.py"


@pytest.mark.benchmark
def test_bench_channels_quick() -> None:
    assert shutil.which("redis-server"), (
        "redis-server is missing: the channels benchmark needs it as its anchor "
        "(apt-get install -y redis-server; scripts/test.sh does this)"
    )
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ratio deliveries/s ours/redis:" in result.stdout
    assert "ratio p99 paced latency ours/redis:" in result.stdout
    assert "no loss, no duplicate: True" in result.stdout
    print(result.stdout)
