"""Stopping owned tasks: bounded, errors consumed, the caller's cancellation kept."""

from __future__ import annotations

import asyncio
import logging

import pytest
from pilot_node._aio import cancel_and_wait


async def test_cancelled_tasks_are_awaited_and_their_errors_consumed() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("while stopping")

    sleeper = asyncio.create_task(asyncio.Event().wait())
    failing = asyncio.create_task(fails_when_cancelled())
    await asyncio.sleep(0)
    await cancel_and_wait([sleeper, failing], "test")
    assert sleeper.cancelled()
    assert failing.done()
    assert isinstance(failing.exception(), RuntimeError)


async def test_a_task_that_ignores_cancellation_does_not_hang_the_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # the bug this bound protects against

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="pilot_node"):
        await cancel_and_wait([task], "stubborn", grace=0.05)
    assert not task.done()
    assert "still running" in caplog.text
    release.set()
    await task


async def test_cancelling_the_caller_propagates() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    closer = asyncio.create_task(cancel_and_wait([task], "stubborn", grace=60))
    await asyncio.sleep(0.01)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    release.set()
    await task
