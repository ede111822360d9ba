"""WorkerServer: registration (serving lands with the RPC binding)."""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pilot_worker._codec import IdentityCodec, PayloadCodec
from pilot_worker._config import WorkerConfig
from pilot_worker._handler import HandlerSpec, get_handler_spec
from pilot_worker.errors import DuplicateHandlerError, HandlerDefinitionError, WorkerStateError

__all__ = ["Middleware", "WorkerServer"]

Middleware = Callable[[Any, Any, Callable[[Any, Any], Awaitable[Any]]], Any]

logger = logging.getLogger("pilot_worker")


class WorkerServer:
    """Serves registered handlers to trusted peers over pilot-rpc."""

    def __init__(
        self,
        transport: Any = None,
        config: WorkerConfig | None = None,
        *,
        codec: PayloadCodec | None = None,
        middleware: Sequence[Middleware] = (),
        metrics_registry: Any = None,
    ) -> None:
        self._transport = transport
        self._config = config if config is not None else WorkerConfig()
        self._codec: PayloadCodec = codec if codec is not None else IdentityCodec()
        self._middleware: list[Middleware] = list(middleware)
        self._handlers: dict[str, HandlerSpec] = {}
        self._metrics_registry = metrics_registry
        self._closed = False

    @property
    def config(self) -> WorkerConfig:
        return self._config

    @property
    def handlers(self) -> Mapping[str, HandlerSpec]:
        return types.MappingProxyType(self._handlers)

    def register(self, handler: HandlerSpec | Callable[..., Any]) -> HandlerSpec:
        if self._closed:
            raise WorkerStateError("worker is closed")
        if isinstance(handler, HandlerSpec):
            spec = handler
        else:
            spec = get_handler_spec(handler)
            if spec is None:
                spec = HandlerSpec(name=getattr(handler, "__name__", ""), fn=handler)
        existing = self._handlers.get(spec.name)
        if existing is not None and existing is not spec:
            raise DuplicateHandlerError(
                f"handler name {spec.name!r} is defined twice: {existing.origin} and {spec.origin}"
            )
        self._handlers[spec.name] = spec
        return spec

    def include_module(self, module: types.ModuleType) -> list[HandlerSpec]:
        specs: list[HandlerSpec] = []
        for value in vars(module).values():
            spec = get_handler_spec(value)
            if spec is not None and spec not in specs:
                specs.append(spec)
        for spec in specs:
            self.register(spec)
        return specs

    def add_middleware(self, middleware: Middleware) -> None:
        if not callable(middleware):
            raise HandlerDefinitionError("middleware must be callable")
        self._middleware.append(middleware)

    def add_periodic(
        self, interval_secs: float, fn: Callable[[], Any], *, name: str | None = None
    ) -> None:
        raise WorkerStateError("periodic tasks are not available yet")

    def on_shutdown(self, fn: Callable[[], Awaitable[None] | None]) -> None:
        if not (inspect.iscoroutinefunction(fn) or callable(fn)):
            raise HandlerDefinitionError("on_shutdown needs a callable")

    async def serve(self) -> None:
        raise WorkerStateError("serving is not available yet")
