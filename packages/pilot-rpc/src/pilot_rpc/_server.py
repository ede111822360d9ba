"""RpcServer: a method table served on transport listeners."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from pilot_rpc._options import ServerOptions
from pilot_rpc._types import AnyHandler, ListenerLike, MethodKind

__all__ = ["RpcServer"]

F = TypeVar("F", bound=AnyHandler)


class RpcServer:
    """Serves named methods to authenticated peers."""

    def __init__(self, *, options: ServerOptions | None = None) -> None:
        self.options = options or ServerOptions()
        self._methods: dict[str, tuple[MethodKind, AnyHandler]] = {}

    def unary(self, name: str) -> Callable[[F], F]:
        """Register ``async def handler(request, ctx) -> reply`` as ``name``."""

        def register(fn: F) -> F:
            self.add_method(name, fn, kind=MethodKind.UNARY)
            return fn

        return register

    def server_streaming(self, name: str) -> Callable[[F], F]:
        """Register ``async def handler(request, ctx)`` yielding items as ``name``."""

        def register(fn: F) -> F:
            self.add_method(name, fn, kind=MethodKind.SERVER_STREAMING)
            return fn

        return register

    def add_method(self, name: str, handler: AnyHandler, *, kind: MethodKind) -> None:
        """Register ``handler`` as ``name``; raises ValueError if the name is taken."""
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        self._methods[name] = (MethodKind(kind), handler)

    def replace_method(self, name: str, handler: AnyHandler, *, kind: MethodKind) -> None:
        """Register or replace ``name``; calls already running keep the old handler."""
        self._methods[name] = (MethodKind(kind), handler)

    def remove_method(self, name: str) -> None:
        """Unregister ``name``; raises KeyError if unknown."""
        del self._methods[name]

    async def serve(self, listener: ListenerLike) -> None:
        """Accept and serve connections from ``listener`` until cancelled or closed."""
        raise NotImplementedError

    @asynccontextmanager
    async def serve_in_background(self, listener: ListenerLike) -> AsyncGenerator[RpcServer]:
        """Serve ``listener`` while the block runs; drain and stop on exit."""
        raise NotImplementedError
        yield self

    async def drain(self, timeout: float = 10.0) -> int:  # noqa: ASYNC109 (grace period, not a wait)
        """Send goaway, let in-flight calls finish up to ``timeout``, cut the rest."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Stop serving immediately (in-flight calls are cancelled)."""
        raise NotImplementedError

    def _describe(self) -> dict[str, Any]:
        return {name: kind.name for name, (kind, _) in self._methods.items()}
