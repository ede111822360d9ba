"""Every example in examples/ runs to completion (each starts its own workers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(name: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
    env.pop("OPENAI_API_KEY", None)  # the flows must work without an LLM key
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_seed_fanout_checkpoint() -> None:
    out = _run("seed_fanout_checkpoint.py")
    assert "topics found by worker-a" in out
    assert "passages read by worker-b" in out
    assert "stored on state-worker" in out


@pytest.mark.slow
def test_checkpoint_survival() -> None:
    out = _run("checkpoint_survival.py").splitlines()
    paused = next(line for line in out if "paused before ['approve']" in line)
    resumed = next(line for line in out if "loaded 'survival-1' from state-worker" in line)
    assert paused.split("]")[0] != resumed.split("]")[0]  # two different processes
    assert any("approved='approved'" in line for line in out)


@pytest.mark.slow
def test_send_fanout() -> None:
    out = _run("send_fanout.py")
    assert "12 Send tasks, total of squares = 650" in out
    assert "worker-a=4, worker-b=4, worker-c=4" in out


@pytest.mark.slow
def test_multi_agent_research() -> None:
    out = _run("multi_agent_research.py")
    assert "verdict: accept" in out
    assert out.count("researcher: notes on") == 3


@pytest.mark.slow
def test_remote_graph() -> None:
    out = _run("remote_graph.py")
    assert "[remote] {'plan':" in out
    assert "paused: publish 1.2.0?" in out
    assert "final: 1.2.0 published, approved by alice (announced locally)" in out
