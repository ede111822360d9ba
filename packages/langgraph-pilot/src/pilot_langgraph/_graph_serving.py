"""Serving whole LangGraph graphs from a worker (``pilot-langgraph-worker --graph``).

Theory of operation
-------------------
``--graph NAME=module:attr`` names a compiled graph, a ``StateGraph`` (compiled
here) or a zero-argument factory returning either. Every served graph is given
the worker's checkpointer: a local store (``--checkpoint-db URL``: SQLite or
PostgreSQL through pilot-checkpoint-sqlite, in this process), a store peer
(``--checkpoint-peer NAME``: a ``PilotCheckpointSaver`` over the worker's own
transport), or, with neither, an in-memory saver (state lost on restart).

The handlers (all take ``{"graph": NAME, ...}``) are:

* ``lg.graph.run`` (server-streaming): one run of the graph. The first item is
  ``["meta", {"run_id", "thread_id"}]``, then ``["ev", ns, mode, chunk]`` for every
  item LangGraph's own ``astream`` produces. ``updates`` is always streamed so
  the caller sees interrupts.
* ``lg.graph.cancel_run``: cancel a running run by id (the run's task is
  cancelled, so the graph's running node sees ``CancelledError``).
* ``lg.graph.get_state``, ``lg.graph.get_state_history`` (server-streaming),
  ``lg.graph.update_state``, ``lg.graph.bulk_update_state``.
* ``lg.graph.get_graph`` (the drawable graph as JSON) and ``lg.graph.schemas``
  (input/output/context JSON Schemas of one graph, or of all).
* ``lg.graph.runs``: the runs in progress on this worker.
* ``lg.graph.threads``: the threads in the checkpoint store with their latest
  root checkpoint's metadata, newest first, paged (``limit``/``offset``).

Runs on one thread are serialised by a per-thread lock in this worker:
``multitask_strategy="reject"`` refuses a run while another one holds the
thread (``ABORTED``), ``"enqueue"`` waits for it (at most
:data:`MAX_WAITERS_PER_THREAD` waiting runs per thread). ``"interrupt"``
cancels the run in progress on the thread in this worker and starts from the
thread's state as that run left it; ``"rollback"`` also deletes the
checkpoints the cancelled run wrote (the saver's ``adelete_for_runs``) first,
so the new run starts from the state before it. With a
pilot-checkpoint-sqlite store (``--checkpoint-db`` or ``--checkpoint-peer``)
every run also holds its thread's lease in the store (``exclusive_runs``), so
the exclusion holds across all workers sharing that store (and the same
store scope); with the in-memory saver it is per worker. ``interrupt`` and
``rollback`` cancel runs of this worker only: a run held by another worker
makes them fail like ``reject``.

Every run records its id in its checkpoints' metadata (``run_id``). A run
re-issued with the same id on a thread that has checkpoints of it continues
from its last checkpoint (LangGraph's re-entry rule) instead of starting
again: this is how a client resumes a run whose worker died. The client flags
that re-issue ``resume: true``; the store lease records each run's id, so the
resumed run takes over the lease its earlier attempt held at once instead of
waiting for it to expire (:data:`GRAPH_LEASE_TTL` seconds after its last
renewal). Only a lease held for the *same* run id is taken over; the earlier
attempt, if its worker is in fact alive, is refused at its next renewal
(every third of the TTL) and its run is cancelled there, mid-step.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    from langgraph.pregel import Pregel
    from langgraph.types import StateSnapshot
    from pilot_worker import Context, HandlerSpec, Plugin, PluginContext

    AnyPregel = Pregel[Any, Any, Any, Any]

__all__ = [
    "GRAPH_HANDLERS",
    "GRAPH_LEASE_TTL",
    "MAX_THREADS_PAGE",
    "MAX_WAITERS_PER_THREAD",
    "STREAM_MODES",
    "GraphHost",
    "GraphSource",
    "graph_plugin",
    "parse_graph_option",
    "snapshot_from_wire",
    "snapshot_to_wire",
]

STREAM_MODES: Final = frozenset(
    {"values", "updates", "messages", "custom", "debug", "checkpoints", "tasks"}
)
MAX_WAITERS_PER_THREAD: Final = 64
"""Runs that may wait (``enqueue``) for one thread on one worker."""
GRAPH_LEASE_TTL: Final = 6.0
"""Seconds a run's thread lease outlives its worker's last renewal."""
MAX_THREADS_PAGE: Final = 1000
"""Most threads one ``lg.graph.threads`` call returns."""
STRATEGIES: Final = ("reject", "enqueue", "interrupt", "rollback")
_QUEUE_ITEMS: Final = 64  # stream items buffered between the graph and the wire
_CANCEL_WAIT_SECS: Final = 10.0

GRAPH_HANDLERS: Final = {
    "run": "lg.graph.run",
    "cancel_run": "lg.graph.cancel_run",
    "runs": "lg.graph.runs",
    "threads": "lg.graph.threads",
    "get_state": "lg.graph.get_state",
    "get_state_history": "lg.graph.get_state_history",
    "update_state": "lg.graph.update_state",
    "bulk_update_state": "lg.graph.bulk_update_state",
    "get_graph": "lg.graph.get_graph",
    "schemas": "lg.graph.schemas",
}


@dataclass(frozen=True)
class GraphSource:
    """One ``--graph NAME=module:attr`` option."""

    name: str
    module: str
    attr: str


def parse_graph_option(text: str) -> GraphSource:
    """Parse ``NAME=module:attr`` (``module`` may be a ``.py`` path).

    Raises:
        ValueError: the text is not of that form.
    """
    name, sep, target = text.partition("=")
    module, colon, attr = target.rpartition(":")
    if not sep or not colon or not name.strip() or not module or not attr:
        raise ValueError(f"--graph expects NAME=module:attribute, got {text!r}")
    if "." in attr and not attr.replace(".", "").isidentifier():
        raise ValueError(f"--graph attribute {attr!r} is not a Python name")
    return GraphSource(name=name.strip(), module=module, attr=attr)


def _import(module: str) -> Any:
    if module.endswith(".py"):
        path = Path(module).resolve()
        mod_name = f"pilot_langgraph_graph_{path.stem}_{abs(hash(str(path))):x}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = loaded
        spec.loader.exec_module(loaded)
        return loaded
    return importlib.import_module(module)


def load_graph(source: GraphSource, checkpointer: Any) -> AnyPregel:
    """Import and compile one served graph with ``checkpointer``.

    Raises:
        ImportError: the module cannot be imported.
        TypeError: the attribute is not a graph (or a factory of one).
    """
    from langgraph.graph import StateGraph
    from langgraph.pregel import Pregel

    obj: Any = _import(source.module)
    for part in source.attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, (Pregel, StateGraph)) and callable(obj):
        obj = obj()
    if isinstance(obj, StateGraph):
        return cast("AnyPregel", obj.compile(checkpointer=checkpointer))  # pyright: ignore[reportUnknownMemberType]
    if isinstance(obj, Pregel):
        return obj.copy({"checkpointer": checkpointer})  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    raise TypeError(
        f"--graph {source.name}: {source.module}:{source.attr} is a {type(obj).__name__}, "
        "not a compiled graph, a StateGraph or a factory of one"
    )


# -- snapshots on the wire ------------------------------------------------------


def _plain_config(config: Any) -> dict[str, Any] | None:
    if not isinstance(config, Mapping):
        return None
    conf = cast("Mapping[str, Any]", config).get("configurable") or {}
    keep = ("thread_id", "checkpoint_ns", "checkpoint_id", "checkpoint_map")
    return {"configurable": {k: conf[k] for k in keep if k in conf}}


def snapshot_to_wire(snap: StateSnapshot) -> dict[str, Any]:
    """A StateSnapshot as plain data (task errors become their text)."""
    from langgraph.types import StateSnapshot

    tasks: list[dict[str, Any]] = []
    for t in snap.tasks:
        state: Any = t.state
        tasks.append(
            {
                "id": t.id,
                "name": t.name,
                "path": list(t.path),
                "error": None if t.error is None else f"{type(t.error).__name__}: {t.error}",
                "interrupts": list(t.interrupts),
                "state": snapshot_to_wire(state)
                if isinstance(state, StateSnapshot)
                else _plain_config(state),
                "result": t.result,
            }
        )
    return {
        "values": snap.values,
        "next": list(snap.next),
        "config": _plain_config(snap.config),
        "metadata": dict(snap.metadata) if snap.metadata is not None else None,
        "created_at": snap.created_at,
        "parent_config": _plain_config(snap.parent_config),
        "tasks": tasks,
        "interrupts": list(snap.interrupts),
    }


class RemoteTaskError(Exception):
    """A task error reported by a served graph (its text)."""


def snapshot_from_wire(data: Mapping[str, Any]) -> StateSnapshot:
    """Rebuild a StateSnapshot from :func:`snapshot_to_wire` data."""
    from langgraph.types import PregelTask, StateSnapshot

    tasks: list[PregelTask] = []
    for t in cast("list[Mapping[str, Any]]", data.get("tasks") or []):
        state = t.get("state")
        tasks.append(
            PregelTask(
                id=str(t["id"]),
                name=str(t["name"]),
                path=tuple(t.get("path") or ()),
                error=RemoteTaskError(t["error"]) if t.get("error") else None,
                interrupts=tuple(t.get("interrupts") or ()),
                state=snapshot_from_wire(state)
                if isinstance(state, Mapping) and "values" in state
                else cast("Any", state),
                result=t.get("result"),
            )
        )
    return StateSnapshot(
        values=data.get("values"),
        next=tuple(data.get("next") or ()),
        config=cast("Any", data.get("config") or {}),
        metadata=cast("Any", data.get("metadata")),
        created_at=data.get("created_at"),
        parent_config=cast("Any", data.get("parent_config")),
        tasks=tuple(tasks),
        interrupts=tuple(data.get("interrupts") or ()),
    )


# -- the host -------------------------------------------------------------------


@dataclass
class _Run:
    run_id: str
    graph: str
    thread_id: str
    task: asyncio.Task[None]


@dataclass
class _ThreadGate:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0


def _bad(message: str) -> Exception:
    from pilot_rpc.errors import InvalidArgument

    return InvalidArgument(message)


def _mapping(payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise _bad("the payload must be a mapping")
    return cast("Mapping[str, Any]", payload)


def _config_of(payload: Mapping[str, Any], key: str = "config") -> dict[str, Any]:
    raw = payload.get(key)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _bad(f"{key} must be a mapping")
    config = dict(cast("Mapping[str, Any]", raw))
    conf = config.get("configurable") or {}
    if not isinstance(conf, Mapping):
        raise _bad(f"{key}.configurable must be a mapping")
    config["configurable"] = dict(cast("Mapping[str, Any]", conf))
    return config


class GraphHost:
    """The graphs one worker serves, its runs in progress and per-thread gates.

    Args:
        graphs: Served graphs by name.
        lease_saver: A ``PilotCheckpointSaver`` whose store keeps thread leases:
            every run then also holds its thread's lease there
            (pilot-checkpoint-sqlite's ``exclusive_runs``), so runs on one thread
            exclude each other across every worker sharing that store.
        lease_ttl: Seconds a run's lease outlives its last renewal.
    """

    def __init__(
        self,
        graphs: Mapping[str, AnyPregel],
        *,
        lease_saver: Any = None,
        lease_ttl: float = GRAPH_LEASE_TTL,
    ) -> None:
        self.graphs = dict(graphs)
        self.lease_saver = lease_saver
        self.lease_ttl = lease_ttl
        self.runs: dict[str, _Run] = {}
        self._gates: dict[tuple[str, str], _ThreadGate] = {}

    def graph(self, payload: Mapping[str, Any]) -> tuple[str, AnyPregel]:
        name = payload.get("graph")
        if not isinstance(name, str):
            raise _bad("graph must be the name of a served graph")
        graph = self.graphs.get(name)
        if graph is None:
            from pilot_rpc.errors import NotFound

            raise NotFound(
                f"graph {name!r} is not served here", details={"served": sorted(self.graphs)}
            )
        return name, graph

    # -- runs ------------------------------------------------------------------

    async def run(self, payload: Any, ctx: Context) -> AsyncIterator[Any]:
        """Stream one run: ``["meta", {...}]`` then ``["ev", ns, mode, chunk]`` items."""
        del ctx
        from langgraph.types import Command
        from pilot_rpc.errors import Aborted, AlreadyExists, ResourceExhausted

        req = _mapping(payload)
        name, graph = self.graph(req)
        config = _config_of(req)
        modes_raw = req.get("stream_mode") or ["values"]
        if not isinstance(modes_raw, list) or not all(
            isinstance(m, str) and m in STREAM_MODES for m in cast("list[Any]", modes_raw)
        ):
            raise _bad(f"stream_mode must be a list of {sorted(STREAM_MODES)}")
        modes = list(dict.fromkeys(cast("list[str]", modes_raw)))
        if "updates" not in modes:
            modes.append("updates")
        subgraphs = bool(req.get("subgraphs", False))
        strategy = req.get("multitask_strategy") or "reject"
        if strategy not in STRATEGIES:
            raise _bad(f"multitask_strategy must be one of {list(STRATEGIES)}")
        run_id = str(req.get("run_id") or uuid.uuid4())
        try:
            run_uuid = uuid.UUID(run_id)
        except ValueError:
            raise _bad("run_id must be a UUID") from None
        if run_id in self.runs:
            raise AlreadyExists(f"run {run_id} is already running")
        resume = req.get("resume", False)
        if not isinstance(resume, bool):
            raise _bad("resume must be a bool")
        command = req.get("command")
        if command is not None and not isinstance(command, Command):
            raise _bad("command must be a langgraph Command")
        graph_input = command if command is not None else req.get("input")
        thread_id = str(config["configurable"].get("thread_id") or uuid.uuid4())
        config["configurable"]["thread_id"] = thread_id
        config["run_id"] = run_uuid
        metadata = config.get("metadata")
        config["metadata"] = {
            **(cast("Mapping[str, Any]", metadata) if isinstance(metadata, Mapping) else {}),
            "run_id": run_id,
        }

        gate = self._gates.setdefault((name, thread_id), _ThreadGate())
        if gate.lock.locked() and strategy in ("interrupt", "rollback"):
            await self._displace(name, graph, thread_id, rollback=strategy == "rollback")
        if gate.lock.locked():
            # interrupt/rollback: the cancelled run's stream releases the thread as it unwinds
            if strategy == "reject":
                raise Aborted(
                    f"thread {thread_id} of graph {name!r} is busy with another run",
                    details={"reason": "thread_busy", "thread_id": thread_id},
                )
            if gate.waiting >= MAX_WAITERS_PER_THREAD:
                raise ResourceExhausted(f"too many runs waiting for thread {thread_id}")
        gate.waiting += 1
        try:
            await gate.lock.acquire()
        except BaseException:
            if not gate.lock.locked() and gate.waiting == 1:
                self._gates.pop((name, thread_id), None)
            raise
        finally:
            gate.waiting -= 1
        try:
            yield ["meta", {"run_id": run_id, "thread_id": thread_id}]
            async for item in self._pump(
                name,
                graph,
                run_id,
                thread_id,
                graph_input,
                config,
                modes=modes,
                subgraphs=subgraphs,
                strategy=strategy,
                resume=resume,
                kwargs={
                    "context": req.get("context"),
                    "interrupt_before": req.get("interrupt_before"),
                    "interrupt_after": req.get("interrupt_after"),
                },
            ):
                yield item
        finally:
            gate.lock.release()
            if not gate.lock.locked() and gate.waiting == 0:
                self._gates.pop((name, thread_id), None)

    async def _pump(
        self,
        name: str,
        graph: AnyPregel,
        run_id: str,
        thread_id: str,
        graph_input: Any,
        config: dict[str, Any],
        *,
        modes: list[str],
        subgraphs: bool,
        strategy: str,
        resume: bool = False,
        kwargs: dict[str, Any],
    ) -> AsyncIterator[Any]:
        from pilot_rpc.errors import Aborted, Cancelled

        queue: asyncio.Queue[list[Any]] = asyncio.Queue(_QUEUE_ITEMS)

        runner: Any = graph
        extra: dict[str, Any] = {}
        if self.lease_saver is not None:
            from pilot_checkpoint_sqlite import exclusive_runs

            runner = exclusive_runs(graph, self.lease_saver, lease_ttl=self.lease_ttl)
            extra["multitask_strategy"] = "enqueue" if strategy == "enqueue" else "reject"
            if resume:
                # the lease of this run's earlier attempt (its worker died or lost
                # the client) is taken over at once; another run's never is
                extra["resume"] = True

        async def produce() -> None:
            stream = runner.astream(
                graph_input,
                config,
                stream_mode=modes,
                subgraphs=subgraphs,
                **extra,
                **kwargs,
            )
            # closed here even when cancelled between items, so the thread's lease is freed
            async with contextlib.aclosing(stream):
                async for item in stream:  # pyright: ignore[reportUnknownVariableType]
                    parts = cast("tuple[Any, ...]", item)
                    ns, mode, chunk = parts if subgraphs else ((), *parts)
                    await queue.put(["ev", list(ns), mode, chunk])

        task = asyncio.get_running_loop().create_task(produce(), name=f"lg-graph-run-{run_id}")
        self.runs[run_id] = _Run(run_id=run_id, graph=name, thread_id=thread_id, task=task)
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                try:
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()
                if getter.done() and not getter.cancelled():
                    yield getter.result()
                    continue
                # the run ended: drain what it left, then report how it ended
                while not queue.empty():
                    yield queue.get_nowait()
                if task.cancelled():
                    raise Cancelled(f"run {run_id} was cancelled", details={"run_id": run_id})
                exc = task.exception()
                if exc is not None:
                    from pilot_checkpoint_sqlite.errors import ThreadBusyError

                    if isinstance(exc, ThreadBusyError):
                        raise Aborted(
                            f"thread {thread_id} of graph {name!r} is busy with another run "
                            "(held by another worker)",
                            details={"reason": "thread_busy", "thread_id": thread_id},
                        ) from exc
                    raise exc
                return
        finally:
            self.runs.pop(run_id, None)
            if not task.done():
                task.cancel()
                # wait for the graph to stop without swallowing our own cancellation
                await asyncio.wait({task}, timeout=_CANCEL_WAIT_SECS)

    async def _displace(
        self, name: str, graph: AnyPregel, thread_id: str, *, rollback: bool
    ) -> None:
        """Cancel this worker's runs on the thread (``interrupt``); ``rollback``
        also deletes the checkpoints they wrote."""
        victims = [r for r in self.runs.values() if r.graph == name and r.thread_id == thread_id]
        saver: Any = graph.checkpointer
        if rollback and victims and not _deletes_runs(saver):
            from pilot_rpc.errors import FailedPrecondition

            raise FailedPrecondition(
                "rollback needs a checkpointer that deletes a run's checkpoints "
                f"({type(saver).__name__} does not); use 'interrupt'"
            )
        for run in victims:
            run.task.cancel()
        if victims:
            await asyncio.wait({r.task for r in victims}, timeout=_CANCEL_WAIT_SECS)
        if rollback and victims:
            await saver.adelete_for_runs([r.run_id for r in victims])

    async def cancel_run(self, payload: Any) -> dict[str, Any]:
        """Cancel a run by id; ``{"cancelled": bool}`` says whether it was running here."""
        req = _mapping(payload)
        run_id = req.get("run_id")
        if not isinstance(run_id, str):
            raise _bad("run_id must be a string")
        run = self.runs.get(run_id)
        if run is None or run.task.done():
            return {"cancelled": False, "run_id": run_id}
        run.task.cancel()
        await asyncio.wait({run.task}, timeout=_CANCEL_WAIT_SECS)
        return {"cancelled": True, "run_id": run_id, "thread_id": run.thread_id}

    def list_runs(self, payload: Any) -> list[dict[str, Any]]:
        """The runs in progress (optionally of one graph)."""
        wanted = payload.get("graph") if isinstance(payload, Mapping) else None
        return [
            {"run_id": r.run_id, "graph": r.graph, "thread_id": r.thread_id}
            for r in self.runs.values()
            if wanted is None or r.graph == wanted
        ]

    async def list_threads(self, payload: Any) -> dict[str, Any]:
        """Threads in the checkpoint store with their latest root checkpoint, newest first.

        ``{"graph", "limit", "offset"}`` in; ``{"threads": [...], "total": N}`` out,
        each thread ``{"thread_id", "checkpoint_id", "metadata", "created_at"}``.
        Reads every root checkpoint the store holds for the caller's scope.
        """
        req = _mapping(payload)
        _, graph = self.graph(req)
        limit = req.get("limit", 100)
        offset = req.get("offset", 0)
        for key, value in (("limit", limit), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _bad(f"{key} must be a non-negative int")
        limit = min(cast("int", limit), MAX_THREADS_PAGE)
        saver: Any = graph.checkpointer
        latest: dict[str, Any] = {}
        async for tup in saver.alist(None):
            conf = tup.config.get("configurable") or {}
            if conf.get("checkpoint_ns"):
                continue
            thread_id = str(conf.get("thread_id"))
            seen = latest.get(thread_id)
            if seen is None or str(tup.checkpoint["id"]) > str(seen.checkpoint["id"]):
                latest[thread_id] = tup
        ordered = sorted(latest.values(), key=lambda t: str(t.checkpoint["id"]), reverse=True)
        page = ordered[cast("int", offset) : cast("int", offset) + limit]
        return {
            "threads": [
                {
                    "thread_id": str(t.config["configurable"]["thread_id"]),
                    "checkpoint_id": str(t.checkpoint["id"]),
                    "metadata": dict(t.metadata or {}),
                    "created_at": t.checkpoint.get("ts"),
                }
                for t in page
            ],
            "total": len(ordered),
        }

    # -- state -----------------------------------------------------------------

    async def get_state(self, payload: Any) -> dict[str, Any]:
        req = _mapping(payload)
        _, graph = self.graph(req)
        snap = await graph.aget_state(
            cast("Any", _config_of(req)), subgraphs=bool(req.get("subgraphs"))
        )
        return snapshot_to_wire(snap)

    async def get_state_history(self, payload: Any) -> AsyncIterator[dict[str, Any]]:
        req = _mapping(payload)
        _, graph = self.graph(req)
        limit = req.get("limit")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise _bad("limit must be a non-negative int")
        before = _config_of(req, "before") if req.get("before") else None
        filt = req.get("filter")
        async for snap in graph.aget_state_history(
            cast("Any", _config_of(req)),
            filter=cast("Any", filt) if isinstance(filt, Mapping) else None,
            before=cast("Any", before),
            limit=limit,
        ):
            yield snapshot_to_wire(snap)

    async def update_state(self, payload: Any) -> dict[str, Any] | None:
        req = _mapping(payload)
        _, graph = self.graph(req)
        as_node = req.get("as_node")
        out = await graph.aupdate_state(
            cast("Any", _config_of(req)),
            req.get("values"),
            as_node=as_node if isinstance(as_node, str) else None,
        )
        return _plain_config(out)

    async def bulk_update_state(self, payload: Any) -> dict[str, Any] | None:
        from langgraph.types import StateUpdate

        req = _mapping(payload)
        _, graph = self.graph(req)
        supersteps_raw = req.get("supersteps")
        if not isinstance(supersteps_raw, list):
            raise _bad("supersteps must be a list of lists of [values, as_node, task_id]")
        supersteps: list[list[StateUpdate]] = []
        for step in cast("list[Any]", supersteps_raw):
            if not isinstance(step, list):
                raise _bad("each superstep must be a list")
            supersteps.append([StateUpdate(*cast("list[Any]", u)) for u in cast("list[Any]", step)])
        out = await graph.abulk_update_state(cast("Any", _config_of(req)), supersteps)
        return _plain_config(out)

    # -- introspection ---------------------------------------------------------

    async def get_graph(self, payload: Any) -> dict[str, Any]:
        req = _mapping(payload)
        _, graph = self.graph(req)
        xray = req.get("xray", False)
        if not isinstance(xray, (bool, int)):
            raise _bad("xray must be a bool or an int")
        drawable = await graph.aget_graph(xray=xray)
        return cast("dict[str, Any]", drawable.to_json())

    def schemas(self, payload: Any) -> dict[str, Any]:
        """Input/output/context JSON Schemas of one graph, or ``{name: ...}`` of all."""
        req = payload if isinstance(payload, Mapping) else {}
        if cast("Mapping[str, Any]", req).get("graph") is not None:
            _, graph = self.graph(cast("Mapping[str, Any]", req))
            return _schemas_of(graph)
        return {name: _schemas_of(g) for name, g in self.graphs.items()}


def _deletes_runs(saver: Any) -> bool:
    """Whether ``saver`` implements ``adelete_for_runs`` (the base class raises)."""
    from langgraph.checkpoint.base import BaseCheckpointSaver

    method = getattr(type(saver), "adelete_for_runs", None)
    return method is not None and method is not BaseCheckpointSaver.adelete_for_runs


def _schemas_of(graph: AnyPregel) -> dict[str, Any]:
    def attempt(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception:  # a schema LangGraph cannot express: report none
            return None

    return {
        "input_schema": attempt(graph.get_input_jsonschema),
        "output_schema": attempt(graph.get_output_jsonschema),
        "context_schema": attempt(graph.get_context_jsonschema),
    }


def handler_specs(host: GraphHost) -> list[HandlerSpec]:
    """The worker handlers of ``host``."""
    from pilot_worker import HandlerSpec

    async def run(payload: Any, ctx: Context) -> AsyncIterator[Any]:
        async for item in host.run(payload, ctx):
            yield item

    async def cancel_run(payload: Any) -> dict[str, Any]:
        return await host.cancel_run(payload)

    async def runs(payload: Any) -> list[dict[str, Any]]:
        return host.list_runs(payload)

    async def threads(payload: Any) -> dict[str, Any]:
        return await host.list_threads(payload)

    async def get_state(payload: Any) -> dict[str, Any]:
        return await host.get_state(payload)

    async def get_state_history(payload: Any) -> AsyncIterator[dict[str, Any]]:
        async for item in host.get_state_history(payload):
            yield item

    async def update_state(payload: Any) -> dict[str, Any] | None:
        return await host.update_state(payload)

    async def bulk_update_state(payload: Any) -> dict[str, Any] | None:
        return await host.bulk_update_state(payload)

    async def get_graph(payload: Any) -> dict[str, Any]:
        return await host.get_graph(payload)

    async def schemas(payload: Any) -> dict[str, Any]:
        return host.schemas(payload)

    served = ", ".join(sorted(host.graphs))
    fns: Sequence[tuple[str, Callable[..., Any], float | None, str]] = (
        ("run", run, None, f"Run a served graph ({served}), streaming its items"),
        ("cancel_run", cancel_run, 30.0, "Cancel a run of a served graph by id"),
        ("runs", runs, 10.0, "Runs of served graphs in progress on this worker"),
        ("threads", threads, 60.0, "Threads of a served graph with their latest checkpoint"),
        ("get_state", get_state, 30.0, "State of a thread of a served graph"),
        ("get_state_history", get_state_history, 60.0, "Checkpoint history of a thread"),
        ("update_state", update_state, 30.0, "Update the state of a thread"),
        ("bulk_update_state", bulk_update_state, 60.0, "Apply several state updates"),
        ("get_graph", get_graph, 30.0, "Drawable JSON of a served graph"),
        ("schemas", schemas, 30.0, f"Input/output/context JSON Schemas of: {served}"),
    )
    return [
        HandlerSpec(name=GRAPH_HANDLERS[key], fn=fn, timeout_secs=timeout, description=desc)
        for key, fn, timeout, desc in fns
    ]


async def _open_checkpointer(
    db_url: str | None, peer: str | None, transport: Any
) -> tuple[Any, Callable[[], Any] | None]:
    """(checkpointer, async closer) from the worker's options."""
    if db_url and peer:
        raise ValueError("pass either --checkpoint-db or --checkpoint-peer, not both")
    if db_url:
        from pilot_checkpoint_sqlite import (
            CheckpointService,
            LocalStoreBackend,
            PilotCheckpointSaver,
            open_store,
        )

        store = await open_store(db_url)
        saver = PilotCheckpointSaver(
            backend=LocalStoreBackend(CheckpointService(store), caller_node_id="graph-host")
        )

        async def close_local() -> None:
            await saver.aclose()
            await store.aclose()

        return saver, close_local
    if peer:
        from pilot_checkpoint_sqlite import PilotCheckpointSaver

        remote = PilotCheckpointSaver(peer=peer, transport=transport)
        return remote, remote.aclose
    from langgraph.checkpoint.memory import InMemorySaver

    return InMemorySaver(), None


def graph_plugin(
    sources: Sequence[GraphSource],
    *,
    checkpoint_db: str | None,
    checkpoint_peer: str | None,
    lease_ttl: float = GRAPH_LEASE_TTL,
) -> Plugin:
    """The worker plugin that serves ``sources`` (``lease_ttl``: see :class:`GraphHost`)."""
    from pilot_worker import Plugin

    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"--graph names must be unique, got {names}")

    async def setup(ctx: PluginContext) -> None:
        checkpointer, close = await _open_checkpointer(
            checkpoint_db, checkpoint_peer, ctx.transport
        )
        try:
            graphs = {s.name: load_graph(s, checkpointer) for s in sources}
        except BaseException:
            if close is not None:
                await close()
            raise
        from pilot_checkpoint_sqlite import PilotCheckpointSaver

        lease_saver = checkpointer if isinstance(checkpointer, PilotCheckpointSaver) else None
        host = GraphHost(graphs, lease_saver=lease_saver, lease_ttl=lease_ttl)
        for spec in handler_specs(host):
            ctx.worker.register(spec)

        async def shutdown() -> None:
            for run in list(host.runs.values()):
                run.task.cancel()
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

        ctx.worker.on_shutdown(shutdown)
        ctx.logger.info("serving graphs: %s", ", ".join(sorted(graphs)))

    return Plugin(name="langgraph-graphs", description="Serve LangGraph graphs", setup=setup)
