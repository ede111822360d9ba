"""Results remembered by idempotency key, for handlers declared ``idempotent=True``.

Keys are scoped by handler name *and* caller node id, so one caller can never
read another caller's result by guessing its key. Only successful results are
stored, for ``ttl_secs``, at most ``max_entries`` of them (oldest first out).

A duplicate that arrives while the first call is still running waits for it
and gets its outcome (result or error). If the first call is cancelled (its
caller went away), one waiting duplicate takes over and runs the handler.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from pilot_rpc import DeadlineExceeded

__all__ = ["IdempotencyCache"]

Key = tuple[str, str, str]


class _Abandoned(Exception):
    """The running call was cancelled; a waiter should run the handler itself."""


class IdempotencyCache:
    """Bounded TTL map from ``(handler, caller, key)`` to a result."""

    def __init__(
        self, *, ttl_secs: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_secs
        self._max = max_entries
        self._clock = clock
        self._done: OrderedDict[Key, tuple[float, Any]] = OrderedDict()
        self._running: dict[Key, asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._done)

    def _prune(self, now: float) -> None:
        while self._done:
            key, (expires, _) = next(iter(self._done.items()))
            if expires > now and len(self._done) <= self._max:
                break
            del self._done[key]

    def forget(self, handler: str) -> None:
        """Drop every stored result of ``handler`` (after it was replaced)."""
        for key in [k for k in self._done if k[0] == handler]:
            del self._done[key]

    async def run(
        self,
        key: Key,
        factory: Callable[[], Awaitable[Any]],
        *,
        deadline: float | None = None,
    ) -> tuple[Any, bool]:
        """Return ``(result, replayed)``: the stored result, or run ``factory`` once.

        ``deadline`` (event-loop time; ``None``: no bound) bounds how long a
        duplicate waits for its running twin (``DEADLINE_EXCEEDED`` after it).
        Cancellation of a waiting duplicate does not affect the running call.
        """
        while True:
            now = self._clock()
            self._prune(now)
            stored = self._done.get(key)
            if stored is not None:
                return stored[1], True
            running = self._running.get(key)
            if running is None:
                break
            try:
                async with asyncio.timeout_at(deadline):
                    return await asyncio.shield(running), True
            except _Abandoned:
                continue
            except TimeoutError:
                raise DeadlineExceeded(
                    "a duplicate of this call (same idempotency key) was still running "
                    "when the deadline passed",
                    details={"reason": "timeout"},
                ) from None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)
        self._running[key] = fut
        try:
            value = await factory()
        except asyncio.CancelledError:
            fut.set_exception(_Abandoned())
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        else:
            fut.set_result(value)
            self._done[key] = (self._clock() + self._ttl, value)
            self._prune(self._clock())
            return value, False
        finally:
            if self._running.get(key) is fut:
                del self._running[key]


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
