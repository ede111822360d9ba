"""Handlers every ``pilot-langgraph-worker`` serves in addition to the user's."""

from __future__ import annotations

from typing import Any

from pilot_worker import pilot_handler

from pilot_langgraph._echo import ECHO_HANDLER

__all__ = ["echo"]


@pilot_handler(ECHO_HANDLER, timeout_secs=10)
async def echo(payload: Any) -> Any:
    """Return the input unchanged (used by PilotEchoRunnable)."""
    return payload
