"""Stopping the tasks a node owns: bounded, and never swallowing the caller's cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

_log = logging.getLogger("pilot_node")

STOP_TIMEOUT = 5.0
"""Seconds :func:`cancel_and_wait` waits for cancelled tasks before giving up on them."""


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any]], what: str, grace: float = STOP_TIMEOUT
) -> None:
    """Cancel ``tasks`` and wait (at most ``grace`` seconds) until they have ended.

    Their results and errors are consumed (a task that failed while stopping is
    logged, not raised). A task still running after ``grace`` is logged and left
    behind, so a close never hangs on a task that ignores its cancellation.
    Cancelling the caller stops the wait and propagates (it is never swallowed).
    """
    tasks = list(tasks)
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        _done, late = await asyncio.wait(pending, timeout=grace)
        if late:
            _log.warning(
                "%d %s task(s) still running %.0f s after being cancelled; left behind",
                len(late),
                what,
                grace,
            )
    for task in tasks:
        if task.done() and not task.cancelled():
            error = task.exception()
            if error is not None:
                _log.debug("%s task ended with %r while stopping", what, error)
