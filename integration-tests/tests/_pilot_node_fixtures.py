"""Helpers shared by the tests of our Pilot node (``pilot_node``).

``node_config`` points a :class:`~pilot_node.NodeConfig` at a registry and beacon,
``wait_for`` polls a condition until a failure bound, and ``ctl`` runs ``pilotctl``
against a Go daemon of a :class:`~_pilot_daemons.PilotNet` without blocking the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pilot_node import NodeConfig

if TYPE_CHECKING:
    from _pilot_daemons import PilotNet


def node_config_for(registry: str, beacon: str, **overrides: Any) -> NodeConfig:
    """A node configuration for tests: fast trust polling, then ``overrides``."""
    config = NodeConfig(registry=registry, beacon=beacon, poll_interval=0.2)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise AttributeError(f"NodeConfig has no field {key!r}")
        setattr(config, key, value)
    return config


def node_config(net: PilotNet, **overrides: Any) -> NodeConfig:
    """A node configuration for the registry and beacon of ``net`` (on loopback)."""
    return node_config_for(
        f"127.0.0.1:{net.registry_port}", f"127.0.0.1:{net.beacon_port}", **overrides
    )


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> None:
    """Poll ``predicate`` (plain or async) until it holds.

    Raises:
        AssertionError: still false after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def ctl(net: PilotNet, index: int, *args: str, timeout: float = 60.0) -> Any:
    """``pilotctl --json ARGS`` against daemon ``index`` of ``net``, in a thread."""
    return await asyncio.to_thread(net.ctl, index, *args, timeout=timeout)
