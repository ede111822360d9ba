"""PilotFanoutRunnable: one input to many targets at once, labelled results."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import AsyncCallbackManagerForChainRun
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config, patch_config

from pilot_langgraph import _runtime
from pilot_langgraph._callbacks import run_as_chain
from pilot_langgraph._remote import CONFIG_KEY_FANOUT_LABEL, PilotRemoteRunnable
from pilot_langgraph.errors import PilotUsageError

if TYPE_CHECKING:
    from pilot_rpc import PilotClient

__all__ = ["PilotFanoutRunnable"]

_TASK_ID_KEY = "__pregel_task_id"


def _build_target(label: str, spec: Any, client: PilotClient | None) -> Runnable[Any, Any]:
    if isinstance(spec, Runnable):
        return spec  # pyright: ignore[reportUnknownVariableType]
    if isinstance(spec, Mapping):
        kwargs: dict[str, Any] = dict(spec)  # pyright: ignore[reportUnknownArgumentType]
        if client is not None and "client" not in kwargs and "transport" not in kwargs:
            kwargs["client"] = client
        try:
            return PilotRemoteRunnable(**kwargs)
        except TypeError as exc:
            raise PilotUsageError(f"fan-out target {label!r}: {exc}") from exc
    raise PilotUsageError(
        f"fan-out target {label!r} must be a Runnable or PilotRemoteRunnable keyword "
        f"arguments, got {type(spec).__name__}"
    )


class PilotFanoutRunnable(Runnable[Any, Any]):
    """Send one input to several targets in parallel; results come back labelled.

    Args:
        targets: ``{label: runnable}`` or ``{label: {PilotRemoteRunnable kwargs}}``.
        return_exceptions: With True a failed target's exception is its result;
            with False (default) the first failure cancels the other targets and
            is raised.
        client: The :class:`pilot_rpc.PilotClient` for targets given as keyword
            arguments and for sync calls (default: the first remote target's
            client, else the shared default client).

    ``ainvoke`` returns ``{label: result}`` (labels in the order given), which as
    a LangGraph node is a state update with one key per label. ``astream`` yields
    ``(label, result)`` pairs as each target finishes (as a graph node driven by
    ``astream_events``, it yields the labelled dict once). Each target's call gets its
    own idempotency key (the label is part of it). Cancelling the fan-out cancels
    every remote call still running.

    Raises:
        PilotUsageError: at construction, for no targets, a bad label or target.
    """

    def __init__(
        self,
        targets: Mapping[str, Runnable[Any, Any] | Mapping[str, Any]],
        *,
        return_exceptions: bool = False,
        name: str | None = None,
        client: PilotClient | None = None,
    ) -> None:
        if not targets:
            raise PilotUsageError("PilotFanoutRunnable needs at least one target")
        self.client = _runtime.client_for(client, None)
        built: dict[str, Runnable[Any, Any]] = {}
        for label, spec in targets.items():
            if not isinstance(label, str) or not label:  # pyright: ignore[reportUnnecessaryIsInstance]
                raise PilotUsageError(f"fan-out labels must be non-empty strings, got {label!r}")
            built[label] = _build_target(label, spec, client)
        self.targets: Mapping[str, Runnable[Any, Any]] = built
        self.return_exceptions = return_exceptions
        self.name = name or "PilotFanout"

    def __repr__(self) -> str:
        return f"PilotFanoutRunnable({dict(self.targets)!r})"

    def _client(self) -> PilotClient | None:
        if self.client is not None:
            return self.client
        for target in self.targets.values():
            if isinstance(target, PilotRemoteRunnable) and target.client is not None:
                return target.client
        return None

    @staticmethod
    def _child_config(config: RunnableConfig, label: str) -> RunnableConfig:
        child = patch_config(config)
        child["configurable"] = {
            **(config.get("configurable") or {}),
            CONFIG_KEY_FANOUT_LABEL: label,
        }
        child["tags"] = [*(config.get("tags") or []), f"fanout:{label}"]
        return child

    async def _as_completed(
        self, input: Any, config: RunnableConfig
    ) -> AsyncIterator[tuple[str, Any]]:
        async def run(label: str, target: Runnable[Any, Any]) -> tuple[str, Any]:
            try:
                result = await target.ainvoke(input, self._child_config(config, label))
            except Exception as exc:
                if not self.return_exceptions:
                    raise
                return label, exc
            return label, result

        tasks = [asyncio.ensure_future(run(label, t)) for label, t in self.targets.items()]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            pending = [t for t in tasks if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _ainvoke(self, input: Any, config: RunnableConfig) -> dict[str, Any]:
        results: dict[str, Any] = {}
        async for label, result in self._as_completed(input, config):
            results[label] = result
        return {label: results[label] for label in self.targets}

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        del kwargs
        return await run_as_chain(
            self.get_name(), input, ensure_config(config), lambda c: self._ainvoke(input, c)
        )

    def invoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        return _runtime.run_sync(
            lambda: self.ainvoke(input, config, **kwargs), client=self._client()
        )

    async def _astream_transform(
        self,
        inputs: AsyncIterator[Any],
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> AsyncIterator[Any]:
        value: Any = None
        async for item in inputs:
            value = item
        if _TASK_ID_KEY in (config.get("configurable") or {}):
            # Running as a LangGraph node (astream_events/astream_log drive nodes with
            # astream and keep the last chunk as the node's output): one chunk, the update.
            results = dict([pair async for pair in self._as_completed(value, config)])
            yield {label: results[label] for label in self.targets}
            return
        async for pair in self._as_completed(value, config):
            yield pair

    async def astream(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any | None
    ) -> AsyncIterator[tuple[str, Any]]:
        """Yield ``(label, result)`` as each target finishes."""
        del kwargs

        async def one() -> AsyncIterator[Any]:
            yield input

        async for pair in self._atransform_stream_with_config(
            one(), self._astream_transform, ensure_config(config)
        ):
            yield pair

    def stream(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any | None
    ) -> Iterator[tuple[str, Any]]:
        return _runtime.run_sync_iter(
            lambda: self.astream(input, config, **kwargs), client=self._client()
        )
