"""PilotRemoteGraph: a whole graph served by a worker, driven like a local one.

Theory of operation
-------------------
A worker started with ``pilot-langgraph-worker --graph NAME=module:attr`` runs
the graph with LangGraph's own Pregel loop and its own checkpointer; this
client implements LangGraph's ``PregelProtocol`` over the worker's
``lg.graph.*`` handlers (see :mod:`pilot_langgraph._graph_serving`). Values
cross the wire with :class:`~pilot_langgraph.LangGraphCodec` (no pickle).

A run streams ``(namespace, mode, chunk)`` items exactly as the served graph's
``astream`` produced them; the client shapes them the way a local graph does
(a single mode yields chunks, a list yields ``(mode, chunk)``, ``subgraphs=True``
prefixes the namespace, ``version="v2"`` yields ``StreamPart`` dicts).
Sequences inside chunks arrive as lists (msgpack has no tuples), except the
namespace, message tuples and ``__interrupt__`` values, which are rebuilt.

A run survives the loss of its worker when ``peer`` lists several workers
sharing one checkpoint store: if the stream breaks with the worker
unavailable after the run started, the run is re-issued on the next peer
with the same run id. The worker records the run id in the run's checkpoints,
so LangGraph continues from the run's last checkpoint (the original input is
ignored; with no checkpoint of the run yet it starts from that input).
Stream items equal to ones already delivered since the last root ``values``
item (the last checkpoint's state) are skipped while the re-issued stream
repeats them; see :meth:`PilotRemoteGraph.astream` for what may repeat.

Used as a node of a local parent graph, the remote run is tied to the parent
task: when the parent has a checkpointer, the remote thread id is derived from
the parent's ``thread_id`` and the task's ``checkpoint_ns`` (stable across a
resume). An interrupt inside the remote graph is re-raised in the parent with
LangGraph's own ``interrupt()``, so the parent records it like a local one.
When the parent resumes, the node runs again: the client finds the pending
interrupt on the remote thread, takes the parent's resume value from the same
``interrupt()`` call, and sends ``Command(resume=...)`` to the remote thread,
which then continues instead of restarting. A tied remote thread that already
finished returns its final state without running again.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeVar, cast

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import merge_configs, var_child_runnable_config
from langchain_core.runnables.graph import Edge as DrawableEdge
from langchain_core.runnables.graph import Graph as DrawableGraph
from langchain_core.runnables.graph import Node as DrawableNode
from langgraph.errors import GraphInterrupt
from langgraph.pregel.protocol import PregelProtocol
from langgraph.types import Command, Interrupt, StateSnapshot, StateUpdate, interrupt

from pilot_langgraph import _rpc, _runtime
from pilot_langgraph._codec import LangGraphCodec
from pilot_langgraph._env import DEFAULT_PORT
from pilot_langgraph._graph_serving import GRAPH_HANDLERS, STREAM_MODES, snapshot_from_wire
from pilot_langgraph.errors import (
    PilotUsageError,
    RemoteAbortedError,
    RemoteUnavailableError,
)

if TYPE_CHECKING:
    from pilot_rpc import PilotClient, RpcClient, TransportLike

__all__ = ["PilotRemoteGraph", "RunRejectedError"]

T = TypeVar("T")

_INTERRUPT: Final = "__interrupt__"
_NS_SEP: Final = "|"
# keys of LangGraph's task config (its own RemoteGraph reads the same keys)
_CONF: Final = "configurable"
_KEY_CHECKPOINT_NS: Final = "checkpoint_ns"
_KEY_STREAM: Final = "__pregel_stream"
_KEY_CHECKPOINTER: Final = "__pregel_checkpointer"
_KEY_SCRATCHPAD: Final = "__pregel_scratchpad"
_CONF_DROP: Final = frozenset(
    {"checkpoint_map", "checkpoint_id", "checkpoint_ns", "__pregel_task_id"}
)
_RESUMES_KEY: Final = "pilot_parent_resumes"
"""Checkpoint metadata on a tied remote thread: parent resume values already sent."""

_CODEC = LangGraphCodec()

MultitaskStrategy = Literal["reject", "enqueue", "interrupt", "rollback"]


class RunRejectedError(RemoteAbortedError):
    """The thread already has a run in progress and the strategy was ``reject``."""


class _Link:
    """The one place that reaches the RPC layer (client per loop, sync bridging)."""

    @staticmethod
    async def client(client: PilotClient | None) -> RpcClient:
        return await _runtime.get_client(client)

    @staticmethod
    def run_sync(make: Callable[[], Coroutine[Any, Any, T]], client: PilotClient | None) -> T:
        return _runtime.run_sync(make, client=client)

    @staticmethod
    def run_sync_iter(
        make: Callable[[], AsyncIterator[T]], client: PilotClient | None
    ) -> Iterator[T]:
        return _runtime.run_sync_iter(make, client=client)


def _primitive(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, uuid.UUID)):
        return str(value) if isinstance(value, uuid.UUID) else value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in cast("Mapping[Any, Any]", value).items():
            if isinstance(k, str) and (p := _primitive(v)) is not None:
                out[k] = p
        return out
    if isinstance(value, (list, tuple)):
        return [p for v in cast("Sequence[Any]", value) if (p := _primitive(v)) is not None]
    return None


def _sanitize(config: RunnableConfig) -> dict[str, Any]:
    """Only plain values of the config go to the worker (never LangGraph's internals)."""
    out: dict[str, Any] = {}
    if "recursion_limit" in config:
        out["recursion_limit"] = config["recursion_limit"]
    if "tags" in config:
        out["tags"] = [t for t in config["tags"] if isinstance(t, str)]  # pyright: ignore[reportUnnecessaryIsInstance]
    if "metadata" in config:
        out["metadata"] = _primitive(config["metadata"])
    conf = config.get(_CONF) or {}
    out[_CONF] = {
        k: p
        for k, v in conf.items()
        if k not in _CONF_DROP and not k.startswith("__") and (p := _primitive(v)) is not None
    }
    return out


def _fix_interrupts(chunk: Any) -> Any:
    if isinstance(chunk, dict) and isinstance(ints := chunk.get(_INTERRUPT), list):
        return {**cast("dict[str, Any]", chunk), _INTERRUPT: tuple(cast("list[Any]", ints))}
    return chunk


class PilotRemoteGraph(PregelProtocol[Any, Any, Any, Any]):
    """A graph served by a ``pilot-langgraph-worker --graph NAME=...``, used like a local one.

    Implements LangGraph's ``PregelProtocol``: ``invoke``/``ainvoke``,
    ``stream``/``astream`` (every stream mode, lists of them, ``subgraphs=True``,
    ``version="v2"``), ``get_state``, ``get_state_history``, ``update_state``,
    ``bulk_update_state``, ``with_config`` and ``get_graph``; usable as a node of
    a parent graph (interrupts inside it surface in the parent, and resuming the
    parent resumes it). Extra keyword arguments of ``stream``/``invoke``:
    ``run_id`` (a UUID string; default ``config["run_id"]`` or a new one) and
    ``multitask_strategy`` (``"reject"``, the default, or ``"enqueue"``).

    Args:
        graph: Name the worker serves the graph under.
        peer: The worker (trust-store name or node id), or a list tried in order
            while a worker is unreachable (a run fails over only before it started).
        port: The worker's virtual port.
        client: The :class:`pilot_rpc.PilotClient` to call through; ``None``
            shares the process-wide default client (one transport with the
            remote nodes, saver and event sources of this process).
        transport: An already open transport instead of ``client`` (a client
            is made for it); give one or neither.
        config: Config merged under every call's config.
        name: The runnable's name (default: ``graph``).
        timeout_secs: Deadline of state and introspection calls.

    Raises:
        PilotUsageError: an empty graph name or peer list.
    """

    def __init__(
        self,
        graph: str,
        *,
        peer: str | Sequence[str],
        port: int = DEFAULT_PORT,
        client: PilotClient | None = None,
        transport: TransportLike | None = None,
        config: RunnableConfig | None = None,
        name: str | None = None,
        timeout_secs: float = 30.0,
    ) -> None:
        if not graph:
            raise PilotUsageError("graph must name a served graph")
        peers = [peer] if isinstance(peer, str) else list(peer)
        if not peers or not all(peers):
            raise PilotUsageError("peer must be a worker name or a non-empty list of them")
        self.graph = graph
        self.peers = peers
        self.port = port
        self.transport = transport
        self.client = _runtime.client_for(client, transport)
        self.config = config
        self.name = name or graph
        self.timeout_secs = timeout_secs

    # -- configuration ----------------------------------------------------------

    def copy(self, update: Mapping[str, Any]) -> Self:
        """A copy with some constructor arguments replaced."""
        attrs: dict[str, Any] = {
            "graph": self.graph,
            "peer": self.peers,
            "port": self.port,
            "client": self.client,
            "config": self.config,
            "name": self.name,
            "timeout_secs": self.timeout_secs,
            **update,
        }
        return type(self)(attrs.pop("graph"), **attrs)

    def with_config(self, config: RunnableConfig | None = None, **kwargs: Any) -> Self:
        """A copy whose calls merge ``config`` (and ``kwargs``) under their own."""
        return self.copy({"config": merge_configs(self.config, config, cast("Any", kwargs))})

    # -- wire helpers ------------------------------------------------------------

    async def _unary(self, key: str, payload: dict[str, Any]) -> Any:
        client = await _Link.client(self.client)
        body = _CODEC.encode({"graph": self.graph, **payload}, root="payload")
        last: Exception | None = None
        for peer in self.peers:
            try:
                reply = await _rpc.call_unary(
                    client,
                    peer=peer,
                    port=self.port,
                    node=GRAPH_HANDLERS[key],
                    payload=body,
                    timeout=self.timeout_secs,
                    metadata={},
                    idempotency_key=None,
                    traceparent=None,
                    on_progress=None,
                )
            except RemoteUnavailableError as exc:
                last = exc
                continue
            return _CODEC.decode(reply)
        assert last is not None
        raise last

    async def _stream_on(
        self,
        peer: str,
        key: str,
        payload: dict[str, Any],
        *,
        timeout: float | None,  # noqa: ASYNC109 - a deadline sent with the call
    ) -> AsyncIterator[Any]:
        """One streaming call to one peer, decoded."""
        client = await _Link.client(self.client)
        body = _CODEC.encode({"graph": self.graph, **payload}, root="payload")
        try:
            async with _rpc.call_streaming(
                client,
                peer=peer,
                port=self.port,
                node=GRAPH_HANDLERS[key],
                payload=body,
                timeout=timeout,
                metadata={},
                idempotency_key=None,
                traceparent=None,
            ) as items:
                async for raw in items:
                    yield _CODEC.decode(raw)
        except RemoteAbortedError as exc:
            if exc.details.get("reason") == "thread_busy":
                raise RunRejectedError(
                    str(exc), peer=peer, node=GRAPH_HANDLERS[key], details=exc.details
                ) from exc
            raise

    async def _streaming(
        self,
        key: str,
        payload: dict[str, Any],
        *,
        timeout: float | None,  # noqa: ASYNC109 - a deadline sent with the call
    ) -> AsyncIterator[Any]:
        """A streaming call on the first reachable peer (failover before any item)."""
        last: Exception | None = None
        for peer in self.peers:
            started = False
            try:
                async for item in self._stream_on(peer, key, payload, timeout=timeout):
                    started = True
                    yield item
                return
            except RemoteUnavailableError as exc:
                if started:
                    raise
                last = exc
        assert last is not None
        raise last

    async def _run_items(self, payload: dict[str, Any]) -> AsyncIterator[Any]:
        """The items of one run, failing over to the next peer (see the module notes)."""
        delivered: list[Any] = []  # items since the last root ``values`` item
        replay: list[Any] | None = None  # while a re-issued run repeats them
        started = False
        for index, peer in enumerate(self.peers):
            try:
                async for item in self._stream_on(peer, "run", payload, timeout=None):
                    if isinstance(item, list) and item and item[0] == "meta":
                        meta = cast("list[Any]", item)[1]
                        if isinstance(meta, Mapping) and not started:
                            thread_id = cast("Mapping[str, Any]", meta).get("thread_id")
                            conf = dict(payload["config"].get(_CONF) or {})
                            conf["thread_id"] = thread_id
                            payload = {**payload, "config": {**payload["config"], _CONF: conf}}
                        started = True
                        continue
                    if replay is not None:
                        if item in replay:
                            replay.remove(item)
                            continue
                        replay = None
                    if _is_root_values(item):
                        delivered = []
                    delivered.append(item)
                    yield item
                return
            except RemoteUnavailableError:
                if index + 1 == len(self.peers):
                    raise
                if started:
                    # resume: the same run id continues from the run's last checkpoint
                    # and takes over the thread lease the lost worker held for it
                    # (a worker of the previous release ignores the flag and waits
                    # the lease out)
                    payload = {**payload, "multitask_strategy": "enqueue", "resume": True}
                    replay = list(delivered)

    # -- introspection -----------------------------------------------------------

    async def aget_graph(
        self, config: RunnableConfig | None = None, *, xray: int | bool = False
    ) -> DrawableGraph:
        """The served graph's drawable structure.

        Raises:
            PilotRemoteError: the worker could not be reached or does not serve it.
        """
        del config
        data = cast("Mapping[str, Any]", await self._unary("get_graph", {"xray": xray}))
        nodes: dict[str, DrawableNode] = {}
        for node in cast("list[Mapping[str, Any]]", data.get("nodes") or []):
            node_id = str(node["id"])
            node_data: Any = node.get("data") or {}
            node_name = node.get("name") or (
                node_data.get("name", node_id) if isinstance(node_data, Mapping) else node_id
            )
            nodes[node_id] = DrawableNode(
                id=node_id,
                name=str(node_name),
                data=cast("Any", node_data),
                metadata=node.get("metadata"),
            )
        edges = [
            DrawableEdge(
                source=str(e["source"]),
                target=str(e["target"]),
                data=e.get("data"),
                conditional=bool(e.get("conditional", False)),
            )
            for e in cast("list[Mapping[str, Any]]", data.get("edges") or [])
        ]
        return DrawableGraph(nodes=nodes, edges=edges)

    def get_graph(
        self, config: RunnableConfig | None = None, *, xray: int | bool = False
    ) -> DrawableGraph:
        """Sync :meth:`aget_graph`."""
        return _Link.run_sync(lambda: self.aget_graph(config, xray=xray), self.client)

    async def aschemas(self) -> dict[str, Any]:
        """The served graph's input/output/context JSON Schemas."""
        return cast("dict[str, Any]", await self._unary("schemas", {}))

    # -- state -------------------------------------------------------------------

    def _state_config(self, config: RunnableConfig | None) -> dict[str, Any]:
        merged = merge_configs(self.config, config)
        conf = merged.get(_CONF) or {}
        keep = ("thread_id", "checkpoint_ns", "checkpoint_id")
        out: dict[str, Any] = {_CONF: {k: conf[k] for k in keep if k in conf}}
        if not out[_CONF].get("thread_id"):
            raise PilotUsageError("config['configurable']['thread_id'] is required")
        return out

    async def aget_state(self, config: RunnableConfig, *, subgraphs: bool = False) -> StateSnapshot:
        """The thread's current state (or at ``checkpoint_id``).

        Raises:
            PilotUsageError: no ``thread_id`` in the config.
            PilotRemoteError: the call failed.
        """
        data = await self._unary(
            "get_state", {"config": self._state_config(config), "subgraphs": subgraphs}
        )
        return snapshot_from_wire(cast("Mapping[str, Any]", data))

    def get_state(self, config: RunnableConfig, *, subgraphs: bool = False) -> StateSnapshot:
        """Sync :meth:`aget_state`."""
        return _Link.run_sync(lambda: self.aget_state(config, subgraphs=subgraphs), self.client)

    async def aget_state_history(
        self,
        config: RunnableConfig,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[StateSnapshot]:
        """The thread's checkpoints, newest first."""
        payload: dict[str, Any] = {
            "config": self._state_config(config),
            "filter": _primitive(filter) if filter else None,
            "before": self._state_config(before) if before else None,
            "limit": limit,
        }
        async for item in self._streaming("get_state_history", payload, timeout=None):
            yield snapshot_from_wire(cast("Mapping[str, Any]", item))

    def get_state_history(
        self,
        config: RunnableConfig,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[StateSnapshot]:
        """Sync :meth:`aget_state_history`."""
        return _Link.run_sync_iter(
            lambda: self.aget_state_history(config, filter=filter, before=before, limit=limit),
            self.client,
        )

    async def aupdate_state(
        self,
        config: RunnableConfig,
        values: dict[str, Any] | Any | None,
        as_node: str | None = None,
    ) -> RunnableConfig:
        """Write ``values`` to the thread as if ``as_node`` had returned them.

        Not safe to repeat blindly: each call adds a checkpoint.
        """
        out = await self._unary(
            "update_state",
            {"config": self._state_config(config), "values": values, "as_node": as_node},
        )
        return cast("RunnableConfig", out)

    def update_state(
        self,
        config: RunnableConfig,
        values: dict[str, Any] | Any | None,
        as_node: str | None = None,
    ) -> RunnableConfig:
        """Sync :meth:`aupdate_state`."""
        return _Link.run_sync(lambda: self.aupdate_state(config, values, as_node), self.client)

    async def abulk_update_state(
        self, config: RunnableConfig, updates: Sequence[Sequence[StateUpdate]]
    ) -> RunnableConfig:
        """Apply several supersteps of updates (LangGraph's ``bulk_update_state``)."""
        steps = [[list(u) for u in step] for step in updates]
        out = await self._unary(
            "bulk_update_state", {"config": self._state_config(config), "supersteps": steps}
        )
        return cast("RunnableConfig", out)

    def bulk_update_state(
        self, config: RunnableConfig, updates: Sequence[Sequence[StateUpdate]]
    ) -> RunnableConfig:
        """Sync :meth:`abulk_update_state`."""
        return _Link.run_sync(lambda: self.abulk_update_state(config, updates), self.client)

    # -- runs ----------------------------------------------------------------------

    async def alist_threads(self, *, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """Threads in the worker's checkpoint store, newest first, one page.

        Returns ``{"threads": [...], "total": N}``; each thread is
        ``{"thread_id", "checkpoint_id", "metadata", "created_at"}`` of its latest
        root checkpoint. Pages hold at most 1000 threads. Safe to repeat.

        Raises:
            PilotRemoteError: the call failed (``RemoteInvalidArgumentError``
                for a negative ``limit``/``offset``).
        """
        out = await self._unary("threads", {"limit": limit, "offset": offset})
        return cast("dict[str, Any]", out)

    def list_threads(self, *, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """Sync :meth:`alist_threads`."""
        return _Link.run_sync(lambda: self.alist_threads(limit=limit, offset=offset), self.client)

    async def alist_runs(self) -> list[dict[str, Any]]:
        """Runs of this graph in progress on every reachable peer.

        Each is ``{"run_id", "graph", "thread_id", "peer"}``. Safe to repeat.
        """
        client = await _Link.client(self.client)
        found: list[dict[str, Any]] = []
        for peer in self.peers:
            try:
                reply = await _rpc.call_unary(
                    client,
                    peer=peer,
                    port=self.port,
                    node=GRAPH_HANDLERS["runs"],
                    payload=_CODEC.encode({"graph": self.graph}, root="payload"),
                    timeout=self.timeout_secs,
                    metadata={},
                    idempotency_key=None,
                    traceparent=None,
                    on_progress=None,
                )
            except RemoteUnavailableError:
                continue
            for run in cast("list[Any]", _CODEC.decode(reply) or []):
                if isinstance(run, Mapping):
                    found.append({**cast("Mapping[str, Any]", run), "peer": peer})
        return found

    async def acancel_run(self, run_id: str) -> bool:
        """Cancel a run by id on whichever of the peers runs it; True if one did.

        Safe to repeat. The run's caller sees ``RemoteCancelledError``.
        """
        cancelled = False
        client = await _Link.client(self.client)
        for peer in self.peers:
            try:
                reply = await _rpc.call_unary(
                    client,
                    peer=peer,
                    port=self.port,
                    node=GRAPH_HANDLERS["cancel_run"],
                    payload=_CODEC.encode({"run_id": run_id}, root="payload"),
                    timeout=self.timeout_secs,
                    metadata={},
                    idempotency_key=None,
                    traceparent=None,
                    on_progress=None,
                )
            except RemoteUnavailableError:
                continue
            decoded = _CODEC.decode(reply)
            cancelled = cancelled or bool(isinstance(decoded, Mapping) and decoded.get("cancelled"))  # pyright: ignore[reportUnknownMemberType]
        return cancelled

    def cancel_run(self, run_id: str) -> bool:
        """Sync :meth:`acancel_run`."""
        return _Link.run_sync(lambda: self.acancel_run(run_id), self.client)

    def _tied_thread(self, config: RunnableConfig) -> str | None:
        """The remote thread tied to the parent task, when called as a checkpointed node."""
        conf = config.get(_CONF) or {}
        ns = conf.get(_KEY_CHECKPOINT_NS)
        thread_id = conf.get("thread_id")
        if not ns or thread_id is None or conf.get(_KEY_CHECKPOINTER) is None:
            return None
        if conf.get(_KEY_SCRATCHPAD) is None:
            return None
        return f"{thread_id}{_NS_SEP}{ns}"

    async def _raw_run(
        self,
        graph_input: Any,
        config: RunnableConfig,
        *,
        context: Any,
        modes: list[str],
        subgraphs: bool,
        interrupt_before: Any,
        interrupt_after: Any,
        run_id: str | None,
        multitask_strategy: str,
    ) -> AsyncIterator[tuple[tuple[str, ...], str, Any]]:
        """(ns, mode, chunk) of one run, with the tied-node resume logic applied."""
        sanitized = _sanitize(config)
        conf = config.get(_CONF) or {}
        caller_ns_text: str | None = conf.get(_KEY_CHECKPOINT_NS)
        caller_ns = tuple(caller_ns_text.split(_NS_SEP)) if caller_ns_text else ()
        tied = self._tied_thread(config)
        command: Command[Any] | None = None
        if isinstance(graph_input, Command):
            command, graph_input = cast("Command[Any]", graph_input), None
        if tied is not None:
            sanitized[_CONF]["thread_id"] = tied
            if command is None:
                snap = await self.aget_state({_CONF: {"thread_id": tied}})
                if snap.interrupts:
                    meta = snap.metadata or {}
                    sent = int(cast("Any", meta).get(_RESUMES_KEY, 0))
                    for _ in range(sent):  # resume values the remote thread already has
                        _parent_interrupt(config, None)
                    resume = {i.id: _parent_interrupt(config, i.value) for i in snap.interrupts}
                    command = Command(resume=resume)
                    sanitized.setdefault("metadata", {})[_RESUMES_KEY] = sent + len(resume)
                elif snap.created_at is not None and not snap.next:
                    # this task's remote run already finished: do not run it twice
                    yield (caller_ns, "values", snap.values)
                    return
        rid = run_id or (str(config.get("run_id")) if config.get("run_id") else str(uuid.uuid4()))
        payload: dict[str, Any] = {
            "input": graph_input,
            "command": command,
            "config": sanitized,
            "context": context,
            # the last root values item marks a checkpoint for failover's replay check
            "stream_mode": modes
            if len(self.peers) == 1 or "values" in modes
            else [*modes, "values"],
            "subgraphs": subgraphs,
            "interrupt_before": interrupt_before,
            "interrupt_after": interrupt_after,
            "run_id": rid,
            "multitask_strategy": multitask_strategy,
        }
        pending: list[Interrupt] = []
        async for item in self._run_items(payload):
            if not isinstance(item, list) or not item:
                continue
            parts = cast("list[Any]", item)
            if parts[0] != "ev" or len(parts) != 4:
                continue
            ns = caller_ns + tuple(cast("list[str]", parts[1]))
            mode = str(parts[2])
            chunk: Any = parts[3]
            if mode == "messages" and isinstance(chunk, list):
                chunk = tuple(cast("list[Any]", chunk))
            elif mode in ("updates", "values"):
                chunk = _fix_interrupts(chunk)
            yield ns, mode, chunk
            if (
                caller_ns
                and mode == "updates"
                and ns == caller_ns
                and isinstance(chunk, dict)
                and _INTERRUPT in chunk
            ):
                pending.extend(cast("tuple[Interrupt, ...]", chunk[_INTERRUPT]))
        # raised once the run ended, so the remote thread has saved its checkpoint
        if pending:
            if tied is None:
                raise GraphInterrupt(tuple(pending))
            for i in pending:  # raises for the first one the parent has no value for
                _parent_interrupt(config, i.value)

    async def astream(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        context: Any = None,
        stream_mode: Any = None,
        interrupt_before: Any = None,
        interrupt_after: Any = None,
        subgraphs: bool = False,
        version: Literal["v1", "v2"] = "v1",
        run_id: str | None = None,
        multitask_strategy: MultitaskStrategy = "reject",
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        """Run the served graph and stream its items, shaped like a local graph's.

        Raises:
            RunRejectedError: the thread is busy and the strategy is ``reject``.
            RemoteCancelledError: the run was cancelled (``acancel_run``).
            GraphInterrupt: used as a node, the remote graph was interrupted.
            PilotRemoteError: the worker failed the run or could not be reached.

        Breaking off the iteration cancels the remote run.

        ``multitask_strategy`` when the thread has a run in progress:
        ``"reject"`` raises :class:`RunRejectedError`, ``"enqueue"`` waits for
        it, ``"interrupt"`` cancels it and starts from the state it left,
        ``"rollback"`` cancels it and deletes its checkpoints first.
        ``interrupt`` and ``rollback`` reach runs on the same worker only.

        With several peers, a run whose worker is lost mid-run (the stream
        fails with the worker unavailable) continues on the next peer from
        its last checkpoint at once: the re-issue is flagged as a resume of
        the same run id, so it takes over the thread lease the lost worker
        held for that run (a worker of the previous release waits for it to
        expire instead). What the caller sees then: items equal to
        the ones delivered since the last checkpoint are skipped as the
        resumed run repeats them; the first item that differs, and all after
        it, are delivered. The node that was running when the worker died
        runs again from its start, so its side effects happen twice, and
        ``custom``/``messages`` items it produces again that differ from the
        ones already delivered (timestamps, generated ids) are delivered
        again. Nodes that finished before the last checkpoint do not run
        again.
        """
        if kwargs:
            raise PilotUsageError(f"unsupported arguments: {sorted(kwargs)}")
        merged = merge_configs(self.config, config)
        if stream_mode is None:
            requested: list[str] = ["updates"]
            single = True
        elif isinstance(stream_mode, str):
            requested, single = [stream_mode], True
        else:
            requested, single = list(cast("Sequence[str]", stream_mode)), False
        bad = [m for m in requested if m not in STREAM_MODES]
        if bad:
            raise PilotUsageError(f"unsupported stream modes {bad}; use {sorted(STREAM_MODES)}")
        parent_stream: Any = (merged.get(_CONF) or {}).get(_KEY_STREAM)
        modes = list(requested)
        if parent_stream is not None:
            modes += [m for m in parent_stream.modes if m in STREAM_MODES and m not in modes]
        remote_subgraphs = subgraphs or parent_stream is not None
        async for ns, mode, chunk in self._raw_run(
            input,
            merged,
            context=context,
            modes=modes,
            subgraphs=remote_subgraphs,
            interrupt_before=interrupt_before,
            interrupt_after=interrupt_after,
            run_id=run_id,
            multitask_strategy=multitask_strategy,
        ):
            if parent_stream is not None and mode in parent_stream.modes:
                parent_stream((ns, mode, chunk))
            if mode not in requested:
                continue
            own_ns = ns[len(_caller_ns(merged)) :]
            if not subgraphs and own_ns and mode != "messages":
                continue
            if version == "v2":
                if mode == "values" and isinstance(chunk, dict):
                    data = dict(cast("dict[str, Any]", chunk))
                    ints = tuple(data.pop(_INTERRUPT, ()))
                    yield {"type": mode, "ns": ns, "data": data, "interrupts": ints}
                else:
                    yield {"type": mode, "ns": ns, "data": chunk}
            elif subgraphs and not single:
                yield ns, mode, chunk
            elif not single:
                yield mode, chunk
            elif subgraphs:
                yield ns, chunk
            else:
                yield chunk

    def stream(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        context: Any = None,
        stream_mode: Any = None,
        interrupt_before: Any = None,
        interrupt_after: Any = None,
        subgraphs: bool = False,
        version: Literal["v1", "v2"] = "v1",
        run_id: str | None = None,
        multitask_strategy: MultitaskStrategy = "reject",
        **kwargs: Any,
    ) -> Iterator[Any]:
        """Sync :meth:`astream` (one item at a time; closing it cancels the run)."""
        return _Link.run_sync_iter(
            lambda: self.astream(
                input,
                config,
                context=context,
                stream_mode=stream_mode,
                interrupt_before=interrupt_before,
                interrupt_after=interrupt_after,
                subgraphs=subgraphs,
                version=version,
                run_id=run_id,
                multitask_strategy=multitask_strategy,
                **kwargs,
            ),
            self.client,
        )

    async def ainvoke(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        context: Any = None,
        interrupt_before: Any = None,
        interrupt_after: Any = None,
        version: Literal["v1", "v2"] = "v1",
        run_id: str | None = None,
        multitask_strategy: MultitaskStrategy = "reject",
        **kwargs: Any,
    ) -> Any:
        """Run the served graph to the end and return its final state.

        Like a local graph: with an interrupt the result carries ``__interrupt__``
        (``version="v2"``: a ``GraphOutput``). Raises as :meth:`astream`.
        """
        latest: Any = None
        interrupts: list[Interrupt] = []
        async for mode, chunk in self.astream(
            input,
            config,
            context=context,
            stream_mode=["updates", "values"],
            interrupt_before=interrupt_before,
            interrupt_after=interrupt_after,
            run_id=run_id,
            multitask_strategy=multitask_strategy,
            **kwargs,
        ):
            if mode == "values":
                latest = chunk
            elif isinstance(chunk, dict) and _INTERRUPT in chunk:
                interrupts.extend(cast("tuple[Interrupt, ...]", chunk[_INTERRUPT]))
        if version == "v2":
            from langgraph.types import GraphOutput

            value = (
                {k: v for k, v in cast("dict[str, Any]", latest).items() if k != _INTERRUPT}
                if isinstance(latest, dict)
                else latest
            )
            return GraphOutput(value=value, interrupts=tuple(interrupts))
        if interrupts:
            if isinstance(latest, dict):
                return {**cast("dict[str, Any]", latest), _INTERRUPT: tuple(interrupts)}
            return {_INTERRUPT: tuple(interrupts)}
        return latest

    def invoke(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        context: Any = None,
        interrupt_before: Any = None,
        interrupt_after: Any = None,
        version: Literal["v1", "v2"] = "v1",
        run_id: str | None = None,
        multitask_strategy: MultitaskStrategy = "reject",
        **kwargs: Any,
    ) -> Any:
        """Sync :meth:`ainvoke`."""
        return _Link.run_sync(
            lambda: self.ainvoke(
                input,
                config,
                context=context,
                interrupt_before=interrupt_before,
                interrupt_after=interrupt_after,
                version=version,
                run_id=run_id,
                multitask_strategy=multitask_strategy,
                **kwargs,
            ),
            self.client,
        )


def _is_root_values(item: Any) -> bool:
    return (
        isinstance(item, list)
        and len(cast("list[Any]", item)) == 4
        and item[0] == "ev"
        and not item[1]
        and item[2] == "values"
    )


def _caller_ns(config: RunnableConfig) -> tuple[str, ...]:
    text = (config.get(_CONF) or {}).get(_KEY_CHECKPOINT_NS)
    return tuple(text.split(_NS_SEP)) if text else ()


def _parent_interrupt(config: RunnableConfig, value: Any) -> Any:
    """LangGraph's ``interrupt()`` in the parent task whose config is ``config``.

    Works on any loop or thread: the parent's config is made current for the call.
    """
    token = var_child_runnable_config.set(config)
    try:
        return interrupt(value)
    finally:
        var_child_runnable_config.reset(token)
