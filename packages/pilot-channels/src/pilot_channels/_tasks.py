"""Stopping the background tasks this package owns."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has really ended.

    The task's own ``CancelledError`` is absorbed, but a cancellation aimed at
    the *calling* task (someone cancelling ``close()``) is re-raised, so closing
    never swallows its caller's cancellation.
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
