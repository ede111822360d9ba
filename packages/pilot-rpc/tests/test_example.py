"""The example service in the README runs as shown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[1] / "examples" / "kv_service.py"


def test_kv_service_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["put  -> 1", "put  -> 2", "get  -> ada"]
    assert "get  -> NotFound: no key 'user:9' {'key': 'user:9'}" in lines
    assert "put  -> AlreadyExists: key 'user:1' exists" in lines
    assert "del  -> True" in lines
    assert sum(line.startswith("watch: ") for line in lines) == 3
