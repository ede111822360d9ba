"""WorkerServer: handlers, the call pipeline and the worker's lifecycle.

Theory of operation
-------------------

Each registered handler becomes one pilot-rpc method. A call runs through a
fixed pipeline; every step that refuses a call raises the ``pilot_rpc`` error
the caller will see, with ``details["reason"]`` naming the rule::

    arrival
      -> draining?            UNAVAILABLE         reason "draining" (retry-safe: nothing ran)
      -> ACL                  PERMISSION_DENIED   reason "acl"
      -> rate_per_caller      RESOURCE_EXHAUSTED  reason "rate_limit" (+ retry_after_secs)
      -> codec.decode         INVALID_ARGUMENT    reason "invalid_argument"
      -> idempotency cache    stored result replayed / wait for the running twin
      -> max_concurrent gate  RESOURCE_EXHAUSTED  reason "concurrency_limit" | "queue_full"
      -> deadline = min(caller deadline, arrival + timeout_secs)
      -> middleware, outer first, then:
           input_model        INVALID_ARGUMENT    reason "invalid_argument" (+ errors)
           handler            (sync: pool thread; async: loop; async gen: stream)
           output_model       INTERNAL            reason "invalid_output" (+ errors)
      -> codec.encode         INTERNAL            reason "encode_failed"
    deadline passed anywhere after arrival: DEADLINE_EXCEEDED reason "timeout"
    handler raised a non-RpcError: INTERNAL reason "handler_error" (+ type)

A slot taken at the gate (and the in-flight gauge) is released when the call
ends, except for a sync handler still running on its thread after the call was
answered (timeout or cancellation): its slot is released when the thread
really returns, so ``max_concurrent`` and the pool bound what actually runs.

Every call, whatever its outcome, is counted in the metrics, in the
per-handler stats shown by ``_handlers``, in one log line and in one
OpenTelemetry SERVER span continuing the caller's ``traceparent``.

Lifecycle: ``new -> serving -> draining -> closed``. ``start()`` listens on
the transport and starts the RPC server, the ops HTTP endpoint and periodic
tasks; ``drain()`` refuses new calls and lets running ones finish up to a
timeout; ``aclose()`` drains (if not yet), stops periodic tasks, runs
shutdown hooks in reverse order and releases everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import time
import traceback
import types
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry import trace
from pilot_rpc import (
    CallContext,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MethodKind,
    PermissionDenied,
    ResourceExhausted,
    RpcError,
    RpcServer,
    ServerOptions,
    Unavailable,
)
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from pydantic import BaseModel, TypeAdapter, ValidationError

from pilot_worker._call import IncomingCall
from pilot_worker._codec import IdentityCodec, PayloadCodec
from pilot_worker._config import WorkerConfig
from pilot_worker._context import Context
from pilot_worker._handler import CallStyle, HandlerKind, HandlerSpec, get_handler_spec
from pilot_worker._http import OpsHttpServer
from pilot_worker._idempotency import IdempotencyCache
from pilot_worker._limits import ConcurrencyGate, GateFull, SlidingWindowLimiter
from pilot_worker._logging import CallLogWriter
from pilot_worker._metrics import HandlerStats, WorkerMetrics, percentiles
from pilot_worker._modules import collect_specs, import_handler_module
from pilot_worker._pool import SyncPool
from pilot_worker._steps import IdempotencyStore
from pilot_worker._tracing import end_span, start_server_span
from pilot_worker._version import __version__
from pilot_worker.errors import (
    DuplicateHandlerError,
    HandlerDefinitionError,
    WorkerConfigError,
    WorkerStateError,
)

__all__ = ["CallNext", "Middleware", "WorkerServer"]

CallNext = Callable[[Any, Context], Awaitable[Any]]
"""``await call_next(payload, ctx)`` runs the rest of the chain (for a streaming
handler it returns the async iterator of items)."""

Middleware = Callable[[Any, Context, CallNext], Any]
"""``(payload, ctx, call_next) -> result``, sync or async. Sync middleware runs
on the event loop (keep it quick) and may return ``call_next(...)`` unawaited."""

logger = logging.getLogger("pilot_worker")
call_logger = logging.getLogger("pilot_worker.calls")
handler_logger = logging.getLogger("pilot_worker.handlers")

_PERCENTILES = (50.0, 90.0, 99.0)
_SHUTDOWN_HOOK_TIMEOUT = 10.0
State = Literal["new", "serving", "draining", "closed"]
_NO_SPAN: trace.Span = trace.INVALID_SPAN
_WIRE_TYPES = frozenset({dict, list, str, int, float, bool, bytes, type(None), tuple})


class _SyncHolder:
    """Carries the thread future of a sync handler out of the middleware chain."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] | None = None


class _Entry:
    """A registered handler with its limiters, stats and metric children."""

    __slots__ = (
        "allow_set",
        "gate",
        "input_adapter",
        "output_adapter",
        "rate",
        "schemas",
        "source",
        "spec",
        "stats",
    )

    def __init__(
        self,
        spec: HandlerSpec,
        *,
        config: WorkerConfig,
        stats: HandlerStats,
        source: str | None,
    ) -> None:
        self.spec = spec
        self.source = source
        self.stats = stats
        self.allow_set = frozenset(spec.allow) if spec.allow is not None else None
        self.gate = (
            ConcurrencyGate(
                spec.max_concurrent,
                overflow=spec.overflow or config.overflow,
                max_queued=config.max_queued_per_handler,
            )
            if spec.max_concurrent is not None
            else None
        )
        self.rate = (
            SlidingWindowLimiter(
                spec.rate_per_caller,
                spec.rate_window_secs,
                max_callers=config.rate_limit_max_callers,
            )
            if spec.rate_per_caller is not None
            else None
        )
        self.input_adapter: TypeAdapter[Any] | None = (
            TypeAdapter(spec.input_model) if spec.input_model is not None else None
        )
        self.output_adapter: TypeAdapter[Any] | None = (
            TypeAdapter(spec.output_model) if spec.output_model is not None else None
        )
        self.schemas: dict[str, Any] | None = None


@dataclass(eq=False)
class _Periodic:
    name: str
    interval: float
    fn: Callable[[], Any]
    run_immediately: bool
    task: asyncio.Task[None] | None = field(default=None)


def _validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(part) for part in err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False)
    ]


def _default_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class WorkerServer:
    """Serves registered handlers to trusted peers over pilot-rpc.

    Args:
        transport: An open ``pilot_transport.Transport`` (not owned: the caller
            closes it). ``None`` builds an offline worker that can register
            handlers and be driven by :mod:`pilot_worker.testing` but not serve.
        config: Worker options (:class:`WorkerConfig` defaults otherwise).
        codec: Maps wire values to handler payloads and results back.
        middleware: Initial middleware, outermost first.
        metrics_registry: Prometheus registry for the worker's metrics. By
            default a fresh one (with process, platform and GC collectors), so
            several workers can live in one process.
        tracer_provider: OpenTelemetry tracer provider (default: the global one).
        call_log: Where the one-line-per-call log goes. ``None``: records on
            the ``pilot_worker.calls`` logger. The CLI passes a
            :class:`CallLogWriter` on its own log stream (much cheaper per call).
        idempotency_store: Where results of ``idempotent=True`` handlers are
            kept: ``None`` is an in-memory cache of this process; an
            :class:`~pilot_worker.journal.IdempotencyJournal` shares them with
            a pool (close it with ``on_shutdown(journal.aclose)``).

    Usage::

        worker = WorkerServer(transport, WorkerConfig(port=5000))
        worker.include_module(my_handlers)
        async with worker:          # start(); on exit drain and aclose()
            await worker.wait_closed()
    """

    def __init__(
        self,
        transport: Any = None,
        config: WorkerConfig | None = None,
        *,
        codec: PayloadCodec | None = None,
        middleware: Sequence[Middleware] = (),
        metrics_registry: CollectorRegistry | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        call_log: CallLogWriter | None = None,
        idempotency_store: IdempotencyStore | None = None,
    ) -> None:
        if config is not None and not isinstance(config, WorkerConfig):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise WorkerConfigError("config must be a WorkerConfig")
        self._transport = transport
        self._config = config if config is not None else WorkerConfig()
        self._codec: PayloadCodec = codec if codec is not None else IdentityCodec()
        self._identity_codec = isinstance(self._codec, IdentityCodec)
        self._middleware: tuple[Middleware, ...] = ()
        for mw in middleware:
            self.add_middleware(mw)
        self._registry = metrics_registry if metrics_registry is not None else _default_registry()
        self._stats: dict[str, HandlerStats] = {}
        self._metrics = WorkerMetrics(
            self._registry, version=__version__, stats=lambda: self._stats
        )
        self._tracer = trace.get_tracer("pilot_worker", __version__, tracer_provider)
        self._explicit_tracer = tracer_provider is not None
        self._tracing_on = False
        self._tracing_recheck_at = 0.0
        self._call_log = call_log
        self._pool = SyncPool(self._config.sync_threads)
        self._metrics.bind_sync_busy(lambda: self._pool.busy)
        self._idempotency: IdempotencyStore = (
            idempotency_store
            if idempotency_store is not None
            else IdempotencyCache(
                ttl_secs=self._config.idempotency_ttl_secs,
                max_entries=self._config.idempotency_max_entries,
            )
        )
        self._entries: dict[str, _Entry] = {}
        self._state: State = "new"
        self._rpc: RpcServer | None = None
        self._listener: Any = None
        self._serve_task: asyncio.Task[None] | None = None
        self._http: OpsHttpServer | None = None
        self._periodic: list[_Periodic] = []
        self._shutdown_hooks: list[Callable[[], Awaitable[None] | None]] = []
        self._closed = asyncio.Event()
        self._close_lock = asyncio.Lock()
        self._started_at = time.monotonic()
        self._cut = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        for spec in self._builtin_specs():
            self._add_entry(spec, source=None)

    # ------------------------------------------------------------------ properties

    @property
    def config(self) -> WorkerConfig:
        """The worker's options."""
        return self._config

    @property
    def transport(self) -> Any:
        """The transport the worker serves on (``None`` offline)."""
        return self._transport

    @property
    def codec(self) -> PayloadCodec:
        """The payload codec."""
        return self._codec

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The Prometheus registry holding the worker's metrics."""
        return self._registry

    @property
    def handlers(self) -> Mapping[str, HandlerSpec]:
        """Registered handlers by name (read-only view, built-ins included)."""
        return types.MappingProxyType({name: e.spec for name, e in self._entries.items()})

    @property
    def state(self) -> State:
        """``"new"``, ``"serving"``, ``"draining"`` or ``"closed"``."""
        return self._state

    @property
    def in_flight(self) -> int:
        """Calls holding a slot right now (including overrunning sync handlers)."""
        return sum(s.in_flight for s in self._stats.values())

    @property
    def metrics_port(self) -> int | None:
        """Bound port of the ops HTTP endpoint, or ``None`` when it is off."""
        return self._http.port if self._http is not None else None

    @property
    def cut_calls(self) -> int:
        """Calls the last drain had to cut (cancelled, or sync threads abandoned)."""
        return self._cut

    # ---------------------------------------------------------------- registration

    def register(self, handler: HandlerSpec | Callable[..., Any]) -> HandlerSpec:
        """Register a decorated function, a plain function or a :class:`HandlerSpec`.

        A plain function is served under its ``__name__`` with default options.
        Registering the very same spec twice is a no-op. Allowed while serving
        (the method is added to the running server).

        Raises:
            DuplicateHandlerError: Another handler already has that name.
            HandlerDefinitionError: The function is not a valid handler.
            WorkerStateError: The worker is closed.
        """
        spec = self._as_spec(handler)
        self._check_open()
        existing = self._entries.get(spec.name)
        if existing is not None:
            if existing.spec is spec:
                return spec
            raise DuplicateHandlerError(
                f"handler name {spec.name!r} is defined twice: {existing.spec.origin} "
                f"and {spec.origin}"
            )
        self._add_entry(spec, source=None)
        return spec

    def include_module(self, module: types.ModuleType | str) -> list[HandlerSpec]:
        """Register every ``@pilot_handler`` function found in ``module``.

        ``module`` may be a module object, a dotted name or a ``.py`` path.
        All-or-nothing: on a duplicate name nothing from the module is added.

        Raises:
            HandlerImportError: The module cannot be imported.
            DuplicateHandlerError: A name is taken (the message names both).
        """
        mod = import_handler_module(module) if isinstance(module, str) else module
        specs = collect_specs(mod)
        self.replace_handlers(remove=(), add=specs, source=mod.__name__)
        return specs

    def unregister(self, name: str) -> None:
        """Remove a handler; running calls finish. Raises ``KeyError`` if unknown."""
        entry = self._entries[name]
        if entry.spec.builtin:
            raise WorkerStateError(f"built-in handler {name!r} cannot be removed")
        self.replace_handlers(remove=(name,), add=())

    def handlers_from(self, source: str) -> list[str]:
        """Names of the handlers registered by :meth:`include_module` from ``source``."""
        return [name for name, e in self._entries.items() if e.source == source]

    def source_of(self, name: str) -> str | None:
        """The module a handler was included from (``None`` if registered directly)."""
        entry = self._entries.get(name)
        return entry.source if entry is not None else None

    def replace_handlers(
        self, *, remove: Iterable[str], add: Iterable[HandlerSpec], source: str | None = None
    ) -> None:
        """Atomically remove some handlers and add others (used by ``--reload``).

        Checks everything first; on error nothing changes. Calls already
        running keep the old function. Stored idempotent results of replaced
        handlers are dropped.

        Raises:
            DuplicateHandlerError: An added name is taken by a handler not removed,
                or appears twice in ``add``.
            WorkerStateError: The worker is closed.
        """
        self._check_open()
        removing = set(remove)
        for name in removing:
            if name not in self._entries:
                raise KeyError(name)
            if self._entries[name].spec.builtin:
                raise WorkerStateError(f"built-in handler {name!r} cannot be removed")
        adding: dict[str, HandlerSpec] = {}
        for spec in add:
            spec = self._as_spec(spec)
            other = adding.get(spec.name)
            if other is None and spec.name not in removing:
                current = self._entries.get(spec.name)
                if current is not None and current.spec is not spec:
                    other = current.spec
            if other is not None and other is not spec:
                raise DuplicateHandlerError(
                    f"handler name {spec.name!r} is defined twice: {other.origin} and {spec.origin}"
                )
            adding[spec.name] = spec
        for name in removing - adding.keys():
            del self._entries[name]
            self._idempotency.forget(name)
            if self._rpc is not None:
                self._rpc.remove_method(name)
        for spec in adding.values():
            if spec.name in removing:
                self._idempotency.forget(spec.name)
            current = self._entries.get(spec.name)
            if current is not None and current.spec is spec:
                continue
            self._add_entry(spec, source=source)

    def add_middleware(self, middleware: Middleware) -> None:
        """Append ``middleware`` (it runs inside the ones added before it).

        A middleware is ``(payload, ctx, call_next) -> result``, sync or async.
        It may transform the payload, short-circuit by returning without calling
        ``call_next``, transform the result (async middleware) or raise an
        ``RpcError``. Takes effect for calls that start afterwards.
        """
        if not callable(middleware):
            raise HandlerDefinitionError("middleware must be callable")
        self._middleware = (*self._middleware, middleware)

    def add_periodic(
        self,
        interval_secs: float,
        fn: Callable[[], Any],
        *,
        name: str | None = None,
        run_immediately: bool = False,
    ) -> None:
        """Run ``fn`` every ``interval_secs`` while the worker serves.

        ``fn`` may be sync (run in the handler thread pool) or async. Runs
        never overlap; an exception is logged and counted
        (``pilot_worker_periodic_failures_total``) and the schedule continues.
        The worker owns the task and stops it on close.

        Raises:
            WorkerConfigError: ``interval_secs`` is not > 0.
        """
        if isinstance(interval_secs, bool) or not interval_secs > 0:
            raise WorkerConfigError("add_periodic: interval_secs must be > 0")
        if not callable(fn):
            raise WorkerConfigError("add_periodic: fn must be callable")
        self._check_open()
        periodic = _Periodic(
            name=name or getattr(fn, "__qualname__", "periodic"),
            interval=float(interval_secs),
            fn=fn,
            run_immediately=run_immediately,
        )
        self._periodic.append(periodic)
        if self._state == "serving":
            self._start_periodic(periodic)

    def on_shutdown(self, fn: Callable[[], Awaitable[None] | None]) -> None:
        """Call ``fn`` (sync or async) during :meth:`aclose`, after the drain.

        Hooks run in reverse order of registration, each bounded to 10 s; an
        exception is logged and does not stop the others.
        """
        if not callable(fn):
            raise WorkerConfigError("on_shutdown: fn must be callable")
        self._shutdown_hooks.append(fn)

    # ------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen on ``config.port`` and start serving; returns once serving.

        Raises:
            WorkerStateError: No transport, or already started/closed.
            pilot_transport.errors.TransportError: Listening failed (e.g.
                ``PortInUseError``).
            OSError: The ops HTTP port is taken.
        """
        if self._transport is None:
            raise WorkerStateError(
                "this worker has no transport; pass one to WorkerServer(transport, ...)"
            )
        if self._state != "new":
            raise WorkerStateError(f"start() on a worker that is {self._state}")
        self._loop = asyncio.get_running_loop()
        options = ServerOptions(include_tracebacks=self._config.include_tracebacks)
        rpc = RpcServer(options=options)
        for entry in self._entries.values():
            rpc.add_method(entry.spec.name, self._rpc_method(entry), kind=_kind(entry.spec))
        listener = await self._transport.listen(self._config.port)
        try:
            if self._config.metrics_port is not None:
                http = OpsHttpServer(
                    host=self._config.metrics_host,
                    port=self._config.metrics_port,
                    registry=self._registry,
                    alive=self.is_alive,
                    ready=self.check_ready,
                )
                await http.start()
                self._http = http
        except BaseException:
            await _aclose_quietly(listener)
            raise
        self._rpc = rpc
        self._listener = listener
        self._serve_task = asyncio.create_task(self._serve(rpc, listener), name="pilot-worker-rpc")
        self._state = "serving"
        self._started_at = time.monotonic()
        self._metrics.ready.set(1)
        for periodic in self._periodic:
            self._start_periodic(periodic)
        logger.info(
            "worker serving %d handlers on port %d",
            sum(1 for e in self._entries.values() if not e.spec.builtin),
            self._config.port,
        )

    async def _serve(self, rpc: RpcServer, listener: Any) -> None:
        try:
            await rpc.serve(listener)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the RPC server stopped with an error")
        finally:
            self._metrics.ready.set(0)

    async def serve(self) -> None:
        """Start (if needed) and serve until :meth:`aclose` or cancellation.

        Cancelling it closes the worker (after a drain bounded by
        ``config.drain_timeout_secs``). On a worker that is already closed it
        returns at once.

        Raises:
            WorkerStateError: The worker has no transport (from :meth:`start`).
            pilot_transport.errors.TransportError: Listening failed (from
                :meth:`start`).
            OSError: The ops HTTP port is taken (from :meth:`start`).
        """
        if self._state == "new":
            await self.start()
        try:
            await self._closed.wait()
        finally:
            await self.aclose()

    async def wait_closed(self) -> None:
        """Wait until the worker is closed."""
        await self._closed.wait()

    async def drain(self, timeout: float | None = None) -> int:  # noqa: ASYNC109 - a grace period
        """Stop accepting calls and let running ones finish, up to ``timeout``.

        ``/readyz`` turns false at once. New calls get ``UNAVAILABLE``
        (retry-safe). After ``timeout`` (default ``config.drain_timeout_secs``)
        remaining calls are cancelled. Safe to call again (later calls return 0).

        Returns:
            How many calls were cut: cancelled async calls plus sync handlers
            still running on a thread (they cannot be interrupted and are
            abandoned when the process exits).
        """
        if self._state in ("new", "draining", "closed"):
            if self._state == "new":
                self._state = "draining"
            return 0
        self._state = "draining"
        self._metrics.ready.set(0)
        grace = self._config.drain_timeout_secs if timeout is None else max(0.0, timeout)
        started = time.monotonic()
        cut = 0
        if self._rpc is not None:
            try:
                cut = await self._rpc.drain(grace)
            except Exception:
                logger.exception("RPC server drain failed")
        # Sync handlers past their deadline still hold a thread; give them what is left.
        if self._pool.busy:
            left = grace - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, left)):
                    await self._pool.wait_idle()
            cut += self._pool.busy
        self._cut = cut
        if cut:
            logger.warning("drain cut %d call(s) after %.1fs", cut, grace)
        else:
            logger.info("drained: all in-flight calls finished")
        return cut

    async def aclose(self) -> None:
        """Drain (if not drained), stop everything this worker started. Idempotent.

        Does not close the transport (the caller owns it).
        """
        async with self._close_lock:
            if self._state == "closed":
                return
            if self._state == "serving":
                await self.drain()
            self._state = "closed"
            self._metrics.ready.set(0)
            for periodic in self._periodic:
                if periodic.task is not None:
                    periodic.task.cancel()
            tasks = [p.task for p in self._periodic if p.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for hook in reversed(self._shutdown_hooks):
                await self._run_hook(hook)
            if self._http is not None:
                await self._http.aclose()
            if self._rpc is not None:
                try:
                    await self._rpc.aclose()
                except Exception:
                    logger.exception("closing the RPC server failed")
            if self._serve_task is not None:
                self._serve_task.cancel()
                await asyncio.gather(self._serve_task, return_exceptions=True)
            if self._listener is not None:
                await _aclose_quietly(self._listener)
            self._pool.close()
            self._closed.set()

    async def _run_hook(self, hook: Callable[[], Awaitable[None] | None]) -> None:
        try:
            async with asyncio.timeout(_SHUTDOWN_HOOK_TIMEOUT):
                result = hook()
                if inspect.isawaitable(result):
                    await result
        except Exception:
            logger.exception("shutdown hook %r failed", hook)

    async def __aenter__(self) -> WorkerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def is_alive(self) -> bool:
        """True while the worker is serving or draining (``/healthz``)."""
        return self._state in ("serving", "draining") and (
            self._serve_task is None or not self._serve_task.done()
        )

    async def check_ready(self) -> bool:
        """True when accepting calls and the transport answers (``/readyz``)."""
        if self._state != "serving" or self._serve_task is None or self._serve_task.done():
            return False
        info = getattr(self._transport, "info", None)
        if info is None:
            return True
        try:
            async with asyncio.timeout(2.0):
                await info()
        except Exception:
            return False
        return True

    async def describe_endpoint(self) -> dict[str, Any]:
        """What peers and probes need to reach this worker.

        Returns:
            ``{"node_id", "endpoint", "port", "pid", "metrics_port", "carrier"}``;
            ``endpoint`` is the carrier's bound endpoint (``"127.0.0.1:PORT"``
            on ``tcp://``) or ``None``.
        """
        node_id: str | None = None
        endpoint: str | None = None
        carrier: str | None = None
        info_fn = getattr(self._transport, "info", None)
        if info_fn is not None:
            info = await info_fn()
            node_id = getattr(info, "node_id", None)
            endpoint = getattr(info, "endpoint", None)
            carrier = getattr(info, "carrier", None)
        if node_id is None:
            identity = getattr(self._transport, "identity", None)
            node_id = getattr(identity, "node_id", None)
        return {
            "node_id": node_id,
            "endpoint": endpoint,
            "port": self._config.port,
            "pid": os.getpid(),
            "metrics_port": self.metrics_port,
            "carrier": carrier,
        }

    # -------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._state == "closed":
            raise WorkerStateError("the worker is closed")

    @staticmethod
    def _as_spec(handler: HandlerSpec | Callable[..., Any]) -> HandlerSpec:
        if isinstance(handler, HandlerSpec):
            return handler
        spec = get_handler_spec(handler)
        if spec is None:
            if not callable(handler):  # pyright: ignore[reportUnnecessaryComparison]
                raise HandlerDefinitionError(f"cannot register {handler!r}: not callable")
            spec = HandlerSpec(name=getattr(handler, "__name__", ""), fn=handler)
        return spec

    def _add_entry(self, spec: HandlerSpec, *, source: str | None) -> None:
        stats = self._stats.get(spec.name)
        if stats is None:
            stats = self._stats[spec.name] = HandlerStats(self._config.latency_window)
        entry = _Entry(spec, config=self._config, stats=stats, source=source)
        replacing = spec.name in self._entries
        self._entries[spec.name] = entry
        if self._rpc is not None:
            if replacing:
                self._rpc.replace_method(spec.name, self._rpc_method(entry), kind=_kind(spec))
            else:
                self._rpc.add_method(spec.name, self._rpc_method(entry), kind=_kind(spec))

    def _rpc_method(self, entry: _Entry) -> Callable[..., Any]:
        if entry.spec.kind is HandlerKind.SERVER_STREAMING:

            async def streaming(request: Any, call: IncomingCall) -> AsyncIterator[Any]:
                async for item in self.dispatch_stream(entry.spec.name, request, call, entry):
                    yield item

            return streaming

        # A partial, not a closure: one coroutine frame less per call.
        return functools.partial(self._unary, entry)

    def _start_periodic(self, periodic: _Periodic) -> None:
        if periodic.task is None or periodic.task.done():
            periodic.task = asyncio.create_task(
                self._run_periodic(periodic), name=f"pilot-worker-periodic-{periodic.name}"
            )

    async def _run_periodic(self, periodic: _Periodic) -> None:
        loop = asyncio.get_running_loop()
        if not periodic.run_immediately:
            await asyncio.sleep(periodic.interval)
        while True:
            started = loop.time()
            try:
                if _is_async_callable(periodic.fn):
                    await periodic.fn()
                else:
                    await self._pool.run(periodic.fn)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._metrics.periodic_failures.labels(periodic.name).inc()
                logger.exception("periodic task %r failed", periodic.name)
            await asyncio.sleep(max(0.0, periodic.interval - (loop.time() - started)))

    # ---------------------------------------------------------------- the pipeline

    def _entry_for(self, name: str, entry: _Entry | None) -> _Entry:
        if entry is not None:
            return entry
        found = self._entries.get(name)
        if found is None:
            from pilot_rpc import NotFound

            raise NotFound(f"no handler named {name!r}", details={"reason": "no_such_handler"})
        return found

    def _start_span(
        self, name: str, call: IncomingCall, node_id: str, now: float
    ) -> tuple[trace.Span, object | None]:
        if not self._explicit_tracer:
            if now >= self._tracing_recheck_at:
                # Looking the provider up reads the environment: do it once a second.
                provider = trace.get_tracer_provider()
                self._tracing_on = not isinstance(provider, trace.ProxyTracerProvider)
                self._tracing_recheck_at = now + 1.0
            if not self._tracing_on:
                # No SDK configured anywhere: skip the no-op span and its context switch.
                return _NO_SPAN, None
        return start_server_span(self._tracer, name, call.traceparent, node_id, call.request_id)

    def _reject(self, entry: _Entry, reason: str) -> None:
        entry.stats.reject(reason)

    def _admit(self, entry: _Entry, node_id: str, now: float) -> None:
        spec = entry.spec
        if self._state in ("draining", "closed"):
            self._reject(entry, "draining")
            raise Unavailable(
                "the worker is draining and accepts no new calls",
                details={"reason": "draining"},
                retry_safe=True,
            )
        allowed = entry.allow_set
        if (
            (node_id not in allowed)
            if allowed is not None
            else self._config.default_policy != "open"
        ):
            self._reject(entry, "acl")
            raise PermissionDenied(
                f"node {node_id} is not allowed to call {spec.name!r}",
                details={"reason": "acl", "handler": spec.name},
            )
        if entry.rate is not None:
            retry_after = entry.rate.try_acquire(node_id, now)
            if retry_after is not None:
                self._reject(entry, "rate_limit")
                raise ResourceExhausted(
                    f"rate limit of {spec.rate_per_caller} calls per {spec.rate_window_secs:g}s "
                    f"for {spec.name!r} reached",
                    details={
                        "reason": "rate_limit",
                        "handler": spec.name,
                        "limit": spec.rate_per_caller,
                        "window_secs": spec.rate_window_secs,
                        "retry_after_secs": round(retry_after, 3),
                    },
                )

    def _decode(self, entry: _Entry, request: Any) -> Any:
        if self._identity_codec:
            return request
        try:
            return self._codec.decode_request(request)
        except RpcError:
            raise
        except Exception as exc:
            self._reject(entry, "invalid_argument")
            raise InvalidArgument(
                f"cannot decode the request for {entry.spec.name!r}: {exc}",
                details={"reason": "invalid_argument", "type": type(exc).__name__},
            ) from exc

    def _encode(self, entry: _Entry, value: Any) -> Any:
        if self._identity_codec:
            return value
        try:
            return self._codec.encode_response(value)
        except Exception as exc:
            raise Internal(
                f"cannot encode the result of {entry.spec.name!r}: {exc}",
                details={"reason": "encode_failed", "type": type(exc).__name__},
            ) from exc

    def _deadline(self, spec: HandlerSpec, call: IncomingCall, now: float) -> float | None:
        deadline = call.deadline
        if spec.timeout_secs is not None:
            own = now + spec.timeout_secs
            deadline = own if deadline is None else min(deadline, own)
        return deadline

    @staticmethod
    def _timer_deadline(call: IncomingCall, deadline: float | None) -> float | None:
        """The deadline our own timer must enforce (``None``: no timer needed).

        pilot-rpc already cancels a call at the caller's deadline, so a timer
        is only needed when the handler's own timeout comes first (or offline,
        where nobody else enforces anything).
        """
        if (
            deadline is not None
            and isinstance(call, CallContext)
            and call.deadline is not None
            and call.deadline <= deadline
        ):
            return None
        return deadline

    def _deadline_error(
        self, spec: HandlerSpec, call: IncomingCall, deadline: float | None, stage: str
    ) -> RpcError:
        by_caller = call.deadline is not None and call.deadline == deadline
        who = (
            "the caller's deadline"
            if by_caller or spec.timeout_secs is None
            else f"its {spec.timeout_secs:g}s timeout"
        )
        return DeadlineExceeded(
            f"{spec.name!r} exceeded {who} ({stage})",
            details={"reason": "timeout", "handler": spec.name, "timeout_secs": spec.timeout_secs},
        )

    def _cancel_code(self, call: IncomingCall) -> str:
        deadline = call.deadline
        if deadline is not None and self._loop_time() >= deadline:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"

    def _loop_time(self) -> float:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.time()

    async def _acquire_slot(
        self, entry: _Entry, call: IncomingCall, deadline: float | None
    ) -> None:
        gate = entry.gate
        if gate is not None and not gate.try_acquire():
            await self._wait_for_slot(entry, gate, call, deadline)
        entry.stats.in_flight += 1

    async def _wait_for_slot(
        self, entry: _Entry, gate: ConcurrencyGate, call: IncomingCall, deadline: float | None
    ) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await gate.acquire()
        except GateFull as exc:
            self._reject(entry, exc.reason)
            raise ResourceExhausted(
                f"{entry.spec.name!r} is at its limit of {gate.limit} concurrent calls"
                + (" and its queue is full" if exc.reason == "queue_full" else ""),
                details={
                    "reason": exc.reason,
                    "handler": entry.spec.name,
                    "max_concurrent": gate.limit,
                },
            ) from None
        except TimeoutError:
            raise self._deadline_error(entry.spec, call, deadline, "while queued") from None

    @staticmethod
    def _release_slot(entry: _Entry, holder: _SyncHolder | None) -> None:
        fut = holder.future if holder is not None else None
        if fut is not None and not fut.done():
            # A sync handler still runs on its thread: the slot is freed when it ends.
            fut.add_done_callback(functools.partial(_release_now, entry))
        else:
            _release_now(entry)

    def _context(self, entry: _Entry, call: IncomingCall, deadline: float | None) -> Context:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return Context(
            call=call,
            handler_name=entry.spec.name,
            deadline=deadline,
            loop=loop,
            encode=None if self._identity_codec else self._codec.encode_response,
        )

    async def _invoke(
        self, entry: _Entry, payload: Any, ctx: Context, holder: _SyncHolder | None
    ) -> Any:
        """Innermost step: validate input, run the function, validate output."""
        spec = entry.spec
        if entry.input_adapter is not None:
            try:
                payload = entry.input_adapter.validate_python(payload)
            except ValidationError as exc:
                self._reject(entry, "invalid_argument")
                raise InvalidArgument(
                    f"invalid payload for {spec.name!r}: {exc.error_count()} validation error(s)",
                    details={"reason": "invalid_argument", "errors": _validation_details(exc)},
                ) from None
        args: tuple[Any, ...]
        if spec.takes_payload:
            args = (payload, ctx) if spec.takes_context else (payload,)
        else:
            args = (ctx,) if spec.takes_context else ()
        if spec.style is CallStyle.ASYNC_GENERATOR:
            return spec.fn(*args)
        if spec.style is CallStyle.SYNC:
            await self._pool.acquire()
            future = self._pool.start(spec.fn, *args)
            if holder is not None:
                holder.future = future
            result = await asyncio.shield(future)
        else:
            result = await spec.fn(*args)
        return self._check_output(entry, result)

    def _check_output(self, entry: _Entry, result: Any) -> Any:
        adapter = entry.output_adapter
        if adapter is None:
            if result.__class__ in _WIRE_TYPES:  # the common case, without an ABC check
                return result
            if isinstance(result, BaseModel):
                return result.model_dump(mode="json")
            return result
        try:
            return adapter.dump_python(adapter.validate_python(result), mode="json")
        except ValidationError as exc:
            raise Internal(
                f"{entry.spec.name!r} returned a value that does not match its output_model: "
                f"{exc.error_count()} validation error(s)",
                details={"reason": "invalid_output", "errors": _validation_details(exc)},
            ) from None

    async def _run_chain(
        self, entry: _Entry, payload: Any, ctx: Context, holder: _SyncHolder | None
    ) -> Any:
        middleware = self._middleware
        if not middleware:
            return await self._invoke(entry, payload, ctx, holder)

        async def innermost(p: Any, c: Context) -> Any:
            return await self._invoke(entry, p, c, holder)

        call_next: CallNext = innermost
        for mw in reversed(middleware):
            call_next = _link(mw, call_next)
        return await call_next(payload, ctx)

    def _internal(self, entry: _Entry, exc: Exception) -> Internal:
        handler_logger.error(
            "handler %r raised %s: %s",
            entry.spec.name,
            type(exc).__name__,
            exc,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        details: dict[str, Any] = {"reason": "handler_error", "type": type(exc).__name__}
        if self._config.include_tracebacks:
            details["traceback"] = "".join(traceback.format_exception(exc))
        return Internal(f"{type(exc).__name__}: {exc}", details=details)

    async def dispatch_unary(
        self, name: str, request: Any, call: IncomingCall, entry: _Entry | None = None
    ) -> Any:
        """Run a unary call through the whole pipeline (used by the RPC binding and tests).

        Raises:
            pilot_rpc.RpcError: The subclass the caller would receive.
        """
        if entry is None:
            entry = self._entry_for(name, None)
        return await self._unary(entry, request, call)

    async def _unary(self, entry: _Entry, request: Any, call: IncomingCall) -> Any:
        spec = entry.spec
        start = self._loop_time()
        node_id = call.peer.node_id
        code = "OK"
        reason: str | None = None
        message: str | None = None
        span, token = self._start_span(spec.name, call, node_id, start)
        try:
            self._admit(entry, node_id, start)
            payload = request if self._identity_codec else self._decode(entry, request)
            deadline = call.deadline
            if spec.timeout_secs is not None:
                own = start + spec.timeout_secs
                if deadline is None or own < deadline:
                    deadline = own
            if spec.idempotent:
                key = call.idempotency_key
                if key:
                    result, replayed = await self._idempotency.run(
                        (spec.name, node_id, key),
                        lambda: self._run_unary(entry, payload, call, deadline),
                        deadline=deadline,
                    )
                    if replayed:
                        entry.stats.replays += 1
                    return result
            return await self._run_unary(entry, payload, call, deadline)
        except RpcError as exc:
            code, message = exc.code.name, exc.message
            reason = exc.details.get("reason")
            raise
        except asyncio.CancelledError:
            code = self._cancel_code(call)
            raise
        except Exception as exc:
            err = self._internal(entry, exc)
            code, message, reason = "INTERNAL", err.message, "handler_error"
            raise err from exc
        finally:
            self._record(entry, call, code, reason, message, start, span, token)

    async def _run_unary(
        self, entry: _Entry, payload: Any, call: IncomingCall, deadline: float | None
    ) -> Any:
        gate = entry.gate
        if gate is not None and not gate.try_acquire():
            await self._wait_for_slot(entry, gate, call, deadline)
        entry.stats.in_flight += 1
        holder = _SyncHolder() if entry.spec.style is CallStyle.SYNC else None
        try:
            ctx = self._context(entry, call, deadline)
            timer = self._timer_deadline(call, deadline)
            if timer is None:
                spec = entry.spec
                if self._middleware:
                    result = await self._run_chain(entry, payload, ctx, holder)
                elif (
                    spec.style is CallStyle.ASYNC
                    and entry.input_adapter is None
                    and spec.takes_payload
                ):
                    # Fast path (no middleware, no validation, async): no extra coroutine.
                    fn = spec.fn
                    raw = await (fn(payload, ctx) if spec.takes_context else fn(payload))
                    result = self._check_output(entry, raw)
                else:
                    result = await self._invoke(entry, payload, ctx, holder)
            else:
                timeout = asyncio.timeout_at(timer)
                try:
                    async with timeout:
                        result = await self._run_chain(entry, payload, ctx, holder)
                except TimeoutError:
                    if timeout.expired():
                        raise self._deadline_error(
                            entry.spec, call, deadline, "while running"
                        ) from None
                    raise
            return result if self._identity_codec else self._encode(entry, result)
        except (RpcError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self._internal(entry, exc) from exc
        finally:
            fut = holder.future if holder is not None else None
            if fut is not None and not fut.done():
                fut.add_done_callback(functools.partial(_release_now, entry))
            else:
                entry.stats.in_flight -= 1
                if gate is not None:
                    gate.release()

    async def dispatch_stream(
        self, name: str, request: Any, call: IncomingCall, entry: _Entry | None = None
    ) -> AsyncGenerator[Any, None]:
        """Run a server-streaming call through the pipeline, yielding encoded items.

        ``timeout_secs`` bounds the whole stream. Closing the iterator early
        closes the handler's generator.

        Raises:
            pilot_rpc.RpcError: The subclass the caller would receive.
        """
        entry = self._entry_for(name, entry)
        spec = entry.spec
        start = now = self._loop_time()
        node_id = call.peer.node_id
        code = "OK"
        reason: str | None = None
        message: str | None = None
        span, token = self._start_span(spec.name, call, node_id, start)
        # The span must not stay attached across yields (the consumer may close
        # this generator from another context): detach now, re-enter per step.
        end_token: object | None = token
        traced = span is not _NO_SPAN
        holder: _SyncHolder | None = None
        acquired = False
        source: Any = None
        try:
            self._admit(entry, node_id, now)
            payload = self._decode(entry, request)
            deadline = self._deadline(spec, call, now)
            await self._acquire_slot(entry, call, deadline)
            acquired = True
            ctx = self._context(entry, call, deadline)
            timer = self._timer_deadline(call, deadline)
            timeout = asyncio.timeout_at(timer)
            try:
                async with timeout:
                    source = await self._run_chain(entry, payload, ctx, holder)
            except TimeoutError:
                if timeout.expired():
                    raise self._deadline_error(spec, call, deadline, "while starting") from None
                raise
            if not hasattr(source, "__anext__"):
                if hasattr(source, "__aiter__"):
                    source = source.__aiter__()
                else:
                    raise Internal(
                        f"{spec.name!r}: the middleware chain returned "
                        f"{type(source).__name__}, not an async iterator",
                        details={"reason": "handler_error"},
                    )
            _detach(end_token)
            end_token = None
            while True:
                step = asyncio.timeout_at(timer)
                try:
                    if traced:
                        with trace.use_span(span, end_on_exit=False):
                            async with step:
                                item = await source.__anext__()
                    else:
                        async with step:
                            item = await source.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if step.expired():
                        raise self._deadline_error(
                            spec, call, deadline, "while streaming"
                        ) from None
                    raise
                yield self._encode(entry, self._check_output(entry, item))
        except RpcError as exc:
            code, message = exc.code.name, exc.message
            reason = exc.details.get("reason")
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = self._cancel_code(call)
            raise
        except Exception as exc:
            err = self._internal(entry, exc)
            code, message, reason = "INTERNAL", err.message, "handler_error"
            raise err from exc
        finally:
            if source is not None and hasattr(source, "aclose"):
                with contextlib.suppress(Exception):
                    await source.aclose()
            if acquired:
                self._release_slot(entry, holder)
            self._record(entry, call, code, reason, message, start, span, end_token)

    def _record(
        self,
        entry: _Entry,
        call: IncomingCall,
        code: str,
        reason: str | None,
        message: str | None,
        start: float,
        span: trace.Span,
        token: object | None,
    ) -> None:
        duration = self._loop_time() - start
        entry.stats.observe(code, duration)
        if span is _NO_SPAN:
            pass
        elif token is not None:
            end_span(span, token, code, message)
        else:
            _end_detached(span, code, message)
        if not self._config.log_calls:
            return
        peer = call.peer
        writer = self._call_log
        if writer is not None:
            writer.write(
                handler=entry.spec.name,
                status=code,
                duration_ms=duration * 1000,
                caller=peer.node_id,
                caller_name=peer.name,
                request_id=call.request_id,
                reason=reason,
            )
            return
        level = logging.INFO if code == "OK" else logging.WARNING
        if call_logger.isEnabledFor(level):
            duration_ms = round(duration * 1000, 3)
            # makeRecord + handle: one line per call without logging's stack walk.
            record = call_logger.makeRecord(
                call_logger.name,
                level,
                "",
                0,
                "%s %s %.3fms caller=%s request_id=%s%s",
                (
                    entry.spec.name,
                    code,
                    duration_ms,
                    peer.node_id,
                    call.request_id,
                    f" reason={reason}" if reason else "",
                ),
                None,
                extra={
                    "request_id": call.request_id,
                    "caller": peer.node_id,
                    "caller_name": peer.name,
                    "handler": entry.spec.name,
                    "status": code,
                    "duration_ms": duration_ms,
                    "reason": reason,
                },
            )
            call_logger.handle(record)

    # ------------------------------------------------------------------ built-ins

    def _builtin_specs(self) -> list[HandlerSpec]:
        allow = self._config.introspection_allow
        return [
            HandlerSpec(
                name="_health",
                fn=self._health,
                allow=allow,
                timeout_secs=10.0,
                builtin=True,
                description="Liveness and totals of this worker.",
            ),
            HandlerSpec(
                name="_handlers",
                fn=self._handlers,
                allow=allow,
                timeout_secs=10.0,
                builtin=True,
                description="The handlers served, their ACL, limits, schemas and statistics.",
            ),
        ]

    async def _health(self) -> dict[str, Any]:
        calls = sum(s.calls for s in self._stats.values())
        errors = sum(s.errors for s in self._stats.values())
        return {
            "ok": self._state == "serving",
            "status": self._state,
            "version": __version__,
            "uptime_secs": round(time.monotonic() - self._started_at, 3),
            "in_flight": self.in_flight,
            "calls_total": calls,
            "errors_total": errors,
            "handlers": sum(1 for e in self._entries.values() if not e.spec.builtin),
            "sync_threads_busy": self._pool.busy,
        }

    async def _handlers(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name in sorted(self._entries):
            entry = self._entries[name]
            spec = entry.spec
            if entry.schemas is None:
                entry.schemas = {
                    "input_schema": _schema(entry.input_adapter),
                    "output_schema": _schema(entry.output_adapter),
                }
            stats = entry.stats
            out.append(
                {
                    "name": name,
                    "kind": spec.kind.value,
                    "style": spec.style.value,
                    "description": spec.description,
                    "builtin": spec.builtin,
                    "allow": list(spec.allow) if spec.allow is not None else None,
                    "effective_policy": (
                        "allowlist" if spec.allow is not None else self._config.default_policy
                    ),
                    "timeout_secs": spec.timeout_secs,
                    "rate_per_caller": spec.rate_per_caller,
                    "rate_window_secs": spec.rate_window_secs,
                    "max_concurrent": spec.max_concurrent,
                    "overflow": spec.overflow or self._config.overflow,
                    "idempotent": spec.idempotent,
                    **entry.schemas,
                    "calls": stats.calls,
                    "errors": stats.errors,
                    "rejected": stats.rejected,
                    "in_flight": stats.in_flight,
                    "latency_ms": percentiles(stats.latencies, _PERCENTILES),
                }
            )
        return out


def _release_now(entry: _Entry, _: object = None) -> None:
    entry.stats.in_flight -= 1
    if entry.gate is not None:
        entry.gate.release()


def _schema(adapter: TypeAdapter[Any] | None) -> dict[str, Any] | None:
    if adapter is None:
        return None
    try:
        return adapter.json_schema()
    except Exception as exc:  # some types have no JSON Schema (e.g. arbitrary classes)
        return {"description": f"no JSON Schema: {exc}"}


def _kind(spec: HandlerSpec) -> MethodKind:
    return (
        MethodKind.SERVER_STREAMING
        if spec.kind is HandlerKind.SERVER_STREAMING
        else MethodKind.UNARY
    )


def _is_async_callable(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


def _link(mw: Middleware, call_next: CallNext) -> CallNext:
    async def step(payload: Any, ctx: Context) -> Any:
        result = mw(payload, ctx, call_next)
        while inspect.isawaitable(result):
            result = await result
        return result

    return step


def _detach(token: object | None) -> None:
    if token is not None:
        from opentelemetry import context as otel_context

        otel_context.detach(token)  # pyright: ignore[reportArgumentType]


def _end_detached(span: trace.Span, code: str, message: str | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    if span.is_recording():
        span.set_attribute("rpc.pilot.status_code", code)
        if code != "OK":
            span.set_status(Status(StatusCode.ERROR, message or code))
    span.end()


async def _aclose_quietly(obj: Any) -> None:
    closer = getattr(obj, "aclose", None)
    if closer is None:
        return
    with contextlib.suppress(Exception):
        await closer()
