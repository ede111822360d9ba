"""A private event loop on a background thread, owned by one saver.

LangGraph calls a checkpointer's sync methods from plain sync code and from its
own worker threads, where no event loop runs; it calls the async twins from
whatever loop the graph runs on, and a test suite may run each test on a fresh
loop. The network client of the saver lives on exactly one loop: this one. It
starts lazily on first use and stops in :meth:`LoopThread.stop`.

* ``run_sync`` (any thread but the loop's own) submits a coroutine and waits
  for its result with a timeout.
* ``run_async`` (any loop) awaits the coroutine directly when already on the
  private loop, otherwise hands it over and awaits the result; cancelling the
  awaiting task cancels the coroutine on the private loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from pilot_checkpoint_sqlite.errors import (
    CheckpointUsageError,
    StoreClosedError,
    StoreTimeoutError,
)

T = TypeVar("T")


class LoopThread:
    """Owns one event loop running on one daemon thread."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The private loop, started on first access."""
        with self._lock:
            if self._closed:
                raise StoreClosedError("the checkpoint saver is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def _run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                thread = threading.Thread(target=_run, name=self._name, daemon=True)
                thread.start()
                if not started.wait(timeout=10.0):  # pragma: no cover - a stuck interpreter
                    raise StoreTimeoutError("the saver's event loop thread did not start")
                self._loop = loop
                self._thread = thread
            return self._loop

    def on_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the private loop and wait at most ``timeout`` seconds."""
        if self.on_loop_thread():
            coro.close()
            raise CheckpointUsageError(
                "sync saver methods cannot be called from the saver's own event loop thread"
            )
        try:
            loop = self.loop
        except BaseException:
            coro.close()
            raise
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise StoreTimeoutError(
                f"no reply from the checkpoint store within {timeout}s"
            ) from None
        except concurrent.futures.CancelledError:
            raise StoreClosedError("the request was cancelled (saver closing)") from None

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the private loop from any loop."""
        try:
            loop = self.loop
        except BaseException:
            coro.close()
            raise
        if asyncio.get_running_loop() is loop:
            return await coro
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        return await asyncio.wrap_future(future)

    def stop(self, cleanup: Callable[[], Awaitable[None]] | None, timeout: float) -> None:
        """Run ``cleanup`` on the loop, then stop and join it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise CheckpointUsageError("close() cannot run on the saver's own event loop thread")
        if cleanup is not None:
            done = asyncio.run_coroutine_threadsafe(_call(cleanup), loop)
            try:
                done.result(timeout)
            except concurrent.futures.TimeoutError:
                done.cancel()
            except Exception:  # noqa: S110 - closing must not fail on a dead peer
                pass
        loop.call_soon_threadsafe(_cancel_all_and_stop, loop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()


async def _call(fn: Callable[[], Awaitable[None]]) -> None:
    await fn()


def _cancel_all_and_stop(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if not tasks:
        loop.stop()
        return

    async def _drain() -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        loop.stop()

    loop.create_task(_drain())


class ForeignLoop:
    """Runs coroutines on a loop the caller owns (the one a supplied transport lives on)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise StoreClosedError("the checkpoint saver is closed")
        return self._loop

    def on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        if self.on_loop_thread():
            coro.close()
            raise CheckpointUsageError(
                "sync saver methods cannot be called on the event loop that owns the saver's "
                "transport; use the async methods (aget_tuple, aput, ...) there"
            )
        if self._closed or self._loop.is_closed():
            coro.close()
            raise StoreClosedError("the checkpoint saver is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise StoreTimeoutError(
                f"no reply from the checkpoint store within {timeout}s"
            ) from None

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        if asyncio.get_running_loop() is self.loop:
            return await coro
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return await asyncio.wrap_future(future)

    def stop(self, cleanup: Callable[[], Awaitable[None]] | None, timeout: float) -> None:
        if self._closed:
            return
        self._closed = True
        if cleanup is None or self._loop.is_closed() or self.on_loop_thread():
            return
        done = asyncio.run_coroutine_threadsafe(_call(cleanup), self._loop)
        try:
            done.result(timeout)
        except concurrent.futures.TimeoutError:
            done.cancel()
        except Exception:  # noqa: S110 - closing must not fail on a dead peer
            pass
