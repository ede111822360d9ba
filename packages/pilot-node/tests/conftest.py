"""Shared fixtures of pilot-node's tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

WaitFor = Callable[..., Awaitable[None]]


async def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def wait_for() -> WaitFor:
    """``await wait_for(predicate, what, timeout=10.0)``: poll until true, else fail."""
    return _wait_for
