"""The interface an idempotency store offers the call pipeline, and ``ctx.step``.

Two stores implement :class:`IdempotencyStore`: the in-memory
:class:`~pilot_worker._idempotency.IdempotencyCache` (one worker process, the
default) and :class:`~pilot_worker.journal.IdempotencyJournal` (a database
shared by a pool of workers). This module imports no database library, so
``Context.step`` costs nothing when no journal is configured.

While a journal runs a handler it sets a *step scope* in a context variable;
``await ctx.step(name, fn)`` looks it up: with a scope, a step recorded by an
earlier attempt of the same call is replayed and a new one is recorded; with
none, ``fn`` simply runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol

__all__ = ["IdempotencyStore", "Key", "StepScope", "current_scope", "run_step"]

Key = tuple[str, str, str]
"""``(handler name, caller node id, idempotency key)``."""


class IdempotencyStore(Protocol):
    """What the call pipeline needs from an idempotency store."""

    async def run(
        self,
        key: Key,
        factory: Callable[[], Awaitable[Any]],
        *,
        deadline: float | None = None,
    ) -> tuple[Any, bool]:
        """Return ``(result, replayed)``: a recorded outcome, or run ``factory`` once.

        ``deadline`` (event-loop time) bounds how long a duplicate waits for
        a twin that is still running.
        """
        ...

    def forget(self, handler: str) -> None:
        """Drop what is remembered for ``handler`` (after it was replaced), if that applies."""
        ...


class StepScope(Protocol):
    """The steps of one running call (provided by a journal)."""

    async def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """Replay step ``name`` if recorded, else run ``fn`` and record its result."""
        ...


_SCOPE: ContextVar[StepScope | None] = ContextVar("pilot_worker_step_scope", default=None)


def current_scope() -> ContextVar[StepScope | None]:
    """The context variable a journal sets while it runs a handler."""
    return _SCOPE


async def run_step(name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as step ``name`` of the current call (see ``Context.step``)."""
    if not isinstance(name, str) or not name:  # pyright: ignore[reportUnnecessaryIsInstance]
        from pilot_worker.errors import JournalError

        raise JournalError(f"a step name must be a non-empty str, got {name!r}")
    scope = _SCOPE.get()
    if scope is not None:
        return await scope.step(name, fn)
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result
