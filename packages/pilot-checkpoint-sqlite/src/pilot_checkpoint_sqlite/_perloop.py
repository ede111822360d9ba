"""One backend per calling event loop, so async calls never hop threads.

A network backend lives on one event loop. Handing every async call over to the
saver's private loop costs two cross-thread wake-ups per call (a self-pipe
write and a GIL hand-over each), which measured as ~40 % of the client's CPU
under load. So the async twins use a backend opened on the caller's own loop
(created lazily on first use), while sync calls keep using the private loop.

Cleanup: with each per-loop backend the saver starts a tiny async generator on
that loop. asyncio registers it (``sys.set_asyncgen_hooks``), and when the loop
shuts down (``asyncio.run``, ``asyncio.Runner``, pytest-asyncio all call
``loop.shutdown_asyncgens()``) it is closed, and its ``finally`` closes the
backend on its own loop before the loop goes away. ``close()``/``aclose()`` of
the saver close the backends of loops still running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable

from pilot_checkpoint_sqlite._backend import CheckpointBackend
from pilot_checkpoint_sqlite.errors import StoreClosedError

logger = logging.getLogger("pilot_checkpoint_sqlite.saver")


class _Entry:
    __slots__ = ("backend", "guard", "lock")

    def __init__(self) -> None:
        self.backend: CheckpointBackend | None = None
        self.lock = asyncio.Lock()
        self.guard: AsyncGenerator[None] | None = None


class LoopBackends:
    """Backends keyed by the event loop they were opened on."""

    def __init__(self, factory: Callable[[], Awaitable[CheckpointBackend]]) -> None:
        self._factory = factory
        self._entries: dict[asyncio.AbstractEventLoop, _Entry] = {}
        self._lock = threading.Lock()
        self._closed = False

    async def get(self) -> CheckpointBackend:
        """The backend of the running loop, opened on first use."""
        loop = asyncio.get_running_loop()
        entry = self._entries.get(loop)
        if entry is None:
            with self._lock:
                if self._closed:
                    raise StoreClosedError("the checkpoint saver is closed")
                entry = self._entries.get(loop)
                fresh = entry is None
                if entry is None:
                    entry = self._entries[loop] = _Entry()
            if fresh:
                guard = self._guard(loop, entry)
                await guard.__anext__()  # registers it with this loop's asyncgen hooks
                entry.guard = guard
        if entry.backend is None:
            async with entry.lock:
                if entry.backend is None:
                    if self._closed:
                        raise StoreClosedError("the checkpoint saver is closed")
                    entry.backend = await self._factory()
        return entry.backend

    async def _guard(self, loop: asyncio.AbstractEventLoop, entry: _Entry) -> AsyncGenerator[None]:
        try:
            yield
        finally:
            with self._lock:
                if self._entries.get(loop) is entry:
                    del self._entries[loop]
            backend, entry.backend = entry.backend, None
            if backend is not None:
                try:
                    await backend.aclose()
                except Exception as exc:  # the loop is going away; nothing to report to
                    logger.debug("closing a per-loop checkpoint backend failed: %r", exc)

    def _take_all(self) -> list[tuple[asyncio.AbstractEventLoop, _Entry]]:
        with self._lock:
            self._closed = True
            entries = list(self._entries.items())
            self._entries.clear()
        return entries

    def close(self, timeout: float) -> None:
        """Close every backend whose loop still runs (from any thread but theirs)."""
        for loop, entry in self._take_all():
            guard = entry.guard
            if guard is None or loop.is_closed():
                continue
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                # Cannot block the loop we are on: close it there, soon.
                loop.create_task(guard.aclose())
                continue
            done = asyncio.run_coroutine_threadsafe(guard.aclose(), loop)
            with contextlib.suppress(concurrent.futures.TimeoutError, Exception):
                done.result(timeout)

    async def aclose(self, grace: float) -> None:
        """Async twin of :meth:`close` (closes the current loop's backend in place)."""
        current = asyncio.get_running_loop()
        others: list[tuple[asyncio.AbstractEventLoop, _Entry]] = []
        for loop, entry in self._take_all():
            if loop is current and entry.guard is not None:
                with contextlib.suppress(Exception):
                    await entry.guard.aclose()
            else:
                others.append((loop, entry))
        for loop, entry in others:
            if entry.guard is None or loop.is_closed():
                continue
            done = asyncio.run_coroutine_threadsafe(entry.guard.aclose(), loop)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.wrap_future(done), grace)
