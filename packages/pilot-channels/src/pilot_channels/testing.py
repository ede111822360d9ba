"""Test helpers: run channels against an in-process :class:`Broker`, no network.

``PilotChannel.with_backend(InProcessBackend(broker, node_id="n1"), "agents.>")``
and ``PilotPublisher.with_backend(...)`` behave as over a worker, including
reconnect (:meth:`InProcessBackend.break_streams` simulates a lost link and
:meth:`InProcessBackend.set_available` a broker that is down).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ._broker import Broker, Subscription
from ._errmap import to_rpc
from ._wire import METHOD_STATS, encode_events
from .errors import BrokerUnavailableError, ChannelError

__all__ = ["InProcessBackend"]


class InProcessBackend:
    """A client backend that calls a :class:`Broker` in this process.

    Args:
        broker: the broker to use.
        node_id: the node id the broker sees as the caller (for the ACL).
        batch: largest batch per stream item.
    """

    def __init__(self, broker: Broker, *, node_id: str | None = "local", batch: int = 512) -> None:
        self.broker = broker
        self.node_id = node_id
        self.batch = batch
        self.description = "in-process broker"
        self.available = True
        self.subscribe_calls = 0
        self._live: set[Subscription] = set()
        self._broken = asyncio.Event()

    def set_available(self, available: bool) -> None:
        """While False, every call fails as if the broker were unreachable."""
        self.available = available

    def break_streams(self) -> None:
        """End every open subscription stream with a network error."""
        for sub in list(self._live):
            sub._fail(BrokerUnavailableError("link lost (simulated)"))

    def _check(self) -> None:
        if not self.available:
            raise BrokerUnavailableError("broker unreachable (simulated)")

    @asynccontextmanager
    async def subscribe(self, request: dict[str, Any]) -> AsyncGenerator[AsyncIterator[Any]]:
        self._check()
        self.subscribe_calls += 1
        try:
            sub = self.broker.subscribe(
                request["pattern"],
                node_id=self.node_id,
                queue_size=request.get("queue"),
                policy=request.get("policy"),
                after=request.get("after"),
                start=request.get("start") or "latest",
            )
        except ChannelError as exc:
            raise to_rpc(exc) from exc
        self._live.add(sub)

        async def items() -> AsyncGenerator[Any]:
            yield {"ready": {"sub": sub.id, "cursor": sub.cursor, "head": self.broker.head}}
            while True:
                try:
                    batch = await sub.next_batch(self.batch)
                except ChannelError as exc:
                    raise to_rpc(exc) from exc
                yield {"ev": encode_events(batch), "dropped": sub.dropped}

        gen = items()
        try:
            yield gen
        finally:
            self._live.discard(sub)
            sub.close()
            await gen.aclose()

    async def publish(self, events: list[list[Any]], timeout: float) -> list[int | None]:  # noqa: ASYNC109
        self._check()
        try:
            async with asyncio.timeout(timeout):
                return await self.broker.publish_many(
                    [(t, p) for t, p in events], publisher=self.node_id
                )
        except ChannelError as exc:
            raise to_rpc(exc) from exc

    async def call(self, method: str, request: Any, timeout: float) -> Any:  # noqa: ASYNC109
        self._check()
        if method == METHOD_STATS:
            return {"subscribers": len(self.broker.subscriptions), "head": self.broker.head}
        raise BrokerUnavailableError(f"unknown method {method}")

    async def aclose(self) -> None:
        return None
