"""A bounded pool of daemon threads for sync handlers.

Why not ``loop.run_in_executor(ThreadPoolExecutor)``: its queue is unbounded,
and its threads are joined at interpreter exit, so a sync handler stuck past
its timeout would keep a drained worker from exiting. Here:

* at most ``max_threads`` functions run at once; :meth:`SyncPool.acquire`
  waits (cancellably, so within the call's deadline) for a free thread, so
  nothing queues without bound;
* a thread's slot is released only when the function really returns, even if
  the call that started it has already been answered with DEADLINE_EXCEEDED;
* threads are daemons, started lazily, so the process can exit after a drain
  that had to abandon a stuck sync handler.

The function runs in a copy of the caller's ``contextvars`` context, so the
current OpenTelemetry span is visible inside sync handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["SyncPool"]

_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class SyncPool:
    """Run sync callables on daemon threads, at most ``max_threads`` at once."""

    def __init__(self, max_threads: int, *, name: str = "pilot-worker-sync") -> None:
        if max_threads <= 0:
            raise ValueError("max_threads must be > 0")
        self._max = max_threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._sem: asyncio.Semaphore | None = None
        self._busy = 0
        self._closed = False
        self._idle_waiters: list[asyncio.Future[None]] = []

    @property
    def max_threads(self) -> int:
        return self._max

    @property
    def busy(self) -> int:
        """Functions currently running (including ones whose call already ended)."""
        return self._busy

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._max)
        return self._sem

    async def acquire(self) -> None:
        """Wait for a free thread. Cancellation leaves nothing acquired."""
        if self._closed:
            raise RuntimeError("sync pool is closed")
        await self._semaphore().acquire()

    def start(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Start ``fn(*args)`` on a thread; needs a prior :meth:`acquire`.

        The returned future resolves with the function's result or exception.
        Cancelling the future does not stop the thread; the slot is released
        when the function returns.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        ctx = contextvars.copy_context()
        self._busy += 1
        self._jobs.put((lambda: ctx.run(fn, *args), loop, fut))
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                self._idle += 1
                thread.start()
            self._idle -= 1
        return fut

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Acquire a thread, run ``fn(*args)`` on it and await the result.

        Cancelling this coroutine stops the wait, not the function.
        """
        await self.acquire()
        return await asyncio.shield(self.start(fn, *args))

    async def wait_idle(self) -> None:
        """Wait until no function is running. Cancellable."""
        if self._busy == 0:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._idle_waiters:
                self._idle_waiters.remove(waiter)

    def _finish(self, fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
        self._busy -= 1
        if self._sem is not None:
            self._sem.release()
        if self._busy == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, loop, fut = job
            try:
                result = fn()
            except BaseException as exc:
                outcome: tuple[bool, Any] = (False, exc)
            else:
                outcome = (True, result)
            del job, fn
            # RuntimeError: the loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._finish, fut, *outcome)
            del fut, outcome
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        """Let idle threads exit; running functions finish on their daemon threads."""
        self._closed = True
        with self._lock:
            for _ in self._threads:
                self._jobs.put(None)
