"""State <-> wire, with LangGraph's typed serializer.

Theory of operation
-------------------
A value crosses the wire as an *envelope*: a one-key mapping
``{"$lg": [type, blob]}`` where ``(type, blob)`` is exactly what LangGraph's
``JsonPlusSerializer.dumps_typed`` produces (``"msgpack"`` with LangGraph's
extension types for messages, pydantic models, dataclasses, datetimes, ``Send``
...). The envelope itself is an ordinary msgpack value, so pilot-rpc carries
it as-is. Payloads that are not envelopes pass through untouched: plain
callers and other plugins on the same worker keep working.

Encoding is strict where LangGraph is lenient: LangGraph writes an exception
as its ``repr`` string; here an exception, or any value the serializer cannot
encode, raises :class:`PilotEncodeError` naming where the value sits
(``state["docs"][2].meta``). Nothing is silently turned into a string.

Decoding never imports a module on a peer's say-so and never calls anything
but a data type's constructor. A type is rebuilt when it is in LangGraph's
own safe list, in the codec's ``allowed_types``, or (by default) when it is a
pydantic model, dataclass, named tuple or enum whose module this process has
already imported. Anything else raises :class:`PilotDecodeError` with the
type's name and how to allow it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import importlib
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import ormsgpack
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from pilot_langgraph.errors import PilotDecodeError, PilotEncodeError

try:  # the exact encoder dumps_typed uses; lets us refuse exceptions instead of repr()
    from langgraph.checkpoint.serde.jsonplus import (
        _msgpack_default as _lg_default,  # pyright: ignore[reportPrivateUsage]
    )
except ImportError:  # pragma: no cover - older/newer layouts fall back to dumps_typed
    _lg_default = None


def _langgraph_safe_lists() -> tuple[frozenset[tuple[str, ...]], frozenset[tuple[str, ...]]]:
    try:
        from langgraph.checkpoint.serde import _msgpack
    except ImportError:  # pragma: no cover - moved in another langgraph-checkpoint
        return frozenset(), frozenset({("datetime", "datetime", "fromisoformat")})
    return _msgpack.SAFE_MSGPACK_TYPES, _msgpack.SAFE_MSGPACK_METHODS


# LangGraph's own allowlist of types safe to rebuild (messages, datetimes, Send...).
_SAFE_TYPES, _SAFE_METHODS = _langgraph_safe_lists()

__all__ = ["CONTROL_KEY", "ENVELOPE_KEY", "ControlMessage", "LangGraphCodec", "is_envelope"]

ENVELOPE_KEY: Final = "$lg"
CONTROL_KEY: Final = "$lgx"
BATCH_KIND: Final = "batch"

# LangGraph's extension type codes (langgraph.checkpoint.serde.jsonplus).
_EXT_CONSTRUCTOR_SINGLE_ARG: Final = 0
_EXT_CONSTRUCTOR_POS_ARGS: Final = 1
_EXT_CONSTRUCTOR_KW_ARGS: Final = 2
_EXT_METHOD_SINGLE_ARG: Final = 3
_EXT_PYDANTIC_V1: Final = 4
_EXT_PYDANTIC_V2: Final = 5
_EXT_NUMPY_ARRAY: Final = 6

_PACK_OPTIONS: Final = (
    ormsgpack.OPT_NON_STR_KEYS
    | ormsgpack.OPT_PASSTHROUGH_DATACLASS
    | ormsgpack.OPT_PASSTHROUGH_DATETIME
    | ormsgpack.OPT_PASSTHROUGH_ENUM
    | ormsgpack.OPT_PASSTHROUGH_UUID
    | ormsgpack.OPT_REPLACE_SURROGATES
)

# Set by decode_request on a worker so encode_response answers in the same
# format the caller used (envelope or plain).
_caller_used_envelope: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pilot_langgraph_caller_used_envelope", default=True
)

_MAX_DEPTH: Final = 200


def is_envelope(obj: object) -> bool:
    """Whether ``obj`` is a LangGraph envelope produced by :class:`LangGraphCodec`."""
    return isinstance(obj, dict) and len(obj) == 1 and ENVELOPE_KEY in obj  # pyright: ignore[reportUnknownArgumentType]


class ControlMessage:
    """A message of the remote-node protocol sent beside a handler's own values.

    Callback events, custom stream writes, interrupts and resume bookkeeping
    travel as progress values (unary calls) or stream items (streaming calls)
    next to what the handler itself sends. On the wire a control message is
    ``{"$lgx": [kind, envelope]}``; a handler's own values are always
    ``{"$lg": ...}`` envelopes when the caller uses this codec, so the two
    cannot be confused. Several messages queued at once travel as one
    ``{"$lgx": ["batch", [[kind, envelope], ...]]}`` (decoded as a ``batch``
    message whose body is the list of messages). ``body`` is encoded when the message is built
    (:meth:`LangGraphCodec.control`), so a value that cannot be sent fails
    where it is produced, not in the middle of the call.

    On a worker, only messages the worker's :class:`LangGraphMiddleware`
    produced are *sealed* (:attr:`sealed`) and sent as control messages;
    sealing is not part of the public API. A ``ControlMessage`` a handler
    builds and yields, returns or reports itself is not sealed: it is checked
    against the handler's ``output_model`` like any item (and fails it), and
    the codec refuses to send it (``PilotEncodeError``), so a handler can
    never slip an unvalidated value past ``output_model`` or fake an
    interrupt or a callback event.
    """

    __slots__ = ("_sealed", "body", "encoded", "kind")

    def __init__(self, kind: str, body: Any, encoded: list[Any] | None = None) -> None:
        self.kind = kind
        self.body = body
        self.encoded = encoded
        self._sealed = False

    @property
    def sealed(self) -> bool:
        """Whether the worker middleware produced it (only those are sent as control messages)."""
        return self._sealed

    def __repr__(self) -> str:
        return f"ControlMessage({self.kind!r}, {self.body!r})"


def seal_control(message: ControlMessage) -> ControlMessage:
    """Mark ``message`` as produced by the worker middleware (internal; returns it)."""
    message._sealed = True  # pyright: ignore[reportPrivateUsage]
    return message


class _Refused(TypeError):
    """Internal: a value the strict encoder refuses (exceptions)."""


def _strict_default(obj: Any) -> Any:
    if isinstance(obj, BaseException):
        raise _Refused(f"{type(obj).__qualname__} is an exception")
    if _lg_default is None:  # pragma: no cover
        raise TypeError(f"Object of type {type(obj).__name__} is not serializable")
    if dataclasses.is_dataclass(obj) or callable(getattr(obj, "model_dump", None)):
        # LangGraph encodes the fields of these with its own lenient encoder,
        # so look for exceptions among them first.
        _refuse_nested_exceptions(obj)
    return _lg_default(obj)


_SCALARS: Final = frozenset({str, int, float, bool, bytes, type(None)})


def _refuse_nested_exceptions(obj: Any) -> None:
    stack: list[tuple[Any, int]] = [(obj, 0)]
    push = stack.append
    while stack:
        item, depth = stack.pop()
        cls = type(item)
        if cls in _SCALARS or depth > _MAX_DEPTH:
            continue
        if cls is dict:
            for child in item.values():
                if type(child) not in _SCALARS:
                    push((child, depth + 1))
            continue
        if cls is list or cls is tuple:
            for child in item:
                if type(child) not in _SCALARS:
                    push((child, depth + 1))
            continue
        if isinstance(item, BaseException):
            raise _Refused(f"{type(item).__qualname__} is an exception")
        for _, child in _children(item):
            if type(child) not in _SCALARS:
                push((child, depth + 1))


def _children(obj: Any) -> Iterable[tuple[str, Any]]:
    """(path suffix, child) pairs of a container-like value, for error paths."""
    if isinstance(obj, (str, bytes, bytearray, int, float, bool)) or obj is None:
        return ()
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = obj.items()  # pyright: ignore[reportUnknownMemberType]
        return [(f"[{k!r}]", v) for k, v in items]
    if isinstance(obj, (list, tuple, deque)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]  # pyright: ignore[reportUnknownArgumentType]
    if isinstance(obj, (set, frozenset)):
        return [(f"{{{i}}}", v) for i, v in enumerate(obj)]  # pyright: ignore[reportUnknownArgumentType]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f".{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    cls = type(obj)
    model_fields = getattr(cls, "__pydantic_fields__", None)
    if model_fields is None:
        model_fields = getattr(cls, "model_fields", None)
    if isinstance(model_fields, Mapping):
        names: Iterable[str] = model_fields.keys()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        return [(f".{n}", getattr(obj, n, None)) for n in names]
    return ()


def _pack(value: Any) -> bytes:
    return ormsgpack.packb(value, default=_strict_default, option=_PACK_OPTIONS)


def _find_unsendable(value: Any, path: str, depth: int = 0) -> tuple[str, Any] | None:
    """Depth-first search for the innermost value that cannot be encoded."""
    if depth > _MAX_DEPTH:
        return (path, value)
    for suffix, child in _children(value):
        try:
            _pack(child)
        except (TypeError, ormsgpack.MsgpackEncodeError, ValueError):
            return _find_unsendable(child, path + suffix, depth + 1) or (path + suffix, child)
    try:
        _pack(value)
    except (TypeError, ormsgpack.MsgpackEncodeError, ValueError):
        return (path, value)
    return None


def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


class LangGraphCodec:
    """Serialize node input/output with LangGraph's typed serializer.

    Implements pilot-worker's ``PayloadCodec`` protocol (``decode_request`` /
    ``encode_response``) for workers, and ``encode``/``decode`` for callers.

    Args:
        allowed_types: Extra types (classes or ``(module, name)`` pairs) that may
            be rebuilt on decode, in addition to LangGraph's safe list.
        allow_imported_data_types: Also rebuild pydantic models, dataclasses,
            named tuples and enums whose module is already imported here.
            Never imports a module named by a peer. Default True.

    The codec is stateless apart from its allow list and safe to share.
    """

    def __init__(
        self,
        *,
        allowed_types: Iterable[type | tuple[str, str]] = (),
        allow_imported_data_types: bool = True,
    ) -> None:
        allowed: set[tuple[str, str]] = set()
        for item in allowed_types:
            if isinstance(item, type):
                allowed.add((item.__module__, item.__qualname__))
            else:
                allowed.add((item[0], item[1]))
        self._allowed = frozenset(allowed)
        self._allow_imported = allow_imported_data_types
        # Library types resolved by import (LangGraph's safe list, allowed_types):
        # stable for the life of the process, so looked up once.
        self._imported: dict[tuple[str, str], Any] = {}
        self._serde = JsonPlusSerializer(allowed_msgpack_modules=None)

    # -- caller side ---------------------------------------------------------

    def encode(self, value: Any, *, root: str = "value") -> dict[str, list[Any]]:
        """Turn ``value`` into an envelope.

        Raises:
            PilotEncodeError: ``value`` holds something that cannot be sent; the
                error's ``path`` says where (``root`` names the top level).
        """
        if value is None or isinstance(value, (bytes, bytearray)):
            kind, blob = self._serde.dumps_typed(value)
            return {ENVELOPE_KEY: [kind, blob]}
        try:
            blob = _pack(value)
        except (TypeError, ormsgpack.MsgpackEncodeError, ValueError) as exc:
            found = _find_unsendable(value, root)
            path, bad = found if found is not None else (root, value)
            reason = (
                "exceptions are not sent as values"
                if isinstance(bad, BaseException)
                else "LangGraph's serializer cannot encode it"
            )
            raise PilotEncodeError(
                f"cannot send {path}: value of type {_type_name(bad)} ({reason})",
                path=path,
                type_name=_type_name(bad),
            ) from exc
        return {ENVELOPE_KEY: ["msgpack", blob]}

    def decode(self, obj: Any) -> Any:
        """Turn an envelope back into a value; non-envelopes pass through.

        Raises:
            PilotDecodeError: malformed envelope, corrupt bytes, or a type that is
                not allowed to be rebuilt here.
        """
        if not is_envelope(obj):
            return obj
        body = obj[ENVELOPE_KEY]
        if (
            not isinstance(body, (list, tuple))
            or len(body) != 2  # pyright: ignore[reportUnknownArgumentType]
            or not isinstance(body[0], str)
            or not isinstance(body[1], (bytes, bytearray))
        ):
            raise PilotDecodeError("malformed LangGraph envelope")
        kind: str = body[0]
        blob = bytes(body[1])  # pyright: ignore[reportUnknownArgumentType]
        if kind == "null":
            return None
        if kind == "bytes":
            return blob
        if kind == "bytearray":
            return bytearray(blob)
        if kind != "msgpack":
            raise PilotDecodeError(f"unsupported serialization type {kind!r}")
        failures: list[BaseException] = []
        hook = self._make_ext_hook(failures)
        try:
            return ormsgpack.unpackb(blob, ext_hook=hook, option=ormsgpack.OPT_NON_STR_KEYS)
        except (ValueError, ormsgpack.MsgpackDecodeError) as exc:
            if failures:
                first = failures[0]
                if isinstance(first, PilotDecodeError):
                    raise first from None
                raise PilotDecodeError(f"could not rebuild a value: {first!r}") from first
            raise PilotDecodeError(f"corrupt payload: {exc}") from exc

    def control(self, kind: str, body: Any) -> ControlMessage:
        """Build a :class:`ControlMessage`, encoding ``body`` now.

        Raises:
            PilotEncodeError: ``body`` holds something that cannot be sent.
        """
        return ControlMessage(kind, body, self.encode(body, root=kind)[ENVELOPE_KEY])

    def _control_part(self, message: ControlMessage) -> list[Any]:
        encoded = message.encoded
        if encoded is None:
            encoded = self.encode(message.body, root=message.kind)[ENVELOPE_KEY]
        return [message.kind, encoded]

    def decode_reply(self, obj: Any) -> Any:
        """Decode a reply, stream item or progress value on the caller.

        Like :meth:`decode`, plus ``{"$lgx": [kind, envelope]}`` comes back
        as a :class:`ControlMessage` with its body decoded.

        Raises:
            PilotDecodeError: as :meth:`decode`, or a malformed control message.
        """
        if isinstance(obj, dict) and len(obj) == 1 and CONTROL_KEY in obj:  # pyright: ignore[reportUnknownArgumentType]
            body = obj[CONTROL_KEY]
            if (
                not isinstance(body, (list, tuple))
                or len(body) != 2  # pyright: ignore[reportUnknownArgumentType]
                or not isinstance(body[0], str)
            ):
                raise PilotDecodeError("malformed control message")
            if body[0] == BATCH_KIND:
                parts = body[1]
                if not isinstance(parts, (list, tuple)):
                    raise PilotDecodeError("malformed control message batch")
                return ControlMessage(
                    BATCH_KIND,
                    [self.decode_reply({CONTROL_KEY: part}) for part in parts],  # pyright: ignore[reportUnknownVariableType]
                )
            return ControlMessage(body[0], self.decode({ENVELOPE_KEY: body[1]}))
        return self.decode(obj)

    # -- worker side (pilot_worker.PayloadCodec) ------------------------------

    def decode_request(self, obj: Any) -> Any:
        """PayloadCodec hook: decode a request on a worker.

        A pydantic model in the request is rebuilt with validation; when the
        peer's data does not validate, the call fails with pilot-rpc's
        ``InvalidArgument`` whose details carry pydantic's error locations
        (``details["errors"]``: ``loc``, ``msg``, ``type``) and the model's name.
        """
        _caller_used_envelope.set(is_envelope(obj))
        try:
            return self.decode(obj)
        except PilotDecodeError as exc:
            invalid = _invalid_argument(exc)
            if invalid is None:
                raise
            raise invalid from exc

    def is_control(self, value: Any) -> bool:
        """PayloadCodec hook: ``value`` is a control message, not the handler's output.

        pilot-worker then does not check it against a streaming handler's
        ``output_model`` (callback events and custom writes travel between
        the handler's items). Only a *sealed* message counts, one the worker
        middleware produced: a handler's own ``ControlMessage`` is checked
        like any item.
        """
        return value.__class__ is ControlMessage and value.sealed

    def encode_response(self, value: Any) -> Any:
        """PayloadCodec hook: encode a reply (or stream chunk) on a worker.

        Raises:
            PilotEncodeError: the value cannot be sent, or it is a
                :class:`ControlMessage` the middleware did not produce (a
                handler's own).
        """
        if value.__class__ is ControlMessage:
            if not value.sealed:
                raise PilotEncodeError(
                    "cannot send output: a handler sent a ControlMessage itself; only the "
                    "worker middleware sends control messages",
                    path="output",
                    type_name=_type_name(value),
                )
            if value.kind == BATCH_KIND:
                return {CONTROL_KEY: [BATCH_KIND, [self._control_part(m) for m in value.body]]}
            return {CONTROL_KEY: self._control_part(value)}
        if not _caller_used_envelope.get():
            return value
        return self.encode(value, root="output")

    # -- decoding policy -----------------------------------------------------

    def _resolve(self, module: str, name: str, code: int) -> Any:
        key = (module, name)
        found = self._imported.get(key)
        if found is not None:
            return found
        if key in _SAFE_TYPES or key in self._allowed:
            try:
                found = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as exc:
                raise PilotDecodeError(f"type {module}.{name} is not available here") from exc
            self._imported[key] = found
            return found
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if self._allow_imported and isinstance(cls, type) and _is_data_type(cls, code):
            return cls
        raise PilotDecodeError(
            f"refusing to rebuild {module}.{name}: not in LangGraph's safe list, not in "
            "allowed_types, and not an imported pydantic model/dataclass/named tuple/enum; "
            f"pass LangGraphCodec(allowed_types=[({module!r}, {name!r})]) to allow it"
        )

    def _make_ext_hook(self, failures: list[BaseException]) -> Callable[[int, bytes], Any]:
        def unpack(data: bytes) -> Any:
            return ormsgpack.unpackb(data, ext_hook=hook, option=ormsgpack.OPT_NON_STR_KEYS)

        def hook(code: int, data: bytes) -> Any:
            try:
                return build(code, data)
            except BaseException as exc:
                failures.append(exc)
                raise

        def build(code: int, data: bytes) -> Any:
            if code == _EXT_NUMPY_ARRAY:
                np = sys.modules.get("numpy")
                if np is None:
                    raise PilotDecodeError("received a numpy array but numpy is not imported")
                dtype, shape, order, buf = unpack(data)
                return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape, order=order)
            tup = unpack(data)
            if not isinstance(tup, (list, tuple)) or len(tup) < 3:  # pyright: ignore[reportUnknownArgumentType]
                raise PilotDecodeError(f"malformed extension value (code {code})")
            module, name, arg = tup[0], tup[1], tup[2]
            if not isinstance(module, str) or not isinstance(name, str):
                raise PilotDecodeError(f"malformed extension value (code {code})")
            if code == _EXT_METHOD_SINGLE_ARG:
                method = tup[3] if len(tup) > 3 else None  # pyright: ignore[reportUnknownArgumentType]
                if (module, name, method) not in _SAFE_METHODS:
                    raise PilotDecodeError(f"refusing to call {module}.{name}.{method}")
                cls = self._imported.get((module, name))
                if cls is None:
                    cls = self._imported[(module, name)] = getattr(
                        importlib.import_module(module), name
                    )
                return getattr(cls, str(method))(arg)
            cls = self._resolve(module, name, code)
            if code == _EXT_CONSTRUCTOR_SINGLE_ARG:
                return cls(arg)
            if code == _EXT_CONSTRUCTOR_POS_ARGS:
                if (module, name) == ("langgraph.types", "Send") and len(arg) > 2:
                    return cls(arg[0], arg[1], timeout=arg[2])
                return cls(*arg)
            if code == _EXT_CONSTRUCTOR_KW_ARGS:
                return cls(**arg)
            if code in (_EXT_PYDANTIC_V1, _EXT_PYDANTIC_V2):
                return _validated_model(cls, module, name, arg)
            raise PilotDecodeError(f"unsupported extension type code {code}")

        return hook


def _validated_model(cls: Any, module: str, name: str, arg: Any) -> Any:
    """Rebuild a pydantic model from a peer's fields, always with validation.

    The constructor is tried first (LangChain's messages and documents do
    work in ``__init__``); a model whose fields were sent by name but which
    validates by alias is retried with ``model_validate(by_name=True)``.
    Never ``model_construct``: data from a peer is never trusted unchecked.
    """
    from pydantic import ValidationError

    if not isinstance(arg, dict):
        raise PilotDecodeError(f"malformed fields for {module}.{name}")
    try:
        return cls(**arg)
    except ValidationError as first:
        validate = getattr(cls, "model_validate", None)
        if validate is None:
            raise _ModelInvalid(module, name, first) from first
        try:
            return validate(arg, by_name=True)
        except TypeError:  # pydantic < 2.11 has no by_name
            raise _ModelInvalid(module, name, first) from first
        except ValidationError as exc:
            raise _ModelInvalid(module, name, exc) from exc
    except TypeError as exc:
        raise PilotDecodeError(f"cannot rebuild {module}.{name}: {exc}") from exc


class _ModelInvalid(PilotDecodeError):
    """Internal: a model's fields from a peer do not validate."""

    def __init__(self, module: str, name: str, error: Exception) -> None:
        super().__init__(f"{module}.{name} does not validate: {error}")
        self.model = f"{module}.{name}"
        self.error = error


def _invalid_argument(exc: PilotDecodeError) -> Exception | None:
    """pilot-rpc's InvalidArgument for a model that did not validate, else None."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, _ModelInvalid):
        cause = cause.__cause__
    if cause is None:
        return None
    from pilot_rpc import InvalidArgument
    from pydantic import ValidationError

    error = cause.error
    errors: list[dict[str, Any]] = []
    if isinstance(error, ValidationError):
        errors = [
            {"loc": [str(part) for part in e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in error.errors(include_url=False)
        ]
    return InvalidArgument(
        f"invalid payload: {cause.model} does not validate ({len(errors)} error(s))",
        details={"reason": "invalid_argument", "model": cause.model, "errors": errors},
    )


def _is_data_type(cls: type, code: int) -> bool:
    if code in (_EXT_PYDANTIC_V1, _EXT_PYDANTIC_V2):
        return callable(getattr(cls, "model_validate", None)) or callable(
            getattr(cls, "parse_obj", None)
        )
    if code == _EXT_CONSTRUCTOR_KW_ARGS:
        return dataclasses.is_dataclass(cls) or (issubclass(cls, tuple) and hasattr(cls, "_fields"))
    if code == _EXT_CONSTRUCTOR_SINGLE_ARG:
        return issubclass(cls, enum.Enum)
    return False
