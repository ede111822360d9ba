"""Handler specs, the ``@pilot_handler`` decorator and signature inspection.

A handler is a plain function. Its *spec* (name, ACL, limits, models) is a
frozen :class:`HandlerSpec`, attached to the function by the decorator and read
back by :meth:`WorkerServer.include_module`. The decorator registers nothing
globally, so importing (or re-importing, under ``--reload``) a module has no side
effect on any worker.

Supported shapes, decided once at definition time::

    def f(payload): ...                  sync, runs in the worker's thread pool
    def f(payload, ctx): ...             sync with a Context
    async def f(payload[, ctx]): ...     async, runs on the event loop
    async def f(payload[, ctx]): yield   async generator -> server streaming
    def f(): ... / def f(ctx: Context)   no payload (the request must be None or is ignored)

Sync generators are refused (their ``next()`` would block the loop or need one
thread hop per item); write an ``async def`` generator instead.
"""

from __future__ import annotations

import enum
import functools
import inspect
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

from pilot_worker.errors import HandlerDefinitionError

__all__ = [
    "HANDLER_ATTRIBUTE",
    "CallStyle",
    "HandlerKind",
    "HandlerSpec",
    "Overflow",
    "get_handler_spec",
    "pilot_handler",
]

HANDLER_ATTRIBUTE = "__pilot_handler__"
"""Attribute under which ``@pilot_handler`` stores the :class:`HandlerSpec`."""

Overflow = Literal["reject", "queue"]
"""What a call does when its handler is at ``max_concurrent``: fail fast with
``RESOURCE_EXHAUSTED`` (``"reject"``), or wait in a bounded queue until a slot
frees or its deadline passes (``"queue"``)."""

_F = TypeVar("_F", bound=Callable[..., Any])

_MAX_NAME_LEN = 128


class HandlerKind(enum.Enum):
    """The RPC shape a handler is served as."""

    UNARY = "unary"
    SERVER_STREAMING = "server_streaming"


class CallStyle(enum.Enum):
    """How the worker invokes the function."""

    SYNC = "sync"
    ASYNC = "async"
    ASYNC_GENERATOR = "async_generator"


def _is_async_callable(fn: Callable[..., Any], test: Callable[[Any], bool]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func  # pyright: ignore[reportUnknownMemberType] -- partial.func is Callable[..., Any]
    if test(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 -- callable objects with an async __call__
    return call is not None and not inspect.isfunction(fn) and test(call)


def _style_of(name: str, fn: Callable[..., Any]) -> CallStyle:
    if _is_async_callable(fn, inspect.isasyncgenfunction):
        return CallStyle.ASYNC_GENERATOR
    if _is_async_callable(fn, inspect.iscoroutinefunction):
        return CallStyle.ASYNC
    if _is_async_callable(fn, inspect.isgeneratorfunction):
        raise HandlerDefinitionError(
            f"handler {name!r}: sync generator functions are not supported; "
            "make it an 'async def' generator to stream results"
        )
    return CallStyle.SYNC


def _is_context_annotation(hint: Any) -> bool:
    from pilot_worker._context import Context

    return hint is Context or (isinstance(hint, str) and hint.rsplit(".", 1)[-1] == "Context")


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func  # pyright: ignore[reportUnknownMemberType]
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: fall back to raw annotations
        return dict(getattr(target, "__annotations__", {}))


def _inspect_params(name: str, fn: Callable[..., Any]) -> tuple[bool, bool, dict[str, Any]]:
    """Return (takes_payload, takes_context, type hints)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise HandlerDefinitionError(f"handler {name!r}: cannot inspect signature: {exc}") from exc
    hints = _hints(fn)
    positional: list[inspect.Parameter] = []
    var_positional = False
    for param in sig.parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            positional.append(param)
        elif param.kind is param.VAR_POSITIONAL:
            var_positional = True
        elif param.kind is param.KEYWORD_ONLY and param.default is param.empty:
            raise HandlerDefinitionError(
                f"handler {name!r}: keyword-only parameter {param.name!r} needs a default; "
                "a handler is called as f(payload) or f(payload, ctx)"
            )
    required = [p for p in positional if p.default is p.empty]
    if len(required) > 2:
        raise HandlerDefinitionError(
            f"handler {name!r}: takes {len(required)} required positional parameters; "
            "expected f(), f(payload) or f(payload, ctx)"
        )
    if var_positional:
        return True, True, hints
    if len(positional) == 0:
        return False, False, hints
    if len(positional) == 1:
        only = positional[0]
        if _is_context_annotation(hints.get(only.name, only.annotation)):
            return False, True, hints
        return True, False, hints
    return True, True, hints


def _is_model_type(value: Any) -> bool:
    try:
        from pydantic import BaseModel
    except ImportError:  # pragma: no cover - pydantic is a dependency
        return False
    return isinstance(value, type) and issubclass(value, BaseModel)


def _check_positive(name: str, field_name: str, value: float | None, *, integer: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):  # pyright: ignore[reportUnnecessaryIsInstance] -- runtime check of user input
        raise HandlerDefinitionError(f"handler {name!r}: {field_name} must be a number or None")
    if integer and not isinstance(value, int):
        raise HandlerDefinitionError(f"handler {name!r}: {field_name} must be an int or None")
    if not math.isfinite(value) or value <= 0:
        raise HandlerDefinitionError(f"handler {name!r}: {field_name} must be > 0, got {value!r}")


def _validate_name(name: Any, *, builtin: bool) -> str:
    if not isinstance(name, str) or not name:
        raise HandlerDefinitionError(f"handler name must be a non-empty str, got {name!r}")
    if len(name) > _MAX_NAME_LEN:
        raise HandlerDefinitionError(f"handler name longer than {_MAX_NAME_LEN} characters")
    if not name.isprintable() or any(ch.isspace() for ch in name):
        raise HandlerDefinitionError(f"handler name {name!r} contains whitespace or control chars")
    if name.startswith("_") and not builtin:
        raise HandlerDefinitionError(
            f"handler name {name!r}: names starting with '_' are reserved for the worker's "
            "built-in handlers (_health, _handlers)"
        )
    return name


@dataclass(frozen=True, kw_only=True)
class HandlerSpec:
    """Everything the worker needs to serve one function.

    Build one with ``@pilot_handler`` or directly (``HandlerSpec(name=..., fn=...)``)
    and pass it to :meth:`WorkerServer.register`. Validated at construction.

    Attributes:
        name: RPC method name. Names starting with ``_`` are reserved.
        fn: The function (sync, async or async generator).
        allow: Node ids allowed to call. ``None`` follows the worker's
            ``default_policy``; ``[]`` denies everyone.
        timeout_secs: Longest a call may run (``None``: only the caller's
            deadline applies). Overruns are reported as ``DEADLINE_EXCEEDED``.
        rate_per_caller: Calls allowed per caller node id in any window of
            ``rate_window_secs`` (sliding). ``None``: unlimited.
        rate_window_secs: The sliding window's length.
        max_concurrent: Calls of this handler running at once. ``None``: only
            the worker-wide limits apply.
        overflow: ``"reject"`` or ``"queue"`` when at ``max_concurrent``;
            ``None`` uses ``WorkerConfig.overflow``.
        input_model: A pydantic model (or any type pydantic's ``TypeAdapter``
            accepts) the payload is validated into. Inferred from the payload
            parameter's annotation when it is a ``BaseModel`` subclass.
        output_model: Type the result (each item, when streaming) is validated
            against and dumped with (JSON mode). Inferred from a ``BaseModel``
            return annotation.
        idempotent: Remember successful results by the caller's idempotency
            key so a retried call does not run twice. Unary handlers only.
        description: Shown by ``_handlers``; defaults to the docstring's first line.
    """

    name: str
    fn: Callable[..., Any]
    allow: Sequence[str] | None = None
    timeout_secs: float | None = 30.0
    rate_per_caller: int | None = None
    rate_window_secs: float = 60.0
    max_concurrent: int | None = None
    overflow: Overflow | None = None
    input_model: Any = None
    output_model: Any = None
    idempotent: bool = False
    description: str | None = None
    builtin: bool = False
    kind: HandlerKind = field(init=False)
    style: CallStyle = field(init=False)
    takes_payload: bool = field(init=False)
    takes_context: bool = field(init=False)

    def __post_init__(self) -> None:
        name = _validate_name(self.name, builtin=self.builtin)
        if not callable(self.fn):
            raise HandlerDefinitionError(f"handler {name!r}: fn must be callable")
        style = _style_of(name, self.fn)
        takes_payload, takes_context, hints = _inspect_params(name, self.fn)
        allow = self.allow
        if allow is not None:
            if isinstance(allow, str | bytes):
                raise HandlerDefinitionError(
                    f"handler {name!r}: allow must be a list of node ids, not a single string"
                )
            items = tuple(allow)
            for node in items:
                if not isinstance(node, str) or not node:  # pyright: ignore[reportUnnecessaryIsInstance]
                    raise HandlerDefinitionError(
                        f"handler {name!r}: allow entries must be non-empty node id strings"
                    )
            object.__setattr__(self, "allow", items)
        _check_positive(name, "timeout_secs", self.timeout_secs, integer=False)
        _check_positive(name, "rate_per_caller", self.rate_per_caller, integer=True)
        _check_positive(name, "rate_window_secs", self.rate_window_secs, integer=False)
        _check_positive(name, "max_concurrent", self.max_concurrent, integer=True)
        if self.overflow not in (None, "reject", "queue"):
            raise HandlerDefinitionError(
                f"handler {name!r}: overflow must be 'reject', 'queue' or None"
            )
        if self.idempotent and style is CallStyle.ASYNC_GENERATOR:
            raise HandlerDefinitionError(
                f"handler {name!r}: idempotent=True is supported for unary handlers only"
            )
        input_model = self.input_model
        output_model = self.output_model
        if input_model is None and takes_payload:
            params = [
                p
                for p in inspect.signature(self.fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            if params and _is_model_type(hints.get(params[0].name)):
                input_model = hints[params[0].name]
        if (
            output_model is None
            and style is not CallStyle.ASYNC_GENERATOR
            and _is_model_type(hints.get("return"))
        ):
            output_model = hints["return"]
        for label, model in (("input_model", input_model), ("output_model", output_model)):
            if model is not None:
                _check_model(name, label, model)
        object.__setattr__(self, "input_model", input_model)
        object.__setattr__(self, "output_model", output_model)
        object.__setattr__(self, "style", style)
        object.__setattr__(
            self,
            "kind",
            HandlerKind.SERVER_STREAMING
            if style is CallStyle.ASYNC_GENERATOR
            else HandlerKind.UNARY,
        )
        object.__setattr__(self, "takes_payload", takes_payload)
        object.__setattr__(self, "takes_context", takes_context)
        if self.description is None:
            doc = inspect.getdoc(self.fn) or ""
            object.__setattr__(self, "description", doc.strip().split("\n", 1)[0] or None)

    @property
    def origin(self) -> str:
        """``module:qualname`` of the function, for error messages."""
        module = getattr(self.fn, "__module__", None) or "?"
        qualname = getattr(self.fn, "__qualname__", None) or type(self.fn).__qualname__
        return f"{module}:{qualname}"


def _check_model(name: str, label: str, model: Any) -> None:
    from pydantic import TypeAdapter

    try:
        TypeAdapter(model)
    except Exception as exc:
        raise HandlerDefinitionError(
            f"handler {name!r}: {label} {model!r} is not a type pydantic can validate: {exc}"
        ) from exc


@overload
def pilot_handler(name: _F, /) -> _F: ...


@overload
def pilot_handler(
    name: str | None = None,
    /,
    *,
    allow: Sequence[str] | None = None,
    timeout_secs: float | None = 30.0,
    rate_per_caller: int | None = None,
    rate_window_secs: float = 60.0,
    max_concurrent: int | None = None,
    overflow: Overflow | None = None,
    input_model: Any = None,
    output_model: Any = None,
    idempotent: bool = False,
    description: str | None = None,
) -> Callable[[_F], _F]: ...


def pilot_handler(
    name: Any = None,
    /,
    *,
    allow: Sequence[str] | None = None,
    timeout_secs: float | None = 30.0,
    rate_per_caller: int | None = None,
    rate_window_secs: float = 60.0,
    max_concurrent: int | None = None,
    overflow: Overflow | None = None,
    input_model: Any = None,
    output_model: Any = None,
    idempotent: bool = False,
    description: str | None = None,
) -> Any:
    """Mark a function as a worker handler.

    Usable as ``@pilot_handler``, ``@pilot_handler()`` or
    ``@pilot_handler("name", allow=[...], ...)``; the name defaults to the
    function's ``__name__``. The function is returned unchanged (still directly
    callable in tests) with its :class:`HandlerSpec` attached; nothing is
    registered until a worker includes it. See :class:`HandlerSpec` for the
    meaning of each argument.

    Raises:
        HandlerDefinitionError: The signature or an argument is invalid (at
            decoration time, so a bad handler fails on import, not on first call).
    """

    def decorate(fn: _F) -> _F:
        spec = HandlerSpec(
            name=fn.__name__ if handler_name is None else handler_name,
            fn=fn,
            allow=allow,
            timeout_secs=timeout_secs,
            rate_per_caller=rate_per_caller,
            rate_window_secs=rate_window_secs,
            max_concurrent=max_concurrent,
            overflow=overflow,
            input_model=input_model,
            output_model=output_model,
            idempotent=idempotent,
            description=description,
        )
        try:
            setattr(fn, HANDLER_ATTRIBUTE, spec)
        except (AttributeError, TypeError) as exc:
            raise HandlerDefinitionError(
                f"handler {spec.name!r}: cannot attach a spec to {fn!r}; "
                "register a HandlerSpec explicitly instead"
            ) from exc
        return fn

    if callable(name):
        handler_name: str | None = None
        return decorate(typing.cast(Callable[..., Any], name))
    handler_name = name
    return decorate


def get_handler_spec(obj: object) -> HandlerSpec | None:
    """Return the spec attached by ``@pilot_handler`` (``None`` if there is none)."""
    spec = getattr(obj, HANDLER_ATTRIBUTE, None)
    return spec if isinstance(spec, HandlerSpec) else None
