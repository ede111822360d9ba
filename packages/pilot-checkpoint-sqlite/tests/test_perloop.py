"""Per-loop backends: opened lazily on each calling loop, closed when that loop shuts down."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from pilot_checkpoint_sqlite._perloop import LoopBackends
from pilot_checkpoint_sqlite.errors import StoreClosedError


class _Backend:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.closed_on: asyncio.AbstractEventLoop | None = None

    async def call(
        self, method: str, payload: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Any:
        assert asyncio.get_running_loop() is self.loop
        return method

    async def aclose(self) -> None:
        self.closed_on = asyncio.get_running_loop()


def _factory(made: list[_Backend]) -> Any:
    async def make() -> _Backend:
        backend = _Backend(asyncio.get_running_loop())
        made.append(backend)
        return backend

    return make


def test_each_loop_gets_its_own_backend_closed_at_loop_shutdown() -> None:
    made: list[_Backend] = []
    backends = LoopBackends(_factory(made))

    async def use() -> Any:
        first = await backends.get()
        again = await asyncio.gather(*(backends.get() for _ in range(10)))
        assert all(b is first for b in again)
        return await first.call("ping", {})

    assert asyncio.run(use()) == "ping"
    assert asyncio.run(use()) == "ping"
    assert len(made) == 2
    assert made[0].loop is not made[1].loop
    # asyncio.run shut each loop down, which closed its backend on that loop.
    assert made[0].closed_on is made[0].loop
    assert made[1].closed_on is made[1].loop
    backends.close(5.0)


def test_close_reaches_a_loop_still_running_in_another_thread() -> None:
    made: list[_Backend] = []
    backends = LoopBackends(_factory(made))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(backends.get(), loop).result(10)
        backends.close(10.0)
        assert made[0].closed_on is loop
        with pytest.raises(StoreClosedError):
            asyncio.run_coroutine_threadsafe(backends.get(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def test_aclose_closes_the_current_loops_backend_in_place() -> None:
    made: list[_Backend] = []
    backends = LoopBackends(_factory(made))
    await backends.get()
    await backends.aclose(5.0)
    assert made[0].closed_on is asyncio.get_running_loop()
    with pytest.raises(StoreClosedError):
        await backends.get()
