"""The handler registry: what is served, under which name, to whom.

:class:`HandlerRegistry` owns one :class:`HandlerEntry` per served name (the
spec plus its limiters, validators and statistics) and answers the two
questions the call pipeline asks before running anything: *which entry* does
a method name mean, and *may this caller* run it (the ACL). Changes are
all-or-nothing and are mirrored onto the running RPC server, if one is
attached, so a reload swaps methods without a restart.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pilot_rpc import MethodKind, NotFound, RpcServer
from pydantic import TypeAdapter

from pilot_worker._config import WorkerConfig
from pilot_worker._handler import HandlerKind, HandlerSpec, get_handler_spec
from pilot_worker._limits import ConcurrencyGate, SlidingWindowLimiter
from pilot_worker._metrics import HandlerStats
from pilot_worker.errors import DuplicateHandlerError, HandlerDefinitionError, WorkerStateError

__all__ = ["HandlerEntry", "HandlerRegistry", "as_spec"]


class HandlerEntry:
    """A registered handler with its limiters, validators and statistics."""

    __slots__ = (
        "allow_set",
        "gate",
        "input_adapter",
        "open_to_all",
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
        # The ACL in two fields: an allow list, else the worker's default policy.
        self.open_to_all = spec.allow is None and config.default_policy == "open"
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


def as_spec(handler: HandlerSpec | Callable[..., Any]) -> HandlerSpec:
    """The :class:`HandlerSpec` of a decorated function, a plain function or a spec.

    Raises:
        HandlerDefinitionError: ``handler`` is not callable or not a valid handler.
    """
    if isinstance(handler, HandlerSpec):
        return handler
    spec = get_handler_spec(handler)
    if spec is None:
        if not callable(handler):  # pyright: ignore[reportUnnecessaryComparison]
            raise HandlerDefinitionError(f"cannot register {handler!r}: not callable")
        spec = HandlerSpec(name=getattr(handler, "__name__", ""), fn=handler)
    return spec


def method_kind(spec: HandlerSpec) -> MethodKind:
    """The pilot-rpc method kind a handler is served as."""
    return (
        MethodKind.SERVER_STREAMING
        if spec.kind is HandlerKind.SERVER_STREAMING
        else MethodKind.UNARY
    )


class HandlerRegistry:
    """Handlers by name, their ACL, and the binding to a running RPC server.

    Args:
        config: The worker's options (defaults for limits and the ACL policy).
    """

    def __init__(self, config: WorkerConfig) -> None:
        self._config = config
        self.entries: dict[str, HandlerEntry] = {}
        self.stats: dict[str, HandlerStats] = {}
        self._rpc: RpcServer | None = None
        self._method_for: Callable[[HandlerEntry], Callable[..., Any]] | None = None

    # ------------------------------------------------------------------ lookups

    def specs(self) -> Mapping[str, HandlerSpec]:
        """Registered handlers by name (read-only view, built-ins included)."""
        return types.MappingProxyType({name: e.spec for name, e in self.entries.items()})

    def lookup(self, name: str) -> HandlerEntry:
        """The entry served as ``name``.

        Raises:
            pilot_rpc.NotFound: No handler has that name (reason ``no_such_handler``).
        """
        found = self.entries.get(name)
        if found is None:
            raise NotFound(f"no handler named {name!r}", details={"reason": "no_such_handler"})
        return found

    def allows(self, entry: HandlerEntry, node_id: str) -> bool:
        """Whether ``node_id`` may call ``entry`` (its ``allow`` list or the default policy)."""
        allowed = entry.allow_set
        return node_id in allowed if allowed is not None else entry.open_to_all

    def served_count(self) -> int:
        """How many handlers are served, built-ins excluded."""
        return sum(1 for e in self.entries.values() if not e.spec.builtin)

    def from_source(self, source: str) -> list[str]:
        """Names of the handlers included from module ``source``."""
        return [name for name, e in self.entries.items() if e.source == source]

    def source_of(self, name: str) -> str | None:
        """The module a handler was included from (``None`` if registered directly)."""
        entry = self.entries.get(name)
        return entry.source if entry is not None else None

    # ---------------------------------------------------------------- changes

    def register(self, spec: HandlerSpec) -> HandlerSpec:
        """Add ``spec``; the very same spec twice is a no-op.

        Raises:
            DuplicateHandlerError: Another handler already has that name.
        """
        existing = self.entries.get(spec.name)
        if existing is not None:
            if existing.spec is spec:
                return spec
            raise DuplicateHandlerError(
                f"handler name {spec.name!r} is defined twice: {existing.spec.origin} "
                f"and {spec.origin}"
            )
        self._add(spec, source=None)
        return spec

    def replace(
        self,
        *,
        remove: Iterable[str],
        add: Iterable[HandlerSpec],
        source: str | None,
        forget: Callable[[str], None],
    ) -> None:
        """Atomically remove some handlers and add others; on error nothing changes.

        ``forget(name)`` is called for every name whose function goes away (to
        drop stored idempotent results).

        Raises:
            KeyError: A name in ``remove`` is not registered.
            WorkerStateError: A built-in is to be removed.
            DuplicateHandlerError: An added name is taken or given twice.
        """
        removing = set(remove)
        for name in removing:
            if name not in self.entries:
                raise KeyError(name)
            if self.entries[name].spec.builtin:
                raise WorkerStateError(f"built-in handler {name!r} cannot be removed")
        adding: dict[str, HandlerSpec] = {}
        for spec in add:
            spec = as_spec(spec)
            other = adding.get(spec.name)
            if other is None and spec.name not in removing:
                current = self.entries.get(spec.name)
                if current is not None and current.spec is not spec:
                    other = current.spec
            if other is not None and other is not spec:
                raise DuplicateHandlerError(
                    f"handler name {spec.name!r} is defined twice: {other.origin} and {spec.origin}"
                )
            adding[spec.name] = spec
        for name in removing - adding.keys():
            del self.entries[name]
            forget(name)
            if self._rpc is not None:
                self._rpc.remove_method(name)
        for spec in adding.values():
            if spec.name in removing:
                forget(spec.name)
            current = self.entries.get(spec.name)
            if current is not None and current.spec is spec:
                continue
            self._add(spec, source=source)

    def add_builtin(self, spec: HandlerSpec) -> None:
        """Add a built-in handler (``_health``, ``_handlers``)."""
        self._add(spec, source=None)

    def attach(
        self, rpc: RpcServer, method_for: Callable[[HandlerEntry], Callable[..., Any]]
    ) -> None:
        """Serve every entry on ``rpc`` and mirror later changes onto it."""
        self._rpc = rpc
        self._method_for = method_for
        for entry in self.entries.values():
            rpc.add_method(entry.spec.name, method_for(entry), kind=method_kind(entry.spec))

    def _add(self, spec: HandlerSpec, *, source: str | None) -> None:
        stats = self.stats.get(spec.name)
        if stats is None:
            stats = self.stats[spec.name] = HandlerStats(self._config.latency_window)
        entry = HandlerEntry(spec, config=self._config, stats=stats, source=source)
        replacing = spec.name in self.entries
        self.entries[spec.name] = entry
        rpc, method_for = self._rpc, self._method_for
        if rpc is not None and method_for is not None:
            if replacing:
                rpc.replace_method(spec.name, method_for(entry), kind=method_kind(spec))
            else:
                rpc.add_method(spec.name, method_for(entry), kind=method_kind(spec))
