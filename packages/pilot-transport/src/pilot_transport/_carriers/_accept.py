"""A bounded queue of inbound streams that a listener's ``accept`` waits on."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

from pilot_transport.errors import ListenerClosedError

__all__ = ["AcceptQueue"]

T = TypeVar("T")


class AcceptQueue(Generic[T]):
    """Bounded FIFO with a cancellable ``get`` and a ``close`` that wakes every waiter.

    Items are never handed to a waiter's future, so a cancelled ``get`` loses nothing.
    """

    def __init__(self, maxsize: int, what: str) -> None:
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._what = what

    @property
    def closed(self) -> bool:
        return self._closed

    def put_nowait(self, item: T) -> bool:
        """Queue ``item``; ``False`` if the queue is full or closed (the caller drops it)."""
        if self._closed or len(self._items) >= self._maxsize:
            return False
        self._items.append(item)
        self._wake_one()
        return True

    async def get(self) -> T:
        """The oldest item, waiting for one.

        Raises:
            ListenerClosedError: the queue was closed (now or while waiting).
        """
        while not self._items:
            if self._closed:
                raise ListenerClosedError(f"{self._what} is closed")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # Pass a wake-up we may have consumed on to the next waiter.
                if waiter.done() and not waiter.cancelled() and self._items:
                    self._wake_one()
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if self._closed:
            raise ListenerClosedError(f"{self._what} is closed")
        return self._items.popleft()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> list[T]:
        """Close; wake every waiter; return the items nobody accepted (to be closed)."""
        self._closed = True
        items = list(self._items)
        self._items.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        return items
