"""Decoding checkpoints without running code named by the stored data.

Theory of operation
-------------------
LangGraph's ``JsonPlusSerializer`` rebuilds objects from msgpack extension
values that carry a ``(module, name, args)`` triple: it imports ``module`` and
calls ``name``. By default (``allowed_msgpack_modules=True``) any pair is
accepted, so whoever can write a checkpoint (a peer of a shared store, a
compromised store worker, anyone with the database file) can make every
reader import and call ``os.system``.

:class:`AllowlistSerializer` is LangGraph's own serializer in its strict mode
(an explicit ``allowed_msgpack_modules`` set): LangGraph's built-in safe types
(LangChain messages, ``Document``, ``Send``, ``Interrupt``, ``Command``,
datetimes, UUIDs...) plus the types the user registers. LangGraph's strict
mode does not import a refused pair; it returns the raw arguments instead and
logs a warning. That would hand the graph a ``dict`` where its state expects a
model and fail later, far from the cause, so this serializer turns a refusal
into :class:`~pilot_checkpoint_sqlite.errors.CheckpointTypeRefusedError`,
which names every refused type and how to allow it. Refusals are observed
through LangGraph's serde event hook (``msgpack_blocked`` and
``msgpack_method_blocked``), collected per ``loads_typed`` call in a context
variable, so concurrent decodes on other threads never mix.

Registering a type (``allowed_types=[State]``) also registers every pydantic
model, dataclass, enum and named tuple reachable from its annotations, so the
graph's state schema is enough for nested types.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import types
import typing
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any, cast

from langgraph.checkpoint.serde.event_hooks import SerdeEvent, register_serde_event_listener
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from pilot_checkpoint_sqlite.errors import CheckpointConfigError, CheckpointTypeRefusedError

__all__ = ["AllowedType", "AllowlistSerializer", "expand_allowed_types"]

AllowedType = type[Any] | tuple[str, str]
"""A class, or its ``(module, name)`` pair as LangGraph records it."""

_EXTRA_DEFAULT_TYPES: frozenset[tuple[str, str]] = frozenset(
    {
        # LangChain data models that graphs keep in state beyond LangGraph's
        # own safe set; pydantic models whose constructors only validate.
        ("langchain_core.outputs.generation", "Generation"),
        ("langchain_core.outputs.chat_generation", "ChatGeneration"),
        ("langchain_core.outputs.chat_generation", "ChatGenerationChunk"),
        ("langchain_core.prompt_values", "StringPromptValue"),
        ("langchain_core.prompt_values", "ChatPromptValue"),
    }
)
"""Allowed on top of LangGraph's ``SAFE_MSGPACK_TYPES`` (always allowed)."""

_refused: ContextVar[list[str] | None] = ContextVar("pilot_checkpoint_refused", default=None)


def _on_serde_event(event: SerdeEvent) -> None:
    found = _refused.get()
    if found is None:
        return
    kind = event.get("kind")
    if kind == "msgpack_blocked":
        found.append(f"{event['module']}.{event['name']}")
    elif kind == "msgpack_method_blocked":
        found.append(f"{event['module']}.{event['name']}.{event.get('method', '?')}")


register_serde_event_listener(_on_serde_event)


def _pair(value: object) -> tuple[str, str]:
    if isinstance(value, type):
        return (value.__module__, value.__name__)
    if (
        isinstance(value, tuple)
        and len(cast(tuple[Any, ...], value)) == 2
        and all(isinstance(p, str) and p for p in cast(tuple[Any, ...], value))
    ):
        pair = cast(tuple[str, str], value)
        return (pair[0], pair[1])
    raise CheckpointConfigError(
        f"allowed_types entries must be classes or (module, name) pairs, got {value!r}"
    )


def _is_record_type(cls: type[Any]) -> bool:
    return (
        dataclasses.is_dataclass(cls)
        or issubclass(cls, enum.Enum)
        or hasattr(cls, "model_fields")  # pydantic v2
        or hasattr(cls, "__fields__")  # pydantic v1
        or (issubclass(cls, tuple) and hasattr(cls, "_fields"))  # named tuple
    )


def _hints(cls: type[Any]) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    namespace = vars(module) if module is not None else {}
    try:
        return typing.get_type_hints(cls, globalns=namespace, include_extras=True)
    except Exception:  # unresolved forward references: use what is there
        return dict(getattr(cls, "__annotations__", {}))


def _walk(tp: Any, out: set[tuple[str, str]], seen: dict[int, Any]) -> None:
    # ``seen`` keeps each visited object alive: an id is unique only while
    # its object lives, and generic aliases are built afresh by every lookup.
    if id(tp) in seen:
        return
    seen[id(tp)] = tp
    origin = typing.get_origin(tp)
    if origin is not None:
        for arg in typing.get_args(tp):
            _walk(arg, out, seen)
        if isinstance(origin, type) and origin.__module__ not in ("builtins", "collections.abc"):
            _walk(origin, out, seen)
        return
    if isinstance(tp, types.UnionType):
        for arg in typing.get_args(tp):
            _walk(arg, out, seen)
        return
    if not isinstance(tp, type) or tp.__module__ in ("builtins", "typing"):
        return
    if _is_record_type(tp):
        out.add((tp.__module__, tp.__name__))
    if typing.is_typeddict(tp) or _is_record_type(tp):
        for hint in _hints(tp).values():
            _walk(hint, out, seen)


def expand_allowed_types(allowed: Iterable[AllowedType]) -> frozenset[tuple[str, str]]:
    """The ``(module, name)`` pairs ``allowed`` registers.

    A class registers itself and every pydantic model, dataclass, enum and
    named tuple reachable from its annotations (a ``TypedDict`` state registers
    what its fields hold). A ``(module, name)`` pair registers exactly that.

    Raises:
        CheckpointConfigError: an entry is neither a class nor a pair of strings.
    """
    if isinstance(allowed, str | bytes) or not isinstance(allowed, Iterable):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise CheckpointConfigError("allowed_types must be an iterable of classes or pairs")
    out: set[tuple[str, str]] = set()
    seen: dict[int, Any] = {}
    for item in allowed:
        if isinstance(item, type):
            out.add(_pair(item))
            _walk(item, out, seen)
        else:
            out.add(_pair(item))
    return frozenset(out)


def _refusal_message(refused: list[str]) -> str:
    names = ", ".join(dict.fromkeys(refused))
    example = refused[0].rsplit(".", 1)
    return (
        f"checkpoint data names {names}, which is not in the checkpoint saver's "
        "allowlist; nothing was imported or called. If the type belongs in your "
        "graph's state, allow it: PilotCheckpointSaver(..., allowed_types=[YourType]) "
        f"or allowed_types=[({example[0]!r}, {example[-1]!r})]; passing the state "
        "schema (allowed_types=[State]) allows every model, dataclass and enum it uses"
    )


class AllowlistSerializer(JsonPlusSerializer):
    """LangGraph's ``JsonPlusSerializer`` in strict mode, refusing loudly.

    Decoding rebuilds only LangGraph's built-in safe types (LangChain
    messages, ``Document``, ``Send``, ``Interrupt``, ``Command``, datetimes,
    UUIDs, sets...), a few more LangChain data types, and ``allowed_types``.
    Stored data naming anything else raises
    :class:`~pilot_checkpoint_sqlite.errors.CheckpointTypeRefusedError`
    before any code it names is imported or called. Encoding is LangGraph's,
    unchanged; pickle is never used.

    Args:
        allowed_types: Classes (each with the models, dataclasses and enums its
            annotations reach) or ``(module, name)`` pairs to rebuild.

    Raises:
        CheckpointConfigError: a bad ``allowed_types`` entry.

    ``with_msgpack_allowlist`` (and so ``BaseCheckpointSaver.with_allowlist``,
    which LangGraph's ``compile()`` calls with the graph's state types when
    ``LANGGRAPH_STRICT_MSGPACK=true``) returns a copy with the extra types,
    still refusing loudly. Safe to share between threads.
    """

    def __init__(self, *, allowed_types: Iterable[AllowedType] = ()) -> None:
        self.allowed_types = _EXTRA_DEFAULT_TYPES | expand_allowed_types(allowed_types)
        super().__init__(
            pickle_fallback=False,
            allowed_json_modules=None,
            allowed_msgpack_modules=tuple(sorted(self.allowed_types)),
        )

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        """Decode a typed blob.

        Raises:
            CheckpointTypeRefusedError: the data names a type (or method) not
                allowed, or uses a format this serializer never decodes
                (``pickle``).
        """
        refused: list[str] = []
        token = _refused.set(refused)
        try:
            value = super().loads_typed(data)
        except NotImplementedError:
            raise CheckpointTypeRefusedError(
                f"checkpoint data uses the {data[0]!r} format, which this saver never "
                "decodes (pickle and unknown formats are refused)",
                refused=(str(data[0]),),
            ) from None
        finally:
            _refused.reset(token)
        if refused:
            raise CheckpointTypeRefusedError(
                _refusal_message(refused), refused=tuple(dict.fromkeys(refused))
            )
        return value
