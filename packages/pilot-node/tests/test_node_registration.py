"""Re-registration that hands the node a new id, with a scripted registry client.

The test rendezvous (like the real registry) gives a key back its old id, so the id
change is modelled here: the first heartbeat is refused, and the registration that
follows answers with another node id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from pilot_node import Address, Node, NodeConfig, StreamConfig
from pilot_node._registry import HandshakeInbox, Registration
from pilot_node._streams import StreamLayer
from pilot_node.errors import RegistryRefusedError

WaitFor = Callable[..., Awaitable[None]]


class ScriptedRegistry:
    """Hands out ``ids`` in turn; refuses the first heartbeat, then blocks."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.registrations = 0
        self.heartbeats = 0
        self.forever = asyncio.Event()

    async def register(
        self, listen_addr: str, *, hostname: str = "", lan_addrs: list[str] | None = None
    ) -> Registration:
        node_id = self.ids[min(self.registrations, len(self.ids) - 1)]
        self.registrations += 1
        return Registration(node_id, f"0:0000.0000.{node_id:04X}", listen_addr, hostname)

    async def heartbeat(self) -> None:
        self.heartbeats += 1
        if self.heartbeats == 1:
            raise RegistryRefusedError("unknown node")
        await self.forever.wait()

    async def set_visibility(self, public: bool) -> None:
        return None

    async def poll_handshakes(self) -> HandshakeInbox:
        await self.forever.wait()
        return HandshakeInbox()

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("new_id", [9, 5])
async def test_the_stream_layer_follows_a_node_id_the_registry_reassigns(
    new_id: int, wait_for: WaitFor
) -> None:
    config = NodeConfig(
        registry="127.0.0.1:9",
        heartbeat_interval=0.01,
        poll_interval=3600.0,
        streams=StreamConfig(keepalive_interval=7.0),
    )
    node = Node(config)
    registry = ScriptedRegistry([5, new_id])
    node.registry = registry  # type: ignore[assignment]
    async with node:
        layer = node.stream_layer
        assert isinstance(layer, StreamLayer)
        assert layer.config.keepalive_interval == 7.0
        assert layer.local_address == Address(0, 5)
        await wait_for(lambda: registry.registrations == 2, "the re-registration")
        assert node.node_id == new_id
        assert node.address == Address(0, new_id)
        assert layer.local_address == Address(0, new_id)
        assert node.stats.get("node_id_changes", 0) == (1 if new_id != 5 else 0)
