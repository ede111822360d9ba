"""``PilotCheckpointSaver``: a LangGraph checkpointer whose store is on another machine.

The saver serializes with its own ``self.serde`` (by default LangGraph's
serializer in strict allowlist mode, see ``_serde``) into typed blobs, sends
plain-data requests (``_wire``) to a backend, and deserializes the replies.
Network I/O goes through a ``pilot_rpc.PilotClient``: async methods use the
connection pool of the caller's own loop; sync methods (plain sync code,
LangGraph's worker threads) run on the client's one background loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import threading
from collections.abc import (
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
    PendingWrite,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from pilot_checkpoint_sqlite import _env, _wire
from pilot_checkpoint_sqlite._backend import CheckpointBackend
from pilot_checkpoint_sqlite._lease import ThreadLease, lease_from_reply
from pilot_checkpoint_sqlite._options import DEFAULT_PORT, SaverOptions
from pilot_checkpoint_sqlite._serde import AllowedType, AllowlistSerializer, expand_allowed_types
from pilot_checkpoint_sqlite.errors import (
    CheckpointConfigError,
    CheckpointProtocolError,
    CheckpointUsageError,
    StoreClosedError,
    StoreTimeoutError,
)

if TYPE_CHECKING:
    from pilot_rpc import PilotClient, TransportLike
    from pilot_transport import Identity, TrustStore

__all__ = ["PilotCheckpointSaver"]


def _json_default(value: object) -> object:
    # Metadata is filtered on its JSON view; values JSON cannot hold are
    # compared by their text (the exact value round-trips in the typed blob).
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, set | frozenset):
        return sorted(str(v) for v in value)  # pyright: ignore[reportUnknownVariableType]
    return str(value)


def metadata_json(value: Mapping[str, Any]) -> str:
    """The JSON text the store filters ``list`` on."""
    return json.dumps(value, default=_json_default, separators=(",", ":"))


class PilotCheckpointSaver(BaseCheckpointSaver[str]):
    """A complete LangGraph checkpointer backed by a remote (or local) checkpoint store.

    Typical use, with a store worker started by
    ``pilot-worker --plugin checkpoint-sqlite --checkpoint-db sqlite:///state.db``::

        app = graph.compile(checkpointer=PilotCheckpointSaver(peer="state-worker"))

    Args:
        peer: Store worker to reach: a trust-store name, node id or Pilot
            address; or a list of them, the store workers of one store tier
            (several workers on one PostgreSQL database): a request that
            fails with a retry-safe error moves on to the next one, and the
            saver stays with the last one that answered. Defaults to
            ``$PILOT_CHECKPOINT_PEER`` (a comma-separated list for a tier).
        port: Virtual port of the store worker (default ``$PILOT_CHECKPOINT_PORT``
            or 5000).
        client: The :class:`pilot_rpc.PilotClient` to call through. ``None`` (and
            no ``transport``/``identity``/``trust``) shares the process-wide
            default client (``pilot_rpc.default_client``) with remote nodes and
            event sources: one transport per event loop for all of them.
        transport: An already open transport (any ``pilot_rpc.TransportLike``;
            sync calls then run on the loop it lives on), or a transport URL
            for a client the saver opens and owns.
        identity: Identity (or key file path, which must exist) for a client the
            saver opens; default ``$PILOT_IDENTITY``, else the config directory's.
        trust: Trust store (or file path, which must exist) for a client the
            saver opens; default ``$PILOT_TRUST``, else the config directory's.
        backend: Instead of a peer, a :class:`CheckpointBackend` to call (for
            example :class:`LocalStoreBackend` over an in-process store).
        options: Timeouts, retry policy and paging (:class:`SaverOptions`).
        allowed_types: Types checkpoints may rebuild besides LangChain messages
            and LangGraph's own types: classes (each registers the pydantic
            models, dataclasses and enums its annotations reach, so passing
            the graph's state schema is enough) or ``(module, name)`` pairs.
        serde: Serializer; default :class:`AllowlistSerializer` (LangGraph's
            ``JsonPlusSerializer`` in strict mode: stored data naming a type
            that is not allowed raises ``CheckpointTypeRefusedError``, and no
            code it names runs). A serializer passed here is used as given
            (``allowed_types`` then extends a ``JsonPlusSerializer``'s
            allowlist).

    Raises:
        CheckpointConfigError: no peer and no backend, or a bad argument.

    Every method is safe to repeat: writes are idempotent in the store. Each
    request is one RPC call retried (with the same idempotency key) by the
    client's retry policy when the store is unreachable: at most
    ``max_attempts`` attempts (default 3) within ``options.timeout``; with
    several peers those attempts are spread over them, each failed one moving
    to the next peer (see the README's "Store tier"). Cancelling
    an async call cancels the request (a write that already reached the store
    may still commit; repeating it is a no-op). Errors are the ones in
    ``pilot_checkpoint_sqlite.errors``.
    """

    def __init__(
        self,
        peer: str | Sequence[str] | None = None,
        *,
        port: int | None = None,
        client: PilotClient | None = None,
        transport: TransportLike | str | None = None,
        identity: Identity | str | os.PathLike[str] | None = None,
        trust: TrustStore | str | os.PathLike[str] | None = None,
        backend: CheckpointBackend | None = None,
        options: SaverOptions | None = None,
        allowed_types: Iterable[AllowedType] = (),
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=_serializer(serde, allowed_types))
        self.options = options if options is not None else SaverOptions()
        if not isinstance(self.options, SaverOptions):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise CheckpointConfigError("options must be a SaverOptions")
        self._runner: PilotClient | None = None
        if backend is not None:
            if any(v is not None for v in (peer, transport, client, identity, trust)):
                raise CheckpointConfigError(
                    "pass either backend= or peer= (with client=/transport=), not both"
                )
            if not isinstance(backend, CheckpointBackend):  # pyright: ignore[reportUnnecessaryIsInstance] - runtime check of user input
                raise CheckpointConfigError("backend must implement CheckpointBackend")
            self.peer: str | None = None
            self.peers: tuple[str, ...] = ()
            self.port: int | None = None
            self._backend: CheckpointBackend = backend
            self._client: PilotClient | None = None
        else:
            peers = _resolve_peers(peer)
            self.peer = peers[0]
            self.peers = peers
            self.port = _resolve_port(port)
            from pilot_checkpoint_sqlite._remote import RemoteBackend, build_client

            owns = False
            if client is not None:
                if any(v is not None for v in (transport, identity, trust)):
                    raise CheckpointConfigError(
                        "pass either client= or transport=/identity=/trust=, not both"
                    )
            else:
                client = build_client(
                    transport=transport, identity=identity, trust=trust, options=self.options
                )
                owns = client is not None
            self._client = client
            self._backend = RemoteBackend(
                client, peer=peers, port=self.port, options=self.options, owns_client=owns
            )
        # A loop-agnostic backend (the remote one, an in-process store) is called on
        # the caller's own loop; anything else on one private loop.
        self._direct = bool(getattr(self._backend, "loop_agnostic", False))
        # A backend whose calls end within ``options.timeout`` by themselves (the
        # remote one: the RPC deadline spans every attempt) needs no second timer.
        self._self_bounded = bool(getattr(self._backend, "bounded_by_timeout", False))
        if backend is not None:
            from pilot_rpc import PilotClient

            # Sync calls to a local backend run on this client's background loop; it
            # never opens a transport.
            self._runner = PilotClient()
        self._close_lock = threading.Lock()
        self._closed = False

    @property
    def client(self) -> PilotClient | None:
        """The client of a remote saver (the shared default one unless one was given)."""
        from pilot_checkpoint_sqlite._remote import RemoteBackend

        backend = self._backend
        return backend.client if isinstance(backend, RemoteBackend) else None

    @property
    def current_peer(self) -> str | None:
        """The store worker the next request goes to first: the last one that answered.

        ``None`` for a saver over a ``backend=``. With one peer, always that peer.
        """
        from pilot_checkpoint_sqlite._remote import RemoteBackend

        backend = self._backend
        return backend.current_peer if isinstance(backend, RemoteBackend) else None

    # ------------------------------------------------------------------ plumbing

    async def _acall(self, method: str, payload: dict[str, Any], key: str | None = None) -> Any:
        if self._closed:
            raise StoreClosedError("the checkpoint saver is closed")
        if self._direct:
            if self._self_bounded:
                # Hot path: one timer per request (the RPC deadline), not two.
                return await self._backend.call(method, payload, idempotency_key=key)
            return await self._invoke(method, payload, key)
        runner = self._runner
        assert runner is not None
        # A backend bound to one loop: the call runs there; cancelling follows it.
        return await runner.run_async(lambda: self._invoke(method, payload, key))

    async def _invoke(self, method: str, payload: dict[str, Any], key: str | None) -> Any:
        if self._self_bounded:
            # Hot path: one timer per request (the RPC deadline), not two.
            return await self._backend.call(method, payload, idempotency_key=key)
        try:
            async with asyncio.timeout(self.options.timeout):
                return await self._backend.call(method, payload, idempotency_key=key)
        except TimeoutError as exc:
            if isinstance(exc, StoreTimeoutError):
                raise
            raise StoreTimeoutError(
                f"checkpoint store did not answer {method!r} within {self.options.timeout}s"
            ) from exc

    def _call(self, method: str, payload: dict[str, Any], key: str | None = None) -> Any:
        from pilot_rpc import Cancelled, DeadlineExceeded, FailedPrecondition

        if self._closed:
            raise StoreClosedError("the checkpoint saver is closed")
        runtime = self._runner if self._runner is not None else self._sync_client()
        try:
            return runtime.run_sync(
                lambda: self._invoke(method, payload, key), timeout=self.options.sync_wait()
            )
        except DeadlineExceeded:
            raise StoreTimeoutError(
                f"no reply from the checkpoint store within {self.options.sync_wait()}s"
            ) from None
        except FailedPrecondition as exc:
            raise CheckpointUsageError(f"{exc.message}; use the async methods there") from exc
        except Cancelled as exc:
            raise StoreClosedError(f"the request was cancelled ({exc.message})") from exc

    def _sync_client(self) -> PilotClient:
        client = self.client
        assert client is not None
        return client

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the saver (and a client it opened itself). Idempotent.

        A shared default client or one passed as ``client=`` stays open (close
        it with ``pilot_rpc.aclose_default_clients()`` or its own ``aclose()``).
        Calls after ``close()`` raise ``StoreClosedError``. Clones made with
        ``with_allowlist`` share the connection and are closed too.
        """
        from pilot_checkpoint_sqlite._remote import RemoteBackend

        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        backend = self._backend
        if isinstance(backend, RemoteBackend):
            backend.close()
        elif self._runner is not None:
            runner = self._runner
            with contextlib.suppress(Exception):
                runner.run_sync(backend.aclose, timeout=self.options.close_timeout)
        if self._runner is not None:
            self._runner.close()

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        from pilot_checkpoint_sqlite._remote import RemoteBackend

        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        backend = self._backend
        if self._direct or isinstance(backend, RemoteBackend):
            await backend.aclose()
        elif self._runner is not None:
            runner = self._runner
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.options.close_timeout):
                    await runner.run_async(backend.aclose)
        if self._runner is not None:
            await self._runner.aclose()

    def __enter__(self) -> PilotCheckpointSaver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> PilotCheckpointSaver:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ encoding

    def _encode_put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> tuple[dict[str, Any], RunnableConfig, str]:
        thread_id, checkpoint_ns, parent_id = _target(config)
        c = cast(dict[str, Any], checkpoint.copy())
        values: dict[str, Any] = c.pop("channel_values", None) or {}
        checkpoint_id = c.get("id")
        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            raise CheckpointUsageError("checkpoint['id'] must be a non-empty string")
        blobs: list[list[Any]] = []
        for channel, version in new_versions.items():
            if channel in values:
                kind, data = self.serde.dumps_typed(values[channel])
                blobs.append([channel, str(version), kind, data])
        versions = {ch: str(v) for ch, v in checkpoint.get("channel_versions", {}).items()}
        md = get_serializable_checkpoint_metadata(config, metadata)
        run_id = md.get("run_id")
        payload: dict[str, Any] = {
            "thread_id": thread_id,
            "checkpoint_ns": checkpoint_ns,
            "checkpoint_id": checkpoint_id,
            "parent_checkpoint_id": parent_id,
            "run_id": run_id if isinstance(run_id, str) else None,
            "checkpoint": list(self.serde.dumps_typed(c)),
            "metadata": list(self.serde.dumps_typed(md)),
            "metadata_json": metadata_json(cast(Mapping[str, Any], md)),
            "channel_versions": versions,
            "blobs": blobs,
        }
        next_config: RunnableConfig = {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": checkpoint_ns,
                "checkpoint_id": checkpoint_id,
            }
        }
        key = f"put:{thread_id}:{checkpoint_ns}:{checkpoint_id}"
        return payload, next_config, key

    def _encode_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
    ) -> tuple[dict[str, Any], str]:
        thread_id, checkpoint_ns, checkpoint_id = _target(config)
        if checkpoint_id is None:
            raise CheckpointUsageError("put_writes needs config['configurable']['checkpoint_id']")
        if not isinstance(task_id, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise CheckpointUsageError("task_id must be a string")
        rows: list[list[Any]] = []
        for idx, (channel, value) in enumerate(writes):
            kind, data = self.serde.dumps_typed(value)
            rows.append([WRITES_IDX_MAP.get(channel, idx), channel, kind, data])
        payload = {
            "thread_id": thread_id,
            "checkpoint_ns": checkpoint_ns,
            "checkpoint_id": checkpoint_id,
            "task_id": task_id,
            "task_path": task_path or "",
            "writes": rows,
        }
        return payload, f"writes:{thread_id}:{checkpoint_ns}:{checkpoint_id}:{task_id}"

    def _decode_row(self, row: object) -> CheckpointTuple:
        if not isinstance(row, dict):
            raise CheckpointProtocolError("checkpoint row must be a mapping")
        r = cast(dict[str, Any], row)
        thread_id = _wire.req_str(r, "thread_id")
        checkpoint_ns = _wire.req_str(r, "checkpoint_ns")
        checkpoint_id = _wire.req_str(r, "checkpoint_id")
        parent_id = _wire.opt_str(r, "parent_checkpoint_id")
        checkpoint = cast(
            dict[str, Any],
            self.serde.loads_typed(_wire.typed_blob(r.get("checkpoint"), "checkpoint")),
        )
        values: dict[str, Any] = {}
        for channel, kind, data in _wire.rows(r.get("blobs"), "blobs", 3):
            values[str(channel)] = self.serde.loads_typed(_wire.typed_blob((kind, data), "blob"))
        checkpoint["channel_values"] = values
        metadata = self.serde.loads_typed(_wire.typed_blob(r.get("metadata"), "metadata"))
        pending: list[PendingWrite] = [
            (
                str(task),
                str(channel),
                self.serde.loads_typed(_wire.typed_blob((kind, data), "write")),
            )
            for task, channel, kind, data in _wire.rows(r.get("writes"), "writes", 4)
        ]
        return CheckpointTuple(
            config={
                "configurable": {
                    "thread_id": thread_id,
                    "checkpoint_ns": checkpoint_ns,
                    "checkpoint_id": checkpoint_id,
                }
            },
            checkpoint=cast(Checkpoint, checkpoint),
            metadata=cast(CheckpointMetadata, metadata),
            parent_config=(
                {
                    "configurable": {
                        "thread_id": thread_id,
                        "checkpoint_ns": checkpoint_ns,
                        "checkpoint_id": parent_id,
                    }
                }
                if parent_id
                else None
            ),
            pending_writes=pending,
        )

    def _list_request(
        self,
        config: RunnableConfig | None,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
    ) -> dict[str, Any]:
        configurable = _configurable(config) if config is not None else {}
        thread_id = configurable.get("thread_id")
        ns = configurable.get("checkpoint_ns")
        if filter is not None and not isinstance(filter, dict):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise CheckpointUsageError("filter must be a dict")
        before_id = get_checkpoint_id(before) if before is not None else None
        return {
            "thread_id": None if thread_id is None else str(thread_id),
            "checkpoint_ns": None if ns is None else str(ns),
            "checkpoint_id": configurable.get("checkpoint_id") or None,
            "before": before_id,
            "filter_json": metadata_json(filter) if filter else None,
            "cursor": None,
        }

    def _next_page(
        self, request: dict[str, Any], reply: object, remaining: int | None
    ) -> tuple[list[CheckpointTuple], bool]:
        if not isinstance(reply, dict):
            raise CheckpointProtocolError("list reply must be a mapping")
        r = cast(dict[str, Any], reply)
        tuples = [self._decode_row(row) for row in _wire.rows_any(r.get("rows"), "rows")]
        if remaining is not None:
            tuples = tuples[:remaining]
        cursor = r.get("cursor")
        request["cursor"] = cursor
        return tuples, cursor is None

    def _page_limit(self, remaining: int | None) -> int:
        size = self.options.list_page_size
        return size if remaining is None else max(1, min(size, remaining))

    # ------------------------------------------------------------------ sync API

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Fetch one checkpoint (the latest of the thread namespace without ``checkpoint_id``).

        Raises:
            CheckpointUsageError: ``thread_id`` missing.
            CheckpointStoreError: the store failed (after retries).
        """
        reply = self._call(_wire.GET_TUPLE, _get_request(config))
        return None if reply is None else self._decode_row(reply)

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """List checkpoints newest first, fetched from the store page by page.

        ``filter`` matches metadata keys by equality; ``before`` keeps
        checkpoints older than its ``checkpoint_id``; ``limit`` caps the count.
        Without ``config`` every thread of this caller is listed.
        """
        request = self._list_request(config, filter, before)
        remaining = limit
        while remaining is None or remaining > 0:
            request["limit"] = self._page_limit(remaining)
            reply = self._call(_wire.LIST, dict(request))
            tuples, done = self._next_page(request, reply, remaining)
            yield from tuples
            if remaining is not None:
                remaining -= len(tuples)
            if done:
                return

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store a checkpoint; returns the config that addresses it.

        Safe to repeat: storing the same checkpoint id again is a no-op.
        """
        payload, next_config, key = self._encode_put(config, checkpoint, metadata, new_versions)
        self._call(_wire.PUT, payload, key)
        return next_config

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's pending writes, keeping channel, value and order.

        Safe to repeat: a ``(task_id, idx)`` already stored is not duplicated.
        """
        payload, key = self._encode_writes(config, writes, task_id, task_path)
        self._call(_wire.PUT_WRITES, payload, key)

    def delete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint and write of a thread (all namespaces). Idempotent."""
        self._call(_wire.DELETE_THREAD, {"thread_id": str(thread_id)})

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, blob and write of a thread to another thread id.

        The whole parent chain is copied. Rows already present on the target
        are kept, so repeating the copy is a no-op.
        """
        self._call(
            _wire.COPY_THREAD,
            {"source_thread_id": str(source_thread_id), "target_thread_id": str(target_thread_id)},
        )

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints (and their writes) created by the given runs. Idempotent."""
        self._call(_wire.DELETE_FOR_RUNS, {"run_ids": [str(r) for r in run_ids]})

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Prune threads: ``"keep_latest"`` keeps the newest checkpoint per namespace,
        ``"delete"`` removes everything. Idempotent.

        Raises:
            CheckpointUsageError: unknown strategy.
        """
        self._call(_wire.PRUNE, _prune_request(thread_ids, strategy))

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """Per-channel writes and seed along the parent chain, in one request."""
        if not channels:
            return {}
        reply = self._call(_wire.DELTA_HISTORY, _delta_request(config, channels))
        return self._decode_history(reply, channels)

    def get_next_version(self, current: str | None, channel: None) -> str:
        """Next channel version: a zero-padded counter plus a random tiebreak.

        Strings compare in the same order as the counter, so versions stay
        monotonically increasing as LangGraph requires.
        """
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(str(current).split(".")[0])
        return f"{current_v + 1:032}.{random.random():016}"

    # ------------------------------------------------------------------ async API

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Async twin of :meth:`get_tuple`."""
        reply = await self._acall(_wire.GET_TUPLE, _get_request(config))
        return None if reply is None else self._decode_row(reply)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Async twin of :meth:`list`."""
        request = self._list_request(config, filter, before)
        remaining = limit
        while remaining is None or remaining > 0:
            request["limit"] = self._page_limit(remaining)
            reply = await self._acall(_wire.LIST, dict(request))
            tuples, done = self._next_page(request, reply, remaining)
            for tup in tuples:
                yield tup
            if remaining is not None:
                remaining -= len(tuples)
            if done:
                return

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Async twin of :meth:`put`."""
        payload, next_config, key = self._encode_put(config, checkpoint, metadata, new_versions)
        await self._acall(_wire.PUT, payload, key)
        return next_config

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Async twin of :meth:`put_writes`."""
        payload, key = self._encode_writes(config, writes, task_id, task_path)
        await self._acall(_wire.PUT_WRITES, payload, key)

    async def adelete_thread(self, thread_id: str) -> None:
        """Async twin of :meth:`delete_thread`."""
        await self._acall(_wire.DELETE_THREAD, {"thread_id": str(thread_id)})

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Async twin of :meth:`copy_thread`."""
        await self._acall(
            _wire.COPY_THREAD,
            {"source_thread_id": str(source_thread_id), "target_thread_id": str(target_thread_id)},
        )

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Async twin of :meth:`delete_for_runs`."""
        await self._acall(_wire.DELETE_FOR_RUNS, {"run_ids": [str(r) for r in run_ids]})

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Async twin of :meth:`prune`."""
        await self._acall(_wire.PRUNE, _prune_request(thread_ids, strategy))

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """Async twin of :meth:`get_delta_channel_history`."""
        if not channels:
            return {}
        reply = await self._acall(_wire.DELTA_HISTORY, _delta_request(config, channels))
        return self._decode_history(reply, channels)

    # ------------------------------------------------------------------ run leases
    # Per-thread run exclusion (see ``exclusive_runs``, which calls these).

    def acquire_thread_lease(
        self,
        thread_id: str,
        holder: str,
        ttl: float,
        *,
        run_id: str | None = None,
        resume: bool = False,
    ) -> ThreadLease:
        """Take a thread's run lease if it is free, expired or already ``holder``'s.

        Args:
            thread_id: The thread.
            holder: A name unique to this attempt of the run (shown to refused
                runs; renewals and release go by it).
            ttl: Seconds the lease lasts unless renewed (at most 3600).
            run_id: The run this lease is for (recorded with the lease).
            resume: This acquire resumes ``run_id``: a live lease held for the
                same run id (the run's earlier attempt, e.g. on a worker that
                died) is taken over at once, and its holder's next renewal is
                refused. A lease held for another run is never taken while live.

        Returns:
            The lease state; ``granted`` false means another holder has it;
            ``took_over`` names the live holder this acquire displaced.
            Safe to repeat: the same holder re-acquires and extends.

        Raises:
            CheckpointProtocolError: a bad ``ttl`` or an empty name.
            CheckpointStoreError: the store failed (after retries).
        """
        reply = self._call(
            _wire.LEASE_ACQUIRE, _lease_request(thread_id, holder, ttl, run_id, resume)
        )
        return lease_from_reply(reply, "acquired")

    async def aacquire_thread_lease(
        self,
        thread_id: str,
        holder: str,
        ttl: float,
        *,
        run_id: str | None = None,
        resume: bool = False,
    ) -> ThreadLease:
        """Async twin of :meth:`acquire_thread_lease`."""
        reply = await self._acall(
            _wire.LEASE_ACQUIRE, _lease_request(thread_id, holder, ttl, run_id, resume)
        )
        return lease_from_reply(reply, "acquired")

    def renew_thread_lease(self, thread_id: str, holder: str, ttl: float) -> ThreadLease:
        """Extend ``holder``'s lease to ``ttl`` seconds from now.

        Returns:
            The lease state; ``granted`` false means another holder took it
            (``holder``'s lease expired first). Safe to repeat.
        """
        reply = self._call(_wire.LEASE_RENEW, _lease_request(thread_id, holder, ttl))
        return lease_from_reply(reply, "renewed")

    async def arenew_thread_lease(self, thread_id: str, holder: str, ttl: float) -> ThreadLease:
        """Async twin of :meth:`renew_thread_lease`."""
        reply = await self._acall(_wire.LEASE_RENEW, _lease_request(thread_id, holder, ttl))
        return lease_from_reply(reply, "renewed")

    def release_thread_lease(self, thread_id: str, holder: str) -> None:
        """Drop ``holder``'s lease (a no-op if another holder has it). Idempotent."""
        self._call(_wire.LEASE_RELEASE, {"thread_id": str(thread_id), "holder": str(holder)})

    async def arelease_thread_lease(self, thread_id: str, holder: str) -> None:
        """Async twin of :meth:`release_thread_lease`."""
        await self._acall(_wire.LEASE_RELEASE, {"thread_id": str(thread_id), "holder": str(holder)})

    def _decode_history(
        self, reply: object, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        if not isinstance(reply, dict):
            raise CheckpointProtocolError("delta_history reply must be a mapping")
        r = cast(dict[str, Any], reply)
        result: dict[str, DeltaChannelHistory] = {}
        for channel in channels:
            entry_raw = r.get(channel)
            if not isinstance(entry_raw, dict):
                raise CheckpointProtocolError(f"delta_history reply lacks channel {channel!r}")
            entry = cast(dict[str, Any], entry_raw)
            history: DeltaChannelHistory = {
                "writes": [
                    (
                        str(task),
                        channel,
                        self.serde.loads_typed(_wire.typed_blob((kind, data), "write")),
                    )
                    for task, kind, data in _wire.rows(entry.get("writes"), "writes", 3)
                ]
            }
            seed = entry.get("seed")
            if seed is not None:
                history["seed"] = self.serde.loads_typed(_wire.typed_blob(seed, "seed"))
            result[channel] = history
        return result


# ---------------------------------------------------------------------- helpers


def _serializer(
    serde: SerializerProtocol | None, allowed_types: Iterable[AllowedType]
) -> SerializerProtocol:
    if serde is None:
        return AllowlistSerializer(allowed_types=allowed_types)
    extra = expand_allowed_types(allowed_types)
    if not extra:
        return serde
    if not isinstance(serde, JsonPlusSerializer):
        raise CheckpointConfigError(
            "allowed_types= extends a JsonPlusSerializer's allowlist; "
            f"{type(serde).__name__} has none"
        )
    return serde.with_msgpack_allowlist(extra)


def _lease_request(
    thread_id: str, holder: str, ttl: float, run_id: str | None = None, resume: bool = False
) -> dict[str, Any]:
    request: dict[str, Any] = {"thread_id": str(thread_id), "holder": str(holder), "ttl": ttl}
    if run_id:
        request["run_id"] = str(run_id)
    if resume:
        request["resume"] = True
    return request


def _resolve_peers(peer: str | Sequence[str] | None) -> tuple[str, ...]:
    if peer is None:
        peer = os.environ.get(_env.PILOT_CHECKPOINT_PEER, "")
        names = [p.strip() for p in peer.split(",")]
        peers = tuple(p for p in names if p)
    elif isinstance(peer, str):
        peers = (peer,) if peer else ()
    else:
        peers = tuple(peer)
        if not all(isinstance(p, str) and p for p in peers):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise CheckpointConfigError("peer= must be a name or a list of non-empty names")
        if len(set(peers)) != len(peers):
            raise CheckpointConfigError(f"peer= names a store worker twice: {list(peers)}")
    if not peers:
        raise CheckpointConfigError(
            "PilotCheckpointSaver needs peer= (the store worker, or a list of them) or "
            f"${_env.PILOT_CHECKPOINT_PEER}, or backend="
        )
    return peers


def _resolve_port(port: int | None) -> int:
    if port is None:
        raw = os.environ.get(_env.PILOT_CHECKPOINT_PORT)
        if not raw:
            return DEFAULT_PORT
        try:
            port = int(raw)
        except ValueError:
            raise CheckpointConfigError(
                f"${_env.PILOT_CHECKPOINT_PORT} must be an integer, got {raw!r}"
            ) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise CheckpointConfigError(f"port must be an int in 1..65535, got {port!r}")
    return port


def _configurable(config: RunnableConfig) -> Mapping[str, Any]:
    configurable = config.get("configurable") if isinstance(config, Mapping) else None  # pyright: ignore[reportUnnecessaryIsInstance]
    if not isinstance(configurable, Mapping):
        raise CheckpointUsageError("config must have a 'configurable' mapping")
    return cast(Mapping[str, Any], configurable)


def _target(config: RunnableConfig) -> tuple[str, str, str | None]:
    configurable = _configurable(config)
    thread_id = configurable.get("thread_id")
    if thread_id is None or thread_id == "":
        raise CheckpointUsageError("config['configurable']['thread_id'] is required")
    ns = configurable.get("checkpoint_ns") or ""
    checkpoint_id = configurable.get("checkpoint_id") or None
    return str(thread_id), str(ns), None if checkpoint_id is None else str(checkpoint_id)


def _get_request(config: RunnableConfig) -> dict[str, Any]:
    thread_id, ns, checkpoint_id = _target(config)
    return {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": checkpoint_id}


def _delta_request(config: RunnableConfig, channels: Sequence[str]) -> dict[str, Any]:
    request = _get_request(config)
    request["channels"] = [str(c) for c in channels]
    return request


def _prune_request(thread_ids: Sequence[str], strategy: str) -> dict[str, Any]:
    if strategy not in _wire.PRUNE_STRATEGIES:
        raise CheckpointUsageError(
            f"unknown prune strategy {strategy!r}; expected one of {_wire.PRUNE_STRATEGIES}"
        )
    return {"thread_ids": [str(t) for t in thread_ids], "strategy": strategy}
