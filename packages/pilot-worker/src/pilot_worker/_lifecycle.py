"""The worker's lifecycle: ``new -> serving -> draining -> closed``.

:class:`WorkerLifecycle` owns everything that runs besides calls: the RPC
server and its listener, the ops HTTP endpoint, periodic tasks and shutdown
hooks. ``start()`` listens on the transport and starts them; ``drain()``
refuses new calls and lets running ones finish up to a timeout; ``aclose()``
drains (if not yet), stops periodic tasks, runs shutdown hooks in reverse
order and releases everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pilot_rpc import RpcServer, ServerOptions

from pilot_worker._config import WorkerConfig
from pilot_worker._http import OpsHttpServer
from pilot_worker._metrics import WorkerMetrics
from pilot_worker._pipeline import CallPipeline
from pilot_worker._pool import SyncPool
from pilot_worker._registry import HandlerRegistry
from pilot_worker.errors import WorkerConfigError, WorkerStateError

__all__ = ["State", "WorkerLifecycle", "server_options"]

logger = logging.getLogger("pilot_worker")

State = Literal["new", "serving", "draining", "closed"]
_SHUTDOWN_HOOK_TIMEOUT = 10.0


def server_options(config: WorkerConfig) -> ServerOptions:
    """The pilot-rpc server options a worker with ``config`` runs with."""
    kwargs: dict[str, Any] = {"include_tracebacks": config.include_tracebacks}
    if config.max_connections_per_peer is not None:
        kwargs["max_connections_per_peer"] = config.max_connections_per_peer
    return ServerOptions(**kwargs)


@dataclass(eq=False)
class _Periodic:
    name: str
    interval: float
    fn: Callable[[], Any]
    run_immediately: bool
    task: asyncio.Task[None] | None = field(default=None)


class WorkerLifecycle:
    """Starts, drains and closes what a worker runs besides calls."""

    def __init__(
        self,
        transport: Any,
        config: WorkerConfig,
        *,
        registry: HandlerRegistry,
        pipeline: CallPipeline,
        pool: SyncPool,
        metrics: WorkerMetrics,
    ) -> None:
        self._transport = transport
        self._config = config
        self._registry = registry
        self._pipeline = pipeline
        self._pool = pool
        self._metrics = metrics
        self.state: State = "new"
        self.rpc: RpcServer | None = None
        self._listener: Any = None
        self._serve_task: asyncio.Task[None] | None = None
        self.http: OpsHttpServer | None = None
        self.periodic: list[_Periodic] = []
        self._shutdown_hooks: list[Callable[[], Awaitable[None] | None]] = []
        self._closed = asyncio.Event()
        self._close_lock = asyncio.Lock()
        self.started_at = time.monotonic()
        self.cut = 0

    # ------------------------------------------------------------ registration

    def add_periodic(
        self,
        interval_secs: float,
        fn: Callable[[], Any],
        *,
        name: str | None,
        run_immediately: bool,
    ) -> None:
        """See :meth:`WorkerServer.add_periodic`."""
        if isinstance(interval_secs, bool) or not interval_secs > 0:
            raise WorkerConfigError("add_periodic: interval_secs must be > 0")
        if not callable(fn):
            raise WorkerConfigError("add_periodic: fn must be callable")
        self.check_open()
        periodic = _Periodic(
            name=name or getattr(fn, "__qualname__", "periodic"),
            interval=float(interval_secs),
            fn=fn,
            run_immediately=run_immediately,
        )
        self.periodic.append(periodic)
        if self.state == "serving":
            self._start_periodic(periodic)

    def on_shutdown(self, fn: Callable[[], Awaitable[None] | None]) -> None:
        """See :meth:`WorkerServer.on_shutdown`."""
        if not callable(fn):
            raise WorkerConfigError("on_shutdown: fn must be callable")
        self._shutdown_hooks.append(fn)

    def check_open(self) -> None:
        """Raise :class:`WorkerStateError` if closed."""
        if self.state == "closed":
            raise WorkerStateError("the worker is closed")

    # ------------------------------------------------------------------ serving

    async def start(
        self, *, alive: Callable[[], bool], ready: Callable[[], Awaitable[bool]]
    ) -> None:
        """See :meth:`WorkerServer.start`."""
        if self._transport is None:
            raise WorkerStateError(
                "this worker has no transport; pass one to WorkerServer(transport, ...)"
            )
        if self.state != "new":
            raise WorkerStateError(f"start() on a worker that is {self.state}")
        # The ACL is decided on a call's first piece, before pilot-rpc buffers
        # anything of its request: a peer may not pin memory with calls it may
        # not make. The pipeline checks again (rate limits, draining) per call.
        rpc = RpcServer(options=server_options(self._config), authorize=self._pipeline.authorize)
        listener = await self._transport.listen(self._config.port)
        try:
            if self._config.metrics_port is not None:
                http = OpsHttpServer(
                    host=self._config.metrics_host,
                    port=self._config.metrics_port,
                    registry=self._metrics.registry,
                    alive=alive,
                    ready=ready,
                    max_connections=self._config.ops_max_connections,
                    read_timeout=self._config.ops_read_timeout_secs,
                )
                await http.start()
                self.http = http
        except BaseException:
            await _aclose_quietly(listener)
            raise
        self._registry.attach(rpc, self._pipeline.method_for)
        self.rpc = rpc
        self._listener = listener
        self._serve_task = asyncio.create_task(self._serve(rpc, listener), name="pilot-worker-rpc")
        self.state = "serving"
        self.started_at = time.monotonic()
        self._metrics.ready.set(1)
        for periodic in self.periodic:
            self._start_periodic(periodic)
        logger.info(
            "worker serving %d handlers on port %d",
            self._registry.served_count(),
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

    async def wait_closed(self) -> None:
        """Wait until closed."""
        await self._closed.wait()

    def serving_task_alive(self) -> bool:
        """True unless the RPC serve task has ended."""
        return self._serve_task is None or not self._serve_task.done()

    # ------------------------------------------------------------------ draining

    async def drain(self, timeout: float | None) -> int:  # noqa: ASYNC109 - a grace period
        """See :meth:`WorkerServer.drain`."""
        if self.state in ("new", "draining", "closed"):
            if self.state == "new":
                self._set_state("draining")
            return 0
        self._set_state("draining")
        self._metrics.ready.set(0)
        grace = self._config.drain_timeout_secs if timeout is None else max(0.0, timeout)
        started = time.monotonic()
        cut = 0
        if self.rpc is not None:
            try:
                cut = await self.rpc.drain(grace)
            except Exception:
                logger.exception("RPC server drain failed")
        # Handlers past their deadline (sync threads, async code that ignored its
        # cancellation) still run: give them what is left of the grace period.
        if self._pool.busy or self._pipeline.overrunning:
            left = grace - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, left)):
                    await self._pool.wait_idle()
                    await self._pipeline.wait_overrunning()
            cut += self._pool.busy + self._pipeline.overrunning
        self.cut = cut
        if cut:
            logger.warning("drain cut %d call(s) after %.1fs", cut, grace)
        else:
            logger.info("drained: all in-flight calls finished")
        return cut

    async def aclose(self) -> None:
        """See :meth:`WorkerServer.aclose`."""
        async with self._close_lock:
            if self.state == "closed":
                return
            if self.state == "serving":
                await self.drain(None)
            self._set_state("closed")
            self._metrics.ready.set(0)
            self._pipeline.cancel_overrunning()
            for periodic in self.periodic:
                if periodic.task is not None:
                    periodic.task.cancel()
            tasks = [p.task for p in self.periodic if p.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for hook in reversed(self._shutdown_hooks):
                await _run_hook(hook)
            if self.http is not None:
                await self.http.aclose()
            if self.rpc is not None:
                try:
                    await self.rpc.aclose()
                except Exception:
                    logger.exception("closing the RPC server failed")
            if self._serve_task is not None:
                self._serve_task.cancel()
                await asyncio.gather(self._serve_task, return_exceptions=True)
            if self._listener is not None:
                await _aclose_quietly(self._listener)
            self._pool.close()
            self._closed.set()

    def _set_state(self, state: State) -> None:
        self.state = state
        self._pipeline.accepting = state in ("new", "serving")

    # ------------------------------------------------------------------ probes

    async def check_ready(self) -> bool:
        """See :meth:`WorkerServer.check_ready`."""
        if self.state != "serving" or not self.serving_task_alive():
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
        """See :meth:`WorkerServer.describe_endpoint`."""
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
            "metrics_port": self.http.port if self.http is not None else None,
            "carrier": carrier,
        }

    # ---------------------------------------------------------------- periodic

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


async def _run_hook(hook: Callable[[], Awaitable[None] | None]) -> None:
    try:
        async with asyncio.timeout(_SHUTDOWN_HOOK_TIMEOUT):
            result = hook()
            if inspect.isawaitable(result):
                await result
    except Exception:
        logger.exception("shutdown hook %r failed", hook)


def _is_async_callable(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


async def _aclose_quietly(obj: Any) -> None:
    closer = getattr(obj, "aclose", None)
    if closer is None:
        return
    with contextlib.suppress(Exception):
        await closer()
