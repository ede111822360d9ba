"""PilotRemoteRunnable: a LangChain Runnable whose work runs on a remote worker.

Theory of operation
-------------------
``ainvoke`` validates the input (``input_model``), encodes it with
:class:`~pilot_langgraph._codec.LangGraphCodec`, and calls the handler named
``node`` on one of ``peer``. Attempts walk the peers in round-robin order
starting after the last peer used, healthy peers first; a peer that failed
with ``UNAVAILABLE`` is skipped for a short cool-down. An attempt that fails
with ``UNAVAILABLE`` (or ``RESOURCE_EXHAUSTED`` when another peer exists)
moves on to the next peer at once; after every peer was tried, attempts back
off exponentially. Every attempt of one invocation carries the same
idempotency key: LangGraph's stable task id plus the graph node, the remote
node and the fan-out label, so a handler that honours the key (or is declared
``idempotent=True`` on the worker) runs its side effect once.

Callbacks, tags, metadata and run names follow LangChain's rules because the
calls are wrapped in a chain run (``_callbacks.run_as_chain``, and
``Runnable._atransform_stream_with_config`` for streams). Every call carries
the caller's serializable config in the ``langgraph-config`` header
(:class:`~pilot_langgraph._link.CallerLink`); a worker running
:class:`~pilot_langgraph.LangGraphMiddleware` answers with control messages
beside the result: callback events of the handler's runs (replayed into the
caller's handlers under this chain run), custom stream writes, interrupt
bookkeeping, and an interrupt as the reply (raised as ``GraphInterrupt``).
Inside a LangGraph node, everything received calls ``runtime.heartbeat()``
(idle timeouts stay alive); stream chunks and ``ctx.report_progress`` values
go to ``runtime.stream_writer`` (``stream_mode="custom"``). Cancelling the
awaiting task cancels the remote call.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForChainRun
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config
from langchain_core.utils.pydantic import TypeBaseModel
from opentelemetry import propagate as otel_propagate
from opentelemetry import trace as otel_trace

from pilot_langgraph import _rpc, _runtime
from pilot_langgraph._callbacks import run_as_chain
from pilot_langgraph._codec import ControlMessage, LangGraphCodec
from pilot_langgraph._env import DEFAULT_PORT
from pilot_langgraph._headers import (
    CONFIG_HEADER,
    FANOUT_LABEL_HEADER,
    NODE_HEADER,
    TASK_ID_HEADER,
    THREAD_ID_HEADER,
)
from pilot_langgraph._link import CallerLink
from pilot_langgraph.errors import (
    PilotRemoteError,
    PilotUsageError,
    RemoteInvalidArgumentError,
    RemoteResourceExhaustedError,
    RemoteUnavailableError,
)

if TYPE_CHECKING:
    from pilot_rpc import PilotClient, TransportLike
    from pydantic import BaseModel

__all__ = ["PilotRemoteRunnable", "RemoteCallOptions"]

# LangGraph's reserved configurable key holding the stable task id.
_CONFIG_KEY_TASK_ID = "__pregel_task_id"
_CONFIG_KEY_RUNTIME = "__pregel_runtime"
# Set by PilotFanoutRunnable so each target of one task gets its own key.
CONFIG_KEY_FANOUT_LABEL = "__pilot_fanout_label"

_PEER_COOLDOWN_SECS = 2.0
_SHARED_CODEC = LangGraphCodec()


@dataclass(frozen=True, kw_only=True)
class RemoteCallOptions:
    """Validated options of a :class:`PilotRemoteRunnable` (see its docstring)."""

    node: str
    peers: tuple[str, ...]
    port: int = DEFAULT_PORT
    timeout_secs: float | None = 60.0
    max_retries: int = 2
    retry_backoff_secs: float = 0.1
    streaming: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not self.node:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise PilotUsageError("node must be a non-empty handler name")
        if not self.peers or not all(isinstance(p, str) and p for p in self.peers):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise PilotUsageError("peer must be a non-empty name or a non-empty list of names")
        if len(set(self.peers)) != len(self.peers):
            raise PilotUsageError(f"peer lists a peer twice: {list(self.peers)!r}")
        if isinstance(self.port, bool) or not 0 < self.port < 65536:
            raise PilotUsageError(f"port must be in 1..65535, got {self.port!r}")
        if self.timeout_secs is not None and not self.timeout_secs > 0:
            raise PilotUsageError(f"timeout_secs must be > 0 or None, got {self.timeout_secs!r}")
        if isinstance(self.max_retries, bool) or not 0 <= self.max_retries <= 100:
            raise PilotUsageError(f"max_retries must be in 0..100, got {self.max_retries!r}")
        if not self.retry_backoff_secs >= 0:
            raise PilotUsageError(
                f"retry_backoff_secs must be >= 0, got {self.retry_backoff_secs!r}"
            )


class _PeerRing:
    """Round-robin over peers, preferring those not recently unavailable."""

    def __init__(self, peers: tuple[str, ...]) -> None:
        self._peers = peers
        self._next = 0
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self._peers)
        rotated = [self._peers[(start + i) % len(self._peers)] for i in range(len(self._peers))]
        now = time.monotonic()
        healthy = [p for p in rotated if self._down_until.get(p, 0.0) <= now]
        return healthy + [p for p in rotated if p not in healthy]

    def mark_down(self, peer: str) -> None:
        self._down_until[peer] = time.monotonic() + _PEER_COOLDOWN_SECS

    def mark_up(self, peer: str) -> None:
        self._down_until.pop(peer, None)


class _CallKeys:
    """Unique keys for calls made outside a LangGraph task (no stable task id).

    A random prefix per process (renewed in a forked child) and a counter:
    as unique as a fresh UUID per call, without reading the OS random source
    on every call.
    """

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self._prefix = f"call-{uuid.uuid4().hex}-"
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


_fresh_call_key = _CallKeys()


def _traceparent() -> str | None:
    """W3C trace context of the current OpenTelemetry span, if one is recording."""
    if not otel_trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    otel_propagate.inject(carrier)
    return carrier.get("traceparent")


def _langgraph_runtime(config: RunnableConfig) -> Any:
    return (config.get("configurable") or {}).get(_CONFIG_KEY_RUNTIME)


def _run_id(config: RunnableConfig) -> Any:
    """The caller's run of this node: the chain run's id when callbacks run, else config's."""
    callbacks = config.get("callbacks")
    parent = getattr(callbacks, "parent_run_id", None)
    return parent if parent is not None else config.get("run_id")


def _aggregate(chunks: Sequence[Any]) -> Any:
    """Add chunks like LangChain does for streamed output (last chunk if not addable)."""
    final: Any = None
    addable = True
    for chunk in chunks:
        if final is None:
            final = chunk
        elif addable:
            try:
                final = final + chunk
            except TypeError:
                final = chunk
                addable = False
        else:
            final = chunk
    return final


class PilotRemoteRunnable(Runnable[Any, Any]):
    """Run a LangGraph node (or any Runnable step) on a remote pilot worker.

    Args:
        node: Name of the ``@pilot_handler`` on the worker.
        peer: One peer (trust-store name, node id or Pilot address) or several;
            with several, calls spread over the healthy ones and fail over.
        port: Virtual port of the worker (default 5000).
        timeout_secs: Deadline of each attempt in seconds (``None``: no deadline).
        max_attempts: Total attempts of one call, the first included (default 3),
            over the peers in turn after an ``UNAVAILABLE`` failure. The name
            every retry setting of langgraph-pilot uses.
        max_retries: The same count as extra attempts (``max_attempts - 1``);
            kept for existing code, give one of the two.
        retry_backoff_secs: First back-off once every peer was tried (doubles).
        input_model: Pydantic model the input is validated against before sending;
            the validated model is sent as a plain mapping.
        output_model: Pydantic model the result is validated into (returned as
            the model instance).
        client: The :class:`pilot_rpc.PilotClient` to call through; ``None`` shares
            the process-wide default client (configured from ``PILOT_*`` variables;
            see ``configure_default_transport``) with the saver and event sources.
        transport: An open pilot transport to call through instead (wrapped in
            one ``PilotClient`` per transport); give ``client=`` or this, not both.
        streaming: The handler is an async generator: ``astream`` yields its items,
            and ``ainvoke`` writes them to the graph's custom stream and returns
            them added together (LangChain's rule; the last item if not addable).
        codec: The LangGraph codec (default: LangGraph's safe types plus imported
            pydantic models, dataclasses, named tuples and enums).
        name: Run name shown in callbacks and traces (default ``Pilot:<node>``).

    Raises:
        PilotUsageError: at construction, for an invalid option.

    ``ainvoke``/``invoke`` raise :class:`~pilot_langgraph.errors.PilotRemoteError`
    subclasses for remote failures, :class:`~pilot_langgraph.errors.PilotEncodeError`
    for a value that cannot be sent. Repeating a call is safe when the handler
    is idempotent; retries inside one call always reuse the same idempotency key.
    Cancelling ``ainvoke`` cancels the remote handler.
    """

    _rings: ClassVar[dict[tuple[str, ...], _PeerRing]] = {}
    _rings_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        *,
        node: str,
        peer: str | Sequence[str],
        port: int = DEFAULT_PORT,
        timeout_secs: float | None = 60.0,
        max_retries: int = 2,
        retry_backoff_secs: float = 0.1,
        input_model: type[BaseModel] | None = None,
        output_model: type[BaseModel] | None = None,
        transport: TransportLike | None = None,
        streaming: bool = False,
        codec: LangGraphCodec | None = None,
        name: str | None = None,
        client: PilotClient | None = None,
        max_attempts: int | None = None,
    ) -> None:
        peers = (peer,) if isinstance(peer, str) else tuple(peer)
        if max_attempts is not None:
            if max_retries != 2:
                raise PilotUsageError("give max_attempts or max_retries, not both")
            if isinstance(max_attempts, bool) or not 1 <= max_attempts <= 101:
                raise PilotUsageError(f"max_attempts must be in 1..101, got {max_attempts!r}")
            max_retries = max_attempts - 1
        self.options = RemoteCallOptions(
            node=node,
            peers=peers,
            port=port,
            timeout_secs=timeout_secs,
            max_retries=max_retries,
            retry_backoff_secs=retry_backoff_secs,
            streaming=streaming,
        )
        self.input_model = input_model
        self.output_model = output_model
        self.transport = transport
        self.client = _runtime.client_for(client, transport)
        """The explicit client (``None``: the shared default, resolved at each call)."""
        self.codec = codec or (
            LangGraphCodec(allowed_types=[output_model]) if output_model else _SHARED_CODEC
        )
        self.name = name or f"Pilot:{node}"
        with self._rings_lock:
            ring = self._rings.get(peers)
            if ring is None:
                ring = self._rings[peers] = _PeerRing(peers)
        self._ring = ring

    # -- convenience ---------------------------------------------------------

    @property
    def node(self) -> str:
        return self.options.node

    @property
    def peers(self) -> tuple[str, ...]:
        return self.options.peers

    @property
    def max_attempts(self) -> int:
        """Total attempts of one call (``1 + options.max_retries``)."""
        return 1 + self.options.max_retries

    def __repr__(self) -> str:
        peer = self.peers[0] if len(self.peers) == 1 else list(self.peers)
        return f"PilotRemoteRunnable(node={self.node!r}, peer={peer!r}, port={self.options.port})"

    # -- LangChain Runnable interface ---------------------------------------

    def get_input_schema(self, config: RunnableConfig | None = None) -> TypeBaseModel:
        """``input_model`` when given (so tools and servers can describe the node)."""
        if self.input_model is not None:
            return self.input_model
        return super().get_input_schema(config)

    def get_output_schema(self, config: RunnableConfig | None = None) -> TypeBaseModel:
        """``output_model`` when given."""
        if self.output_model is not None:
            return self.output_model
        return super().get_output_schema(config)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        del kwargs
        return await run_as_chain(
            self.get_name(), input, ensure_config(config), lambda c: self._ainvoke(input, c)
        )

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return _runtime.run_sync(lambda: self.ainvoke(input, config, **kwargs), client=self.client)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any | None
    ) -> AsyncIterator[Any]:
        if not self.options.streaming:
            yield await self.ainvoke(input, config, **kwargs)
            return

        async def one() -> AsyncIterator[Any]:
            yield input

        async for chunk in self._atransform_stream_with_config(
            one(), self._astream_transform, ensure_config(config), **kwargs
        ):
            yield chunk

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any | None
    ) -> Iterator[Any]:
        return _runtime.run_sync_iter(
            lambda: self.astream(input, config, **kwargs), client=self.client
        )

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any | None,
    ) -> list[Any]:
        return _runtime.run_sync(
            lambda: self.abatch(inputs, config, return_exceptions=return_exceptions, **kwargs),
            client=self.client,
        )

    # -- implementation ------------------------------------------------------

    def _prepare_input(self, value: Any) -> Any:
        if self.input_model is None:
            return value
        from pydantic import ValidationError

        try:
            model = (
                value
                if isinstance(value, self.input_model)
                else self.input_model.model_validate(value)
            )
        except ValidationError as exc:
            raise RemoteInvalidArgumentError(
                f"input does not match {self.input_model.__name__}: {exc}",
                peer=None,
                node=self.node,
                details={"validation": "caller"},
            ) from exc
        return model.model_dump(mode="python")

    def _finish_output(self, value: Any, peer: str) -> Any:
        if self.output_model is None:
            return value
        from pydantic import ValidationError

        try:
            return self.output_model.model_validate(value)
        except ValidationError as exc:
            raise RemoteInvalidArgumentError(
                f"output of {self.node} does not match {self.output_model.__name__}: {exc}",
                peer=peer,
                node=self.node,
                details={"validation": "caller-output"},
            ) from exc

    def _call_identity(self, config: RunnableConfig) -> tuple[str, dict[str, str]]:
        configurable = config.get("configurable") or {}
        metadata = config.get("metadata") or {}
        task_id = configurable.get(_CONFIG_KEY_TASK_ID)
        graph_node = metadata.get("langgraph_node")
        label = configurable.get(CONFIG_KEY_FANOUT_LABEL)
        headers: dict[str, str] = {}
        if task_id is not None:
            parts = [str(task_id), str(graph_node or ""), self.node]
            headers[TASK_ID_HEADER] = str(task_id)
        else:
            parts = [_fresh_call_key(), self.node]
        if graph_node is not None:
            headers[NODE_HEADER] = str(graph_node)
        if (thread_id := configurable.get("thread_id")) is not None:
            headers[THREAD_ID_HEADER] = str(thread_id)
        if label is not None:
            parts.append(str(label))
            headers[FANOUT_LABEL_HEADER] = str(label)
        return "/".join(parts), headers

    def _attempt_plan(self) -> list[str]:
        order = self._ring.order()
        attempts = 1 + self.options.max_retries
        return [order[i % len(order)] for i in range(attempts)]

    async def _backoff(self, attempt: int, tried: set[str], next_peer: str) -> None:
        if next_peer not in tried or self.options.retry_backoff_secs == 0:
            return
        rounds = max(1, attempt // len(self.peers))
        delay = self.options.retry_backoff_secs * (2 ** (rounds - 1))
        await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))

    def _retryable(self, exc: PilotRemoteError) -> bool:
        if isinstance(exc, RemoteUnavailableError):
            return True
        return isinstance(exc, RemoteResourceExhaustedError) and len(self.peers) > 1

    def _link(self, config: RunnableConfig, headers: dict[str, str]) -> CallerLink:
        link = CallerLink(
            self.codec,
            self.node,
            config,
            run_name=config.get("run_name") or self.get_name(),
            run_id=_run_id(config),
        )
        headers[CONFIG_HEADER] = link.header
        return link

    async def _ainvoke(self, input: Any, config: RunnableConfig) -> Any:
        if self.options.streaming:
            chunks: list[Any] = []
            async for chunk in self._stream_with_retries(input, config):
                chunks.append(chunk)
            return _aggregate(chunks)
        payload = self.codec.encode(self._prepare_input(input), root="input")
        key, headers = self._call_identity(config)
        link = self._link(config, headers)
        if link.resume_count:
            key = f"{key}/resume-{link.resume_count}"
        client = await _runtime.get_client(self.client)
        traceparent = _traceparent()
        tried: set[str] = set()
        last: PilotRemoteError | None = None
        for attempt, peer in enumerate(self._attempt_plan()):
            if attempt:
                await self._backoff(attempt, tried, peer)
            tried.add(peer)
            try:
                reply = await _rpc.call_unary(
                    client,
                    peer=peer,
                    port=self.options.port,
                    node=self.node,
                    payload=payload,
                    timeout=self.options.timeout_secs,
                    metadata=headers,
                    idempotency_key=key,
                    traceparent=traceparent,
                    on_progress=link.on_progress,
                )
            except PilotRemoteError as exc:
                if not self._retryable(exc):
                    raise
                self._ring.mark_down(peer)
                last = exc
                continue
            self._ring.mark_up(peer)
            return self._finish_output(link.result(self.codec.decode_reply(reply)), peer)
        assert last is not None
        raise last

    async def _astream_transform(
        self,
        inputs: AsyncIterator[Any],
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        del run_manager, kwargs
        value: Any = None
        async for item in inputs:
            value = item
        async for chunk in self._stream_with_retries(value, config):
            yield chunk

    async def _stream_with_retries(self, input: Any, config: RunnableConfig) -> AsyncIterator[Any]:
        payload = self.codec.encode(self._prepare_input(input), root="input")
        key, headers = self._call_identity(config)
        link = self._link(config, headers)
        if link.resume_count:
            key = f"{key}/resume-{link.resume_count}"
        writer = getattr(_langgraph_runtime(config), "stream_writer", None)
        client = await _runtime.get_client(self.client)
        traceparent = _traceparent()
        tried: set[str] = set()
        last: PilotRemoteError | None = None
        for attempt, peer in enumerate(self._attempt_plan()):
            if attempt:
                await self._backoff(attempt, tried, peer)
            tried.add(peer)
            started = False
            try:
                async with _rpc.call_streaming(
                    client,
                    peer=peer,
                    port=self.options.port,
                    node=self.node,
                    payload=payload,
                    timeout=self.options.timeout_secs,
                    metadata=headers,
                    idempotency_key=key,
                    traceparent=traceparent,
                ) as items:
                    async for raw in items:
                        started = True
                        link.heartbeat()
                        value = self.codec.decode_reply(raw)
                        if isinstance(value, ControlMessage):
                            await link.on_control(value)
                            continue
                        chunk = self._finish_output(value, peer)
                        if writer is not None:
                            writer(chunk)
                        yield chunk
            except PilotRemoteError as exc:
                # Once a chunk was delivered a retry would repeat it: not retried.
                if started or not self._retryable(exc):
                    raise
                self._ring.mark_down(peer)
                last = exc
                continue
            self._ring.mark_up(peer)
            return
        assert last is not None
        raise last

    # -- discovery -----------------------------------------------------------

    @classmethod
    async def adiscover(
        cls,
        peer: str,
        *,
        port: int = DEFAULT_PORT,
        transport: TransportLike | None = None,
        timeout_secs: float = 10.0,
        client: PilotClient | None = None,
    ) -> dict[str, PilotRemoteRunnable]:
        """Build one runnable per handler the worker at ``peer`` serves.

        Calls the worker's built-in ``_handlers``; streaming handlers get
        ``streaming=True``. Built-in handlers (names starting with ``_``) are left out.

        Raises:
            PilotRemoteError: the worker could not be reached or refused the call.
        """
        from pilot_langgraph._discover import describe_handlers

        client = _runtime.client_for(client, transport)
        handlers = await describe_handlers(
            peer, port=port, client=client, timeout_secs=timeout_secs
        )
        return {
            h.name: cls(
                node=h.name,
                peer=peer,
                port=port,
                client=client,
                streaming=h.streaming,
                timeout_secs=h.timeout_secs if h.timeout_secs else 60.0,
            )
            for h in handlers
            if not h.name.startswith("_")
        }
