"""Node lifecycle errors that need no network: bad configuration, no registry, use when closed."""

from __future__ import annotations

import asyncio

import pytest
from pilot_node import (
    Node,
    NodeClosedError,
    NodeConfig,
    PilotNodeError,
    RegistryUnavailableError,
)


async def closed_port() -> int:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(probe.sockets[0].getsockname()[1])
    probe.close()
    await probe.wait_closed()
    return port


@pytest.mark.parametrize(
    "config",
    [
        NodeConfig(registry="nowhere"),
        NodeConfig(registry="127.0.0.1:1", beacon="no-port"),
    ],
)
def test_bad_addresses_are_refused_at_construction(config: NodeConfig) -> None:
    with pytest.raises(PilotNodeError, match="host:port"):
        Node(config)


async def test_start_without_a_registry_fails_typed_and_leaves_nothing_running() -> None:
    node = Node(NodeConfig(registry=f"127.0.0.1:{await closed_port()}"))
    before = set(asyncio.all_tasks())
    with pytest.raises(RegistryUnavailableError):
        await node.start()
    assert set(asyncio.all_tasks()) == before
    with pytest.raises(NodeClosedError):
        await node.start()
    await node.aclose()  # safe to repeat


async def test_operations_before_start_raise_node_closed() -> None:
    node = Node(NodeConfig(registry="127.0.0.1:9"))
    with pytest.raises(NodeClosedError):
        await node.send_datagram(5, 1, b"x")
    with pytest.raises(NodeClosedError):
        await node.ping(5)
    with pytest.raises(ValueError, match="port"):
        node.on_datagram(70000, lambda d: None)
