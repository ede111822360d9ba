"""Stopping owned background tasks never swallows the caller's cancellation."""

from __future__ import annotations

import asyncio

import pytest
from pilot_channels._tasks import cancel_and_wait


async def test_cancel_and_wait_returns_once_the_task_has_ended() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(forever())
    await started.wait()
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_cancel_and_wait_reraises_a_cancellation_aimed_at_the_caller() -> None:
    release = asyncio.Event()
    waiting = asyncio.Event()
    cleaning = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            waiting.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await release.wait()  # cleanup that takes a while
            raise

    worker = asyncio.create_task(slow_to_stop())
    await waiting.wait()

    closer = asyncio.create_task(cancel_and_wait(worker))
    await cleaning.wait()
    closer.cancel()  # whoever called close() is itself cancelled
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert closer.cancelled()
    assert worker.done()
