"""Request and reply shapes exchanged between the saver and the store.

Theory of operation
-------------------
The saver serializes every value with LangGraph's serializer into a *typed
blob*: a ``[type, bytes]`` pair. The store keeps those pairs as they are and
never deserializes them, so a worker serving the store runs no code a caller
sent. Everything else in a request is plain data (str, int, float, bool, None,
bytes, lists and str-keyed dicts) so it travels as msgpack.

Methods (one worker handler each, names below):

=====================  ====================================================  ===========
method                 request                                               reply
=====================  ====================================================  ===========
``get_tuple``          ``{thread_id, checkpoint_ns, checkpoint_id|None}``    row or None
``list``               ``{thread_id|None, checkpoint_ns|None,                ``{rows, cursor}``
                       checkpoint_id|None, before|None, filter_json|None,
                       limit, cursor|None}``
``put``                ``{thread_id, checkpoint_ns, checkpoint_id,           None
                       parent_checkpoint_id|None, run_id|None,
                       checkpoint, metadata, metadata_json,
                       channel_versions, blobs}``
``put_writes``         ``{thread_id, checkpoint_ns, checkpoint_id, task_id,   None
                       task_path, writes: [[idx, channel, type, bytes]]}``
``delete_thread``      ``{thread_id}``                                       None
``copy_thread``        ``{source_thread_id, target_thread_id}``              None
``delete_for_runs``    ``{run_ids}``                                         None
``prune``              ``{thread_ids, strategy}``                            None
``delta_history``      ``{thread_id, checkpoint_ns, checkpoint_id|None,      ``{chain}``
                       channels}``
``info``               ``{}``                                                ``{...}``
``lease_acquire``      ``{thread_id, holder, ttl, run_id?, resume?}``        ``{acquired,
                                                                             holder,
                                                                             expires_in,
                                                                             run_id,
                                                                             took_over}``
``lease_renew``        ``{thread_id, holder, ttl}``                          ``{renewed,
                                                                             holder,
                                                                             expires_in}``
``lease_release``      ``{thread_id, holder}``                               None
=====================  ====================================================  ===========

The lease methods implement per-thread run exclusion (``exclusive_runs``):
one row per thread names the run holding it until ``ttl`` seconds after its
last acquire or renew; an expired lease may be taken by anyone. The lease
records the ``run_id`` it was acquired for; an acquire with ``resume`` true
and the same non-empty ``run_id`` also takes a live lease over (a resumed
run displacing its own earlier attempt, whose renewals then fail). Stores
of the previous release ignore ``run_id``/``resume`` and reply without
``run_id``/``took_over``: such a resume waits for the lease to expire.

A *row* is ``{thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id,
checkpoint, metadata, blobs: [[channel, type, bytes]], writes: [[task_id,
channel, type, bytes]]}`` with writes in ``writes_sort_key`` order.

``put`` is a no-op re-ack when the checkpoint id already exists and
``put_writes`` when ``(task_id, idx)`` already exists for that checkpoint
(special channels such as ``__error__`` are replaced, as LangGraph's own savers
do), so a retried request never duplicates anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

from pilot_checkpoint_sqlite.errors import CheckpointProtocolError

PREFIX: Final = "checkpoint."

GET_TUPLE: Final = "get_tuple"
LIST: Final = "list"
PUT: Final = "put"
PUT_WRITES: Final = "put_writes"
DELETE_THREAD: Final = "delete_thread"
COPY_THREAD: Final = "copy_thread"
DELETE_FOR_RUNS: Final = "delete_for_runs"
PRUNE: Final = "prune"
DELTA_HISTORY: Final = "delta_history"
INFO: Final = "info"
LEASE_ACQUIRE: Final = "lease_acquire"
LEASE_RENEW: Final = "lease_renew"
LEASE_RELEASE: Final = "lease_release"

ERROR_DOMAIN: Final = "pilot-checkpoint-sqlite"
"""``ErrorInfo.domain`` of the store's errors; ``metadata["error"]`` names the class."""

METHODS: Final = (
    GET_TUPLE,
    LIST,
    PUT,
    PUT_WRITES,
    DELETE_THREAD,
    COPY_THREAD,
    DELETE_FOR_RUNS,
    PRUNE,
    DELTA_HISTORY,
    INFO,
    LEASE_ACQUIRE,
    LEASE_RENEW,
    LEASE_RELEASE,
)
"""Every method the store serves; the worker handler name is ``PREFIX + method``."""

WRITE_METHODS: Final = frozenset(
    {
        PUT,
        PUT_WRITES,
        DELETE_THREAD,
        COPY_THREAD,
        DELETE_FOR_RUNS,
        PRUNE,
        LEASE_ACQUIRE,
        LEASE_RENEW,
        LEASE_RELEASE,
    }
)

PRUNE_STRATEGIES: Final = ("keep_latest", "delete")

LIST_PAGE_SIZE: Final = 64
"""Rows per ``list`` reply; the saver pages on with the returned cursor."""

TypedBlob = tuple[str, bytes]


def handler_name(method: str) -> str:
    """Worker handler name of a store method."""
    return PREFIX + method


# --- validation helpers shared by the store side (requests) and the saver (replies)


def req_str(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str):
        raise CheckpointProtocolError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def opt_str(payload: Mapping[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise CheckpointProtocolError(
            f"{key!r} must be a string or None, got {type(value).__name__}"
        )
    return value


def opt_int(payload: Mapping[str, Any], key: str) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointProtocolError(f"{key!r} must be an int or None")
    return value


def opt_bool(payload: Mapping[str, Any], key: str) -> bool:
    value = payload.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise CheckpointProtocolError(f"{key!r} must be a bool or None")
    return value


def positive_float(payload: Mapping[str, Any], key: str, maximum: float) -> float:
    value = payload.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= maximum  # also refuses NaN
    ):
        raise CheckpointProtocolError(f"{key!r} must be a number in (0, {maximum}]")
    return float(value)


def str_list(payload: Mapping[str, Any], key: str) -> list[str]:
    value = payload.get(key)
    if not isinstance(value, list | tuple):
        raise CheckpointProtocolError(f"{key!r} must be a list of strings")
    items: list[str] = []
    for item in value:  # pyright: ignore[reportUnknownVariableType]
        if not isinstance(item, str):
            raise CheckpointProtocolError(f"{key!r} must be a list of strings")
        items.append(item)
    return items


def typed_blob(value: object, what: str) -> TypedBlob:
    if (
        isinstance(value, list | tuple)
        and len(value) == 2  # pyright: ignore[reportUnknownArgumentType]
        and isinstance(value[0], str)
        and isinstance(value[1], bytes | bytearray | memoryview)
    ):
        return value[0], bytes(value[1])
    raise CheckpointProtocolError(f"{what} must be a [type, bytes] pair")


def str_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise CheckpointProtocolError(f"{what} must be a mapping of strings")
    out: dict[str, str] = {}
    for k, v in value.items():  # pyright: ignore[reportUnknownVariableType]
        if not isinstance(k, str) or not isinstance(v, str):
            raise CheckpointProtocolError(f"{what} must be a mapping of strings")
        out[k] = v
    return out


def rows(value: object, what: str, width: int) -> Sequence[Sequence[Any]]:
    if not isinstance(value, list | tuple):
        raise CheckpointProtocolError(f"{what} must be a list")
    out: list[Sequence[Any]] = []
    for item in value:  # pyright: ignore[reportUnknownVariableType]
        if not isinstance(item, list | tuple) or len(item) != width:  # pyright: ignore[reportUnknownArgumentType]
            raise CheckpointProtocolError(f"{what} entries must have {width} fields")
        out.append(item)  # pyright: ignore[reportUnknownArgumentType]
    return out


def rows_any(value: object, what: str) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise CheckpointProtocolError(f"{what} must be a list")
    return cast(Sequence[Any], value)
