"""Orchestration of ``pilot-langgraph demo``."""

from __future__ import annotations

import sys

__all__ = ["run_demo"]


def run_demo(*, keep: bool = False, timeout: float = 60.0) -> int:
    """Run the demo; returns the exit code."""
    del keep, timeout
    print("pilot-langgraph demo: waiting for the worker layer", file=sys.stderr)
    return 2
