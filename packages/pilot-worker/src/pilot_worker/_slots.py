"""Concurrency slots of calls whose handler may outlive the answer.

A call holds its handler's ``max_concurrent`` slot (and counts as in flight)
until the handler really stops: a sync function still on its pool thread, or
async code that caught its cancellation, keeps the slot after the caller got
``DEADLINE_EXCEEDED``. When such a handler finally ends, its slot is freed and,
if it ran past its deadline, the overrun is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pilot_worker._registry import HandlerEntry

__all__ = ["Running", "release_now", "release_when_done"]

handler_logger = logging.getLogger("pilot_worker.handlers")


class Running:
    """What may still run of a call after it was answered.

    ``task``: the child task running the chain (own-timeout calls); ``thread``:
    the future of a sync handler's thread.
    """

    __slots__ = ("task", "thread")

    def __init__(self) -> None:
        self.task: asyncio.Future[Any] | None = None
        self.thread: asyncio.Future[Any] | None = None

    def pending(self) -> list[asyncio.Future[Any]]:
        return [f for f in (self.task, self.thread) if f is not None and not f.done()]


def release_now(entry: HandlerEntry) -> None:
    """Free a call's slot and in-flight count."""
    entry.stats.in_flight -= 1
    if entry.gate is not None:
        entry.gate.release()


def release_when_done(
    entry: HandlerEntry,
    running: Running | None,
    deadline: float | None,
    clock: Callable[[], float],
) -> None:
    """Free the slot now, or when whatever of the handler still runs has ended."""
    if running is None or not (pending := running.pending()):
        release_now(entry)
        return
    # A sync thread's outcome is the handler's; a child task's counts when no
    # thread was still running.
    outcome = running.thread if running.thread in pending else pending[0]
    late = _LateRelease(entry, deadline, clock(), clock, outcome, pending)
    for fut in pending:
        fut.add_done_callback(late.one_done)


class _LateRelease:
    """Frees the slot of a handler that outlived its call, once all of it has ended."""

    __slots__ = ("answered_at", "clock", "deadline", "entry", "outcome", "waiting")

    def __init__(
        self,
        entry: HandlerEntry,
        deadline: float | None,
        answered_at: float,
        clock: Callable[[], float],
        outcome: asyncio.Future[Any],
        pending: list[asyncio.Future[Any]],
    ) -> None:
        self.entry = entry
        self.deadline = deadline
        self.answered_at = answered_at
        self.clock = clock
        self.outcome = outcome
        self.waiting = len(pending)

    def one_done(self, _: object) -> None:
        self.waiting -= 1
        if self.waiting:
            return
        release_now(self.entry)
        fut, deadline = self.outcome, self.deadline
        if fut.cancelled():
            return  # it honoured its cancellation
        fut.exception()  # retrieved: a late failure is not "never retrieved"
        # It ran on after its call was answered: at its deadline, or when the
        # caller gave up (usually at the caller's own deadline).
        timed_out = deadline is not None and self.answered_at >= deadline
        self.entry.stats.overruns += 1
        handler_logger.warning(
            "handler %r kept running %.3fs after its call was answered %s; its result is discarded",
            self.entry.spec.name,
            self.clock() - self.answered_at,
            "DEADLINE_EXCEEDED (past its deadline)" if timed_out else "CANCELLED",
        )
