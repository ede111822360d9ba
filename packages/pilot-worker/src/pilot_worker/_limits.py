"""Per-handler limits: a sliding-window rate limit per caller and a concurrency gate.

Both are plain objects driven by the pipeline on the event loop; neither
starts a task. Their memory is bounded: the rate limiter keeps at most
``rate`` timestamps for at most ``max_callers`` callers (least recently seen
evicted first), and the concurrency gate queues at most ``max_queued`` waiters.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from typing import Literal

__all__ = ["ConcurrencyGate", "GateFull", "SlidingWindowLimiter"]


class SlidingWindowLimiter:
    """At most ``rate`` admissions per key in any window of ``window_secs``.

    Exact sliding log: each admitted call's time is kept until it leaves the
    window, so there is no burst at window boundaries.
    """

    def __init__(self, rate: int, window_secs: float, *, max_callers: int) -> None:
        self._rate = rate
        self._window = window_secs
        self._max_callers = max_callers
        self._log: OrderedDict[str, deque[float]] = OrderedDict()

    def try_acquire(self, key: str, now: float) -> float | None:
        """Admit a call now; return ``None``, or the seconds until one would be admitted."""
        times = self._log.get(key)
        if times is None:
            times = deque(maxlen=self._rate)
            self._log[key] = times
            while len(self._log) > self._max_callers:
                self._log.popitem(last=False)
        else:
            self._log.move_to_end(key)
        horizon = now - self._window
        while times and times[0] <= horizon:
            times.popleft()
        if len(times) < self._rate:
            times.append(now)
            return None
        return max(0.0, times[0] + self._window - now)

    @property
    def tracked_callers(self) -> int:
        return len(self._log)


class GateFull(Exception):
    """The gate is at its limit and does not (or can no longer) queue."""

    def __init__(self, reason: Literal["concurrency_limit", "queue_full"]) -> None:
        super().__init__(reason)
        self.reason = reason


class ConcurrencyGate:
    """At most ``limit`` holders at once; others are rejected or wait FIFO.

    ``acquire`` in ``"queue"`` mode waits until a slot is handed over; cancel
    it (e.g. with ``asyncio.timeout_at``) to bound the wait. A cancelled waiter
    never keeps a slot.
    """

    def __init__(
        self, limit: int, *, overflow: Literal["reject", "queue"], max_queued: int
    ) -> None:
        self._limit = limit
        self._overflow = overflow
        self._max_queued = max_queued
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def limit(self) -> int:
        return self._limit

    def try_acquire(self) -> bool:
        """Take a free slot without waiting; ``False`` if none is free."""
        if self._active < self._limit and not self._waiters:
            self._active += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting in ``"queue"`` mode.

        Raises:
            GateFull: At the limit in ``"reject"`` mode, or the queue is full.
        """
        if self._active < self._limit and not self._waiters:
            self._active += 1
            return
        if self._overflow == "reject":
            raise GateFull("concurrency_limit")
        if len(self._waiters) >= self._max_queued:
            raise GateFull("queue_full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                self.release()
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Give a slot back (to the first waiter, if any)."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes over; _active is unchanged
                return
        self._active -= 1
