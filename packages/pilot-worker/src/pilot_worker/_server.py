"""WorkerServer: the public face of a worker.

A worker is three parts, each small enough to read on its own:

- :class:`~pilot_worker._registry.HandlerRegistry` (``_registry.py``): the
  handlers served, by name, with their limiters and the ACL lookup;
- :class:`~pilot_worker._pipeline.CallPipeline` (``_pipeline.py``): the one
  path every call takes, from arrival (draining, ACL, rate limit, decode,
  idempotency, concurrency gate, deadline, middleware, validation, the
  handler, output check) to the encoded answer;
- :class:`~pilot_worker._lifecycle.WorkerLifecycle` (``_lifecycle.py``):
  ``new -> serving -> draining -> closed``, the RPC server, the ops HTTP
  endpoint, periodic tasks and shutdown hooks.

Every call, whatever its outcome, is counted in the metrics, in the
per-handler stats shown by ``_handlers``, in one log line and in one
OpenTelemetry SERVER span continuing the caller's ``traceparent``
(``_recording.py``).
"""

from __future__ import annotations

import time
import types
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from pydantic import TypeAdapter

from pilot_worker._call import IncomingCall
from pilot_worker._codec import IdentityCodec, PayloadCodec
from pilot_worker._config import WorkerConfig
from pilot_worker._handler import HandlerSpec
from pilot_worker._idempotency import IdempotencyCache
from pilot_worker._lifecycle import State, WorkerLifecycle
from pilot_worker._logging import CallLogWriter
from pilot_worker._metrics import WorkerMetrics, percentiles
from pilot_worker._modules import collect_specs, import_handler_module
from pilot_worker._pipeline import CallNext, CallPipeline, Middleware
from pilot_worker._pool import SyncPool
from pilot_worker._recording import CallRecorder
from pilot_worker._registry import HandlerRegistry, as_spec
from pilot_worker._steps import IdempotencyStore
from pilot_worker._version import __version__
from pilot_worker.errors import HandlerDefinitionError, WorkerConfigError, WorkerStateError

__all__ = ["CallNext", "Middleware", "WorkerServer"]

_PERCENTILES = (50.0, 90.0, 99.0)


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
        self._config = config = config if config is not None else WorkerConfig()
        self._codec: PayloadCodec = codec if codec is not None else IdentityCodec()
        self._prometheus = metrics_registry if metrics_registry is not None else _default_registry()
        self._registry = registry = HandlerRegistry(config)
        self._metrics = WorkerMetrics(
            self._prometheus, version=__version__, stats=lambda: registry.stats
        )
        self._pool = SyncPool(config.sync_threads)
        self._metrics.bind_sync_busy(lambda: self._pool.busy)
        self._idempotency: IdempotencyStore = (
            idempotency_store
            if idempotency_store is not None
            else IdempotencyCache(
                ttl_secs=config.idempotency_ttl_secs,
                max_entries=config.idempotency_max_entries,
            )
        )
        recorder = CallRecorder(
            trace.get_tracer("pilot_worker", __version__, tracer_provider),
            explicit_tracer=tracer_provider is not None,
            log_calls=config.log_calls,
            call_log=call_log,
        )
        self._pipeline = CallPipeline(
            registry,
            codec=self._codec,
            pool=self._pool,
            idempotency=self._idempotency,
            recorder=recorder,
            include_tracebacks=config.include_tracebacks,
        )
        self._lifecycle = WorkerLifecycle(
            transport,
            config,
            registry=registry,
            pipeline=self._pipeline,
            pool=self._pool,
            metrics=self._metrics,
        )
        for mw in middleware:
            self.add_middleware(mw)
        for spec in self._builtin_specs():
            registry.add_builtin(spec)

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
        return self._prometheus

    @property
    def handlers(self) -> Mapping[str, HandlerSpec]:
        """Registered handlers by name (read-only view, built-ins included)."""
        return self._registry.specs()

    def handler_spec(self, name: str) -> HandlerSpec | None:
        """The handler served as ``name`` (built-ins included), or ``None``.

        Cheaper than ``handlers.get(name)`` (no view is built): for middleware
        that looks its handler up on every call.
        """
        entry = self._registry.entries.get(name)
        return entry.spec if entry is not None else None

    @property
    def state(self) -> State:
        """``"new"``, ``"serving"``, ``"draining"`` or ``"closed"``."""
        return self._lifecycle.state

    @property
    def in_flight(self) -> int:
        """Calls holding a slot right now (including handlers past their deadline)."""
        return sum(s.in_flight for s in self._registry.stats.values())

    @property
    def metrics_port(self) -> int | None:
        """Bound port of the ops HTTP endpoint, or ``None`` when it is off."""
        http = self._lifecycle.http
        return http.port if http is not None else None

    @property
    def cut_calls(self) -> int:
        """Calls the last drain had to cut (cancelled, or handlers still running)."""
        return self._lifecycle.cut

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
        spec = as_spec(handler)
        self._lifecycle.check_open()
        return self._registry.register(spec)

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
        entry = self._registry.entries[name]
        if entry.spec.builtin:
            raise WorkerStateError(f"built-in handler {name!r} cannot be removed")
        self.replace_handlers(remove=(name,), add=())

    def handlers_from(self, source: str) -> list[str]:
        """Names of the handlers registered by :meth:`include_module` from ``source``."""
        return self._registry.from_source(source)

    def source_of(self, name: str) -> str | None:
        """The module a handler was included from (``None`` if registered directly)."""
        return self._registry.source_of(name)

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
        self._lifecycle.check_open()
        self._registry.replace(
            remove=remove, add=add, source=source, forget=self._idempotency.forget
        )

    def add_middleware(self, middleware: Middleware) -> None:
        """Append ``middleware`` (it runs inside the ones added before it).

        A middleware is ``(payload, ctx, call_next) -> result``, sync or async.
        It may transform the payload, short-circuit by returning without calling
        ``call_next``, transform the result (async middleware) or raise an
        ``RpcError``. Takes effect for calls that start afterwards.
        """
        if not callable(middleware):
            raise HandlerDefinitionError("middleware must be callable")
        self._pipeline.middleware = (*self._pipeline.middleware, middleware)

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
        self._lifecycle.add_periodic(interval_secs, fn, name=name, run_immediately=run_immediately)

    def on_shutdown(self, fn: Callable[[], Awaitable[None] | None]) -> None:
        """Call ``fn`` (sync or async) during :meth:`aclose`, after the drain.

        Hooks run in reverse order of registration, each bounded to 10 s; an
        exception is logged and does not stop the others.
        """
        self._lifecycle.on_shutdown(fn)

    # ------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen on ``config.port`` and start serving; returns once serving.

        Raises:
            WorkerStateError: No transport, or already started/closed.
            pilot_transport.errors.TransportError: Listening failed (e.g.
                ``PortInUseError``).
            OSError: The ops HTTP port is taken.
        """
        await self._lifecycle.start(alive=self.is_alive, ready=self.check_ready)

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
        if self._lifecycle.state == "new":
            await self.start()
        try:
            await self._lifecycle.wait_closed()
        finally:
            await self.aclose()

    async def wait_closed(self) -> None:
        """Wait until the worker is closed."""
        await self._lifecycle.wait_closed()

    async def drain(self, timeout: float | None = None) -> int:  # noqa: ASYNC109 - a grace period
        """Stop accepting calls and let running ones finish, up to ``timeout``.

        ``/readyz`` turns false at once. New calls get ``UNAVAILABLE``
        (retry-safe). After ``timeout`` (default ``config.drain_timeout_secs``)
        remaining calls are cancelled. Safe to call again (later calls return 0).

        Returns:
            How many calls were cut: cancelled async calls plus handlers still
            running after their answer (sync threads cannot be interrupted and
            are abandoned when the process exits).
        """
        return await self._lifecycle.drain(timeout)

    async def aclose(self) -> None:
        """Drain (if not drained), stop everything this worker started. Idempotent.

        Does not close the transport (the caller owns it).
        """
        await self._lifecycle.aclose()

    async def __aenter__(self) -> WorkerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def is_alive(self) -> bool:
        """True while the worker is serving or draining (``/healthz``)."""
        return self._lifecycle.state in ("serving", "draining") and (
            self._lifecycle.serving_task_alive()
        )

    async def check_ready(self) -> bool:
        """True when accepting calls and the transport answers (``/readyz``)."""
        return await self._lifecycle.check_ready()

    async def describe_endpoint(self) -> dict[str, Any]:
        """What peers and probes need to reach this worker.

        Returns:
            ``{"node_id", "endpoint", "port", "pid", "metrics_port", "carrier"}``;
            ``endpoint`` is the carrier's bound endpoint (``"127.0.0.1:PORT"``
            on ``tcp://``) or ``None``.
        """
        return await self._lifecycle.describe_endpoint()

    # -------------------------------------------------------------------- calling

    async def dispatch_unary(
        self, name: str, request: Any, call: IncomingCall, entry: Any = None
    ) -> Any:
        """Run a unary call through the whole pipeline (used by the RPC binding and tests).

        Raises:
            pilot_rpc.RpcError: The subclass the caller would receive.
        """
        return await self._pipeline.unary(
            entry if entry is not None else self._registry.lookup(name), request, call
        )

    async def dispatch_stream(
        self, name: str, request: Any, call: IncomingCall, entry: Any = None
    ) -> AsyncGenerator[Any, None]:
        """Run a server-streaming call through the pipeline, yielding encoded items.

        ``timeout_secs`` bounds the whole stream. Closing the iterator early
        closes the handler's generator.

        Raises:
            pilot_rpc.RpcError: The subclass the caller would receive.
        """
        found = entry if entry is not None else self._registry.lookup(name)
        stream = self._pipeline.stream(found, request, call)
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

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
        stats = self._registry.stats.values()
        return {
            "ok": self._lifecycle.state == "serving",
            "status": self._lifecycle.state,
            "version": __version__,
            "uptime_secs": round(time.monotonic() - self._lifecycle.started_at, 3),
            "in_flight": self.in_flight,
            "calls_total": sum(s.calls for s in stats),
            "errors_total": sum(s.errors for s in stats),
            "handlers": self._registry.served_count(),
            "sync_threads_busy": self._pool.busy,
        }

    async def _handlers(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        entries = self._registry.entries
        for name in sorted(entries):
            entry = entries[name]
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
                    "deadline_overruns": stats.overruns,
                    "latency_ms": percentiles(stats.latencies, _PERCENTILES),
                }
            )
        return out


def _schema(adapter: TypeAdapter[Any] | None) -> dict[str, Any] | None:
    if adapter is None:
        return None
    try:
        return adapter.json_schema()
    except Exception as exc:  # some types have no JSON Schema (e.g. arbitrary classes)
        return {"description": f"no JSON Schema: {exc}"}
