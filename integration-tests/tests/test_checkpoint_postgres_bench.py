"""The PostgreSQL checkpoint benchmark runs in quick mode, printing its table and ratios.

No timed asserts. Needs ``PILOT_TEST_POSTGRES_URL`` (``scripts/_postgres.sh`` in CI).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_checkpoint_postgres.py"


@pytest.mark.benchmark
@pytest.mark.postgres
@pytest.mark.skipif(
    not os.environ.get("PILOT_TEST_POSTGRES_URL"), reason="needs $PILOT_TEST_POSTGRES_URL"
)
def test_bench_checkpoint_postgres_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in (
        "ours: store worker on PostgreSQL",
        "AsyncPostgresSaver (pool of 16)",
        "AsyncPostgresSaver (one connection)",
    ):
        assert name in out
    assert "ratios (ours: store worker on PostgreSQL / AsyncPostgresSaver (pool of 16))" in out
    assert "ratios (ours: store worker on PostgreSQL / AsyncPostgresSaver (one connection))" in out
    assert "group commit" in out
    assert "RATIOS-OK" in out
