"""PilotEventSource: events of a pilot-channels topic as a LangGraph step."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import AsyncCallbackManagerForChainRun
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config

from pilot_langgraph import _runtime
from pilot_langgraph._env import DEFAULT_PORT
from pilot_langgraph.errors import PilotUsageError

if TYPE_CHECKING:
    from pilot_channels import SubscribeOptions
    from pilot_rpc import PilotClient, TransportLike

__all__ = ["PilotEventSource"]


class PilotEventSource(Runnable[Any, Any]):
    """Wait for events on a pilot-channels topic (the input is ignored).

    ``ainvoke`` subscribes, returns the first event, and unsubscribes;
    ``astream`` yields events as they arrive until ``max_events`` were yielded
    (``None``: until cancelled). Inside a graph a node can wait for a signal
    from other agents::

        graph.add_node("wait_for_task", PilotEventSource("tasks.>", peer="broker")
                       | (lambda event: {"task": event.payload}))

    Args:
        pattern: Topic pattern (``*`` one segment, ``>`` the rest).
        peer: The broker worker.
        port: Its virtual port (default 5000).
        max_events: Default bound for ``astream`` (``None``: unbounded).
        timeout_secs: Longest wait for each event (``None``: wait forever);
            past it pilot-channels raises ``ChannelTimeoutError``.
        payload_only: Return ``event.payload`` instead of the ``Event``.
        options: pilot-channels ``SubscribeOptions`` (queue size, durable resume...).
        client: The :class:`pilot_rpc.PilotClient` to subscribe through (default:
            the shared default client, the one remote nodes and the saver use).
        transport: An open transport instead (wrapped in one ``PilotClient``).

    Non-durable topics are at-most-once: only events published after the
    subscription is registered are seen. Cancelling unsubscribes.
    """

    def __init__(
        self,
        pattern: str,
        *,
        peer: str,
        port: int = DEFAULT_PORT,
        max_events: int | None = None,
        timeout_secs: float | None = None,
        payload_only: bool = False,
        options: SubscribeOptions | None = None,
        transport: TransportLike | None = None,
        name: str | None = None,
        client: PilotClient | None = None,
    ) -> None:
        if not pattern:
            raise PilotUsageError("pattern must be non-empty")
        if max_events is not None and max_events < 1:
            raise PilotUsageError(f"max_events must be >= 1 or None, got {max_events!r}")
        if timeout_secs is not None and not timeout_secs > 0:
            raise PilotUsageError(f"timeout_secs must be > 0 or None, got {timeout_secs!r}")
        self.pattern = pattern
        self.peer = peer
        self.port = port
        self.max_events = max_events
        self.timeout_secs = timeout_secs
        self.payload_only = payload_only
        self.options = options
        self.transport = transport
        self.client = _runtime.client_for(client, transport)
        self.name = name or f"PilotEvents:{pattern}"

    async def _events(self, limit: int | None) -> AsyncIterator[Any]:
        from pilot_channels import PilotChannel

        client = _runtime.pilot_client(self.client)
        async with PilotChannel(
            self.pattern, peer=self.peer, port=self.port, options=self.options, client=client
        ) as channel:
            async for event in channel.events(limit, timeout=self.timeout_secs):
                yield event.payload if self.payload_only else event

    async def _one(
        self, input: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig
    ) -> Any:
        del input, run_manager, config
        async for event in self._events(1):
            return event
        from pilot_channels.errors import ChannelClosedError

        raise ChannelClosedError(f"the subscription to {self.pattern!r} closed before an event")

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        del kwargs
        return await self._acall_with_config(self._one, input, ensure_config(config))

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return _runtime.run_sync(lambda: self.ainvoke(input, config, **kwargs), client=self.client)

    async def astream(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        max_events: int | None = None,
        **kwargs: Any | None,
    ) -> AsyncIterator[Any]:
        """Yield events as they arrive, at most ``max_events`` (default: the constructor's)."""
        del kwargs
        limit = max_events if max_events is not None else self.max_events

        async def one() -> AsyncIterator[Any]:
            yield input

        async def transform(
            inputs: AsyncIterator[Any],
        ) -> AsyncIterator[Any]:
            async for _ in inputs:
                pass
            async for event in self._events(limit):
                yield event

        async for event in self._atransform_stream_with_config(
            one(), transform, ensure_config(config)
        ):
            yield event

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any | None
    ) -> Iterator[Any]:
        return _runtime.run_sync_iter(
            lambda: self.astream(input, config, **kwargs), client=self.client
        )
