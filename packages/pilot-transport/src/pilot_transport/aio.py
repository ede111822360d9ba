"""Cancellation-safe asyncio helpers shared by every pilot package.

Stopping a background task is usually written ``task.cancel()`` followed by
``with suppress(BaseException): await task``. That swallows the *caller's*
own cancellation too: when the task doing the cleanup is itself cancelled
while it waits, the ``CancelledError`` meant for it is suppressed and it
carries on as if nothing happened. The helpers here separate the two, in
the spirit of anyio/trio cancel scopes:

- the outcome of the task being waited for (its result, its exception, its
  own cancellation) is never raised;
- the caller's cancellation always is, once what it waits for has ended.

They use public asyncio only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

__all__ = ["aclose_quietly", "cancel_and_wait", "wait_ended"]


async def wait_ended(*tasks: asyncio.Future[Any] | None) -> None:
    """Wait until every given task (or future) is done, without taking its outcome.

    The tasks' results, exceptions and cancellations are not raised (an
    exception is marked retrieved, so asyncio logs nothing about it).
    ``None`` entries are skipped, and so is the calling task itself, so
    ``await wait_ended(self._reader, self._writer)`` is safe from either.

    Raises:
        asyncio.CancelledError: the *caller* was cancelled while waiting. The
            tasks keep running (they are not cancelled on the caller's behalf);
            use :func:`cancel_and_wait` to stop them.

    Cancellation: re-raised at once, never swallowed. Safe to repeat.
    """
    current = asyncio.current_task()
    pending = [t for t in tasks if t is not None and t is not current]
    waiting = [t for t in pending if not t.done()]
    if waiting:
        await asyncio.wait(waiting)
    for task in pending:
        _retrieve(task)


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel the given tasks and wait until they have all ended.

    Like :func:`wait_ended`, the tasks' own outcomes are never raised. If the
    caller is cancelled while waiting, the tasks (already cancelled) are still
    waited for, then the caller's ``CancelledError`` is re-raised: when this
    returns or raises, none of the tasks is running any more. A task that
    refuses to end keeps the caller waiting, as a cancel scope would.

    Raises:
        asyncio.CancelledError: the caller was cancelled while waiting (raised
            after the tasks ended).

    Cancellation: deferred until the tasks ended, then re-raised. Safe to
    repeat; ``None`` entries and the calling task itself are skipped.
    """
    current = asyncio.current_task()
    pending = [t for t in tasks if t is not None and t is not current]
    for task in pending:
        task.cancel()
    caller_cancelled: asyncio.CancelledError | None = None
    while True:
        waiting = [t for t in pending if not t.done()]
        if not waiting:
            break
        try:
            await asyncio.wait(waiting)
        except asyncio.CancelledError as exc:
            caller_cancelled = exc
            for task in waiting:
                task.cancel()
    for task in pending:
        _retrieve(task)
    if caller_cancelled is not None:
        raise caller_cancelled


async def aclose_quietly(awaitable: Awaitable[Any]) -> BaseException | None:
    """Await a clean-up step (``stream.aclose()``, ``agen.aclose()``) and ignore its failure.

    An ``Exception`` it raises is returned instead of raised (for logging);
    so is a ``CancelledError`` raised by the awaited code on its own, while
    the caller is not being cancelled.

    Raises:
        asyncio.CancelledError: the caller itself was cancelled (checked with
            ``Task.cancelling()``): never swallowed.

    Returns:
        The exception the step raised, or ``None``.
    """
    try:
        await awaitable
    except asyncio.CancelledError as exc:
        current = asyncio.current_task()
        if current is None or current.cancelling():
            raise
        return exc
    except Exception as exc:
        return exc
    return None


def _retrieve(task: asyncio.Future[Any]) -> None:
    if task.done() and not task.cancelled():
        task.exception()
