"""The store as a service: validates wire requests and scopes them to the caller.

Both the worker plugin (one handler per method) and :class:`LocalStoreBackend`
call :meth:`CheckpointService.handle`, so validation and scoping are the same
in and out of process. The caller's node id comes from the authenticated
transport (``Context.caller_node_id``), never from the request body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pilot_checkpoint_sqlite import _wire
from pilot_checkpoint_sqlite._store import CheckpointStore, PutRecord, WritesRecord
from pilot_checkpoint_sqlite.errors import CheckpointProtocolError, CheckpointUsageError

__all__ = ["CheckpointService"]

MAX_KEY_LENGTH = 1024
"""Longest thread id, namespace, checkpoint id, task id or channel name accepted."""

MAX_LIST_LIMIT = 1000

MAX_LEASE_TTL = 3600.0
"""Longest run lease (seconds) a caller may ask for; renewal extends it."""


def _key(payload: Mapping[str, Any], name: str) -> str:
    value = _wire.req_str(payload, name)
    if len(value) > MAX_KEY_LENGTH:
        raise CheckpointProtocolError(f"{name!r} is longer than {MAX_KEY_LENGTH} characters")
    return value


def _opt_key(payload: Mapping[str, Any], name: str) -> str | None:
    value = _wire.opt_str(payload, name)
    if value is not None and len(value) > MAX_KEY_LENGTH:
        raise CheckpointProtocolError(f"{name!r} is longer than {MAX_KEY_LENGTH} characters")
    return value


def _nonempty(payload: Mapping[str, Any], name: str) -> str:
    value = _key(payload, name)
    if not value:
        raise CheckpointProtocolError(f"{name!r} must not be empty")
    return value


def _lease_run_id(payload: Mapping[str, Any]) -> str:
    value = _wire.opt_str(payload, "run_id")
    if value is not None and len(value) > MAX_KEY_LENGTH:
        raise CheckpointProtocolError(f"'run_id' is longer than {MAX_KEY_LENGTH} characters")
    return value or ""


class CheckpointService:
    """Serves the store's methods to callers identified by node id.

    Args:
        store: The store.
        shared: Every caller sees every thread (default: scoped per caller).
    """

    def __init__(self, store: CheckpointStore, *, shared: bool | None = None) -> None:
        self.store = store
        self.shared = store.options.shared if shared is None else shared
        self._methods: dict[str, Callable[[str, Mapping[str, Any]], Awaitable[Any]]] = {
            _wire.GET_TUPLE: self._get_tuple,
            _wire.LIST: self._list,
            _wire.PUT: self._put,
            _wire.PUT_WRITES: self._put_writes,
            _wire.DELETE_THREAD: self._delete_thread,
            _wire.COPY_THREAD: self._copy_thread,
            _wire.DELETE_FOR_RUNS: self._delete_for_runs,
            _wire.PRUNE: self._prune,
            _wire.DELTA_HISTORY: self._delta_history,
            _wire.INFO: self._info,
            _wire.LEASE_ACQUIRE: self._lease_acquire,
            _wire.LEASE_RENEW: self._lease_renew,
            _wire.LEASE_RELEASE: self._lease_release,
        }

    def scope_of(self, caller_node_id: str | None) -> str:
        """The scope a caller's rows live in."""
        if self.shared:
            return ""
        if not caller_node_id:
            raise CheckpointUsageError("a scoped checkpoint store needs an authenticated caller")
        return caller_node_id

    async def handle(self, method: str, payload: object, *, caller_node_id: str | None) -> Any:
        """Validate ``payload`` and run ``method`` for ``caller_node_id``.

        Raises:
            CheckpointProtocolError: unknown method or malformed payload.
            CheckpointStoreError: the store failed.
        """
        handler = self._methods.get(method)
        if handler is None:
            raise CheckpointProtocolError(f"unknown checkpoint store method {method!r}")
        if not isinstance(payload, Mapping):
            raise CheckpointProtocolError("the request must be a mapping")
        scope = self.scope_of(caller_node_id)
        return await handler(scope, payload)  # pyright: ignore[reportUnknownArgumentType]

    # ------------------------------------------------------------------ methods

    async def _get_tuple(self, scope: str, p: Mapping[str, Any]) -> Any:
        return await self.store.get_tuple(
            scope, _nonempty(p, "thread_id"), _key(p, "checkpoint_ns"), _opt_key(p, "checkpoint_id")
        )

    async def _list(self, scope: str, p: Mapping[str, Any]) -> Any:
        limit = _wire.opt_int(p, "limit") or _wire.LIST_PAGE_SIZE
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise CheckpointProtocolError(f"'limit' must be in 1..{MAX_LIST_LIMIT}")
        cursor_raw = p.get("cursor")
        cursor: list[str] | None = None
        if cursor_raw is not None:
            cursor = _wire.str_list(p, "cursor")
            if len(cursor) != 3:
                raise CheckpointProtocolError("'cursor' must have 3 fields")
        filter_json = _wire.opt_str(p, "filter_json")
        if filter_json is not None and len(filter_json) > 65536:
            raise CheckpointProtocolError("'filter_json' is too long")
        return await self.store.list(
            scope,
            thread_id=_opt_key(p, "thread_id"),
            checkpoint_ns=_opt_key(p, "checkpoint_ns"),
            checkpoint_id=_opt_key(p, "checkpoint_id"),
            before=_opt_key(p, "before"),
            filter_json=filter_json,
            limit=limit,
            cursor=cursor,
        )

    async def _put(self, scope: str, p: Mapping[str, Any]) -> None:
        blob_rows = _wire.rows(p.get("blobs"), "blobs", 4)
        blob_list: list[tuple[str, str, str, bytes]] = []
        for channel, version, kind, data in blob_rows:
            if not isinstance(channel, str) or not isinstance(version, str):
                raise CheckpointProtocolError("blob channel and version must be strings")
            k, b = _wire.typed_blob((kind, data), "blob")
            blob_list.append((channel, version, k, b))
        record = PutRecord(
            thread_id=_nonempty(p, "thread_id"),
            checkpoint_ns=_key(p, "checkpoint_ns"),
            checkpoint_id=_nonempty(p, "checkpoint_id"),
            parent_checkpoint_id=_opt_key(p, "parent_checkpoint_id"),
            run_id=_opt_key(p, "run_id"),
            checkpoint=_wire.typed_blob(p.get("checkpoint"), "checkpoint"),
            metadata=_wire.typed_blob(p.get("metadata"), "metadata"),
            metadata_json=_wire.req_str(p, "metadata_json"),
            channel_versions=_wire.str_map(p.get("channel_versions"), "channel_versions"),
            blobs=blob_list,
        )
        await self.store.put(scope, record)

    async def _put_writes(self, scope: str, p: Mapping[str, Any]) -> None:
        rows: list[tuple[int, str, str, bytes]] = []
        for idx, channel, kind, data in _wire.rows(p.get("writes"), "writes", 4):
            if isinstance(idx, bool) or not isinstance(idx, int) or not isinstance(channel, str):
                raise CheckpointProtocolError("a write is [idx:int, channel:str, type, bytes]")
            k, b = _wire.typed_blob((kind, data), "write")
            rows.append((idx, channel, k, b))
        record = WritesRecord(
            thread_id=_nonempty(p, "thread_id"),
            checkpoint_ns=_key(p, "checkpoint_ns"),
            checkpoint_id=_nonempty(p, "checkpoint_id"),
            task_id=_key(p, "task_id"),
            task_path=_wire.req_str(p, "task_path"),
            writes=rows,
        )
        await self.store.put_writes(scope, record)

    async def _delete_thread(self, scope: str, p: Mapping[str, Any]) -> None:
        await self.store.delete_thread(scope, _nonempty(p, "thread_id"))

    async def _copy_thread(self, scope: str, p: Mapping[str, Any]) -> None:
        await self.store.copy_thread(
            scope, _nonempty(p, "source_thread_id"), _nonempty(p, "target_thread_id")
        )

    async def _delete_for_runs(self, scope: str, p: Mapping[str, Any]) -> None:
        await self.store.delete_for_runs(scope, _wire.str_list(p, "run_ids"))

    async def _prune(self, scope: str, p: Mapping[str, Any]) -> None:
        strategy = _wire.req_str(p, "strategy")
        if strategy not in _wire.PRUNE_STRATEGIES:
            raise CheckpointUsageError(f"unknown prune strategy {strategy!r}")
        await self.store.prune(scope, _wire.str_list(p, "thread_ids"), strategy)

    async def _delta_history(self, scope: str, p: Mapping[str, Any]) -> Any:
        return await self.store.delta_history(
            scope,
            _nonempty(p, "thread_id"),
            _key(p, "checkpoint_ns"),
            _opt_key(p, "checkpoint_id"),
            _wire.str_list(p, "channels"),
        )

    async def _info(self, scope: str, p: Mapping[str, Any]) -> Any:
        del p
        return {**(await self.store.info()), "scope": scope}

    async def _lease_acquire(self, scope: str, p: Mapping[str, Any]) -> Any:
        return await self.store.acquire_lease(
            scope,
            _nonempty(p, "thread_id"),
            _nonempty(p, "holder"),
            _wire.positive_float(p, "ttl", MAX_LEASE_TTL),
            run_id=_lease_run_id(p),
            resume=_wire.opt_bool(p, "resume"),
        )

    async def _lease_renew(self, scope: str, p: Mapping[str, Any]) -> Any:
        return await self.store.renew_lease(
            scope,
            _nonempty(p, "thread_id"),
            _nonempty(p, "holder"),
            _wire.positive_float(p, "ttl", MAX_LEASE_TTL),
        )

    async def _lease_release(self, scope: str, p: Mapping[str, Any]) -> None:
        await self.store.release_lease(scope, _nonempty(p, "thread_id"), _nonempty(p, "holder"))
