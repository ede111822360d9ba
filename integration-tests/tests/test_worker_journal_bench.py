"""The idempotency journal benchmark runs in quick mode and prints its figures.

No timed assertions: the machine is shared; the figures live in the pilot-worker README.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_journal.py"


@pytest.mark.benchmark
def test_bench_journal_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in ("no key", "memory cache", "journal replay", "journal c=16"):
        assert name in out
    assert re.search(r"journal added cost per idempotent call: \d+\.\d+ ms", out), out
