"""Handlers of the demo workers (``--handlers pilot_langgraph._demo.handlers``).

The same pure functions run either on remote workers or in-process (see
``_demo/graph.py``), so the demo can compare a distributed run (killed and
resumed) with a purely local one. They are deterministic: same input, same
output, wherever they run. Each result carries a ``trace`` entry saying which
worker (and pid) produced it; traces are the only part of the state that
differs between a local and a remote run. This module imports only what a
worker needs.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from langchain_core.messages import AIMessage
from pilot_worker import Context, pilot_handler

from pilot_langgraph._env import PILOT_DEMO_WORKER
from pilot_langgraph._headers import FANOUT_LABEL_HEADER

__all__ = ["TOPICS", "execute", "plan", "search", "search_locally", "verify"]

# Simulated work per executor step, so a run can be interrupted mid-way.
EXECUTOR_WORK_SECS = 0.25

TOPICS = {
    "broad": ["transport security", "worker pools", "checkpoint stores"],
    "deep": ["mutual TLS 1.3", "idempotency keys", "write-ahead logging"],
    "recent": ["peer-to-peer NAT traversal", "durable topics", "graph resumption"],
}


def _where() -> str:
    return f"{os.environ.get(PILOT_DEMO_WORKER, 'local')} (pid {os.getpid()})"


def search_locally(goal: str, label: str) -> dict[str, Any]:
    """What the ``search`` handler returns for the fan-out target ``label``."""
    return {"goal": goal, "hits": TOPICS.get(label, TOPICS["broad"]), "by": _where()}


@pilot_handler("search", timeout_secs=10)
async def search(state: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Look up material for the goal, from the angle named by the fan-out label."""
    label = ctx.metadata.get(FANOUT_LABEL_HEADER, "broad")
    return search_locally(str(state.get("goal", "")), label)


def _hits(state: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("broad", "deep", "recent"):
        found = state.get(key) or {}
        out.extend(found.get("hits", []))
    return out


@pilot_handler("plan", timeout_secs=10)
async def plan(state: dict[str, Any]) -> dict[str, Any]:
    """Turn the research into a three-step plan."""
    hits = sorted(_hits(state))
    steps = [f"explain {hits[i]}" for i in range(0, min(len(hits), 9), 3)] or ["explain goal"]
    return {
        "plan": steps,
        "step": 0,
        "messages": [AIMessage(f"plan: {'; '.join(steps)}", name="planner")],
        "trace": [f"planner   on {_where()}"],
    }


@pilot_handler("execute", timeout_secs=10, idempotent=True)
async def execute(state: dict[str, Any]) -> dict[str, Any]:
    """Carry out the current plan step."""
    step = int(state.get("step", 0))
    task = state["plan"][step]
    await asyncio.sleep(EXECUTOR_WORK_SECS)  # stands in for real work (an LLM call, a tool)
    result = f"step {step + 1}: {task} -> done ({len(task)} chars of notes)"
    return {
        "results": [result],
        "messages": [AIMessage(result, name="executor")],
        "trace": [f"executor  on {_where()}"],
    }


@pilot_handler("verify", timeout_secs=10)
async def verify(state: dict[str, Any]) -> dict[str, Any]:
    """Check the latest result and move to the next step (or finish)."""
    step = int(state.get("step", 0))
    results = state.get("results", [])
    ok = len(results) == step + 1 and results[-1].startswith(f"step {step + 1}:")
    verdict = f"step {step + 1} {'verified' if ok else 'REJECTED'}"
    nxt = step + 1 if ok else step
    return {
        "step": nxt,
        "verdicts": [verdict],
        "done": nxt >= len(state["plan"]),
        "trace": [f"verifier  on {_where()}"],
    }
