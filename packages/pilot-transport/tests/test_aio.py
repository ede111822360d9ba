"""pilot_transport.aio: waiting for tasks never swallows the caller's own cancellation."""

from __future__ import annotations

import asyncio

import pytest
from pilot_transport.aio import aclose_quietly, cancel_and_wait, wait_ended


async def _forever(started: asyncio.Event) -> None:
    started.set()
    await asyncio.Event().wait()


async def _fail() -> None:
    raise ValueError("boom")


async def test_wait_ended_takes_no_outcome() -> None:
    failing = asyncio.create_task(_fail())
    started = asyncio.Event()
    cancelled = asyncio.create_task(_forever(started))
    await started.wait()
    cancelled.cancel()
    await wait_ended(failing, cancelled, None)
    assert failing.done()
    assert isinstance(failing.exception(), ValueError)
    assert cancelled.cancelled()


async def test_wait_ended_reraises_the_callers_cancellation_and_leaves_the_task_running() -> None:
    started = asyncio.Event()
    child = asyncio.create_task(_forever(started))
    await started.wait()
    waiting = asyncio.Event()

    async def waiter() -> None:
        waiting.set()
        await wait_ended(child)

    outer = asyncio.create_task(waiter())
    await waiting.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert not child.done()
    await cancel_and_wait(child)
    assert child.cancelled()


async def test_wait_ended_skips_the_current_task() -> None:
    async def self_wait() -> str:
        await wait_ended(asyncio.current_task())
        return "ok"

    assert await asyncio.create_task(self_wait()) == "ok"


async def test_cancel_and_wait_stops_the_task_and_returns_normally() -> None:
    started = asyncio.Event()
    child = asyncio.create_task(_forever(started))
    await started.wait()
    await cancel_and_wait(child)
    assert child.cancelled()
    await cancel_and_wait(child)  # safe to repeat


async def test_cancel_and_wait_waits_for_the_child_then_reraises_the_callers_cancellation() -> None:
    cleanup_started = asyncio.Event()
    release_cleanup = asyncio.Event()
    child_ended = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleanup_started.set()
            # The child's clean-up takes a while (a second cancel interrupts it).
            try:
                await release_cleanup.wait()
            finally:
                child_ended.set()

    child = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)

    async def stopper() -> None:
        await cancel_and_wait(child)

    outer = asyncio.create_task(stopper())
    await cleanup_started.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    # When the caller's cancellation came out, the child had ended.
    assert child_ended.is_set()
    assert child.done()


async def test_aclose_quietly_returns_errors_but_raises_the_callers_cancellation() -> None:
    async def broken() -> None:
        raise OSError("already gone")

    error = await aclose_quietly(broken())
    assert isinstance(error, OSError)
    assert await aclose_quietly(asyncio.sleep(0)) is None

    async def self_cancelled() -> None:
        raise asyncio.CancelledError  # raised by the awaited code, not aimed at the caller

    assert isinstance(await aclose_quietly(self_cancelled()), asyncio.CancelledError)

    entered = asyncio.Event()

    async def closing() -> None:
        entered.set()
        await asyncio.Event().wait()

    async def caller() -> None:
        await aclose_quietly(closing())

    task = asyncio.create_task(caller())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


def test_all_is_curated_and_documented() -> None:
    import inspect

    import pilot_transport.aio as aio

    public = {n for n, v in vars(aio).items() if not n.startswith("_") and inspect.isfunction(v)}
    assert public == set(aio.__all__)
    for name in aio.__all__:
        assert inspect.getdoc(getattr(aio, name)), name
