"""The ``checkpoint-sqlite`` worker plugin: serve a checkpoint store from any pilot worker.

``pilot-worker --plugin checkpoint-sqlite --checkpoint-db sqlite:///state.db``
opens (and migrates) the store, registers one handler per store method
(``checkpoint.put``, ``checkpoint.get_tuple``, ...), runs the retention policy
periodically when one is set, and closes the store (committing every accepted
write) when the worker shuts down.

Each call is scoped to ``Context.caller_node_id``, the node id of the
authenticated peer, unless the store is shared.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pilot_rpc import (
    DeadlineExceeded,
    ErrorInfo,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    RpcError,
    Unavailable,
)
from pilot_worker import Context, HandlerSpec, Plugin, PluginContext, PluginOption

from pilot_checkpoint_sqlite import _env, _wire
from pilot_checkpoint_sqlite._options import RetentionPolicy, StoreOptions
from pilot_checkpoint_sqlite._service import CheckpointService
from pilot_checkpoint_sqlite._store import open_store
from pilot_checkpoint_sqlite.errors import (
    CheckpointAccessDenied,
    CheckpointConfigError,
    CheckpointError,
    CheckpointProtocolError,
    CheckpointUsageError,
    StoreClosedError,
    StoreOverloadedError,
    StoreSchemaError,
    StoreTimeoutError,
    StoreUnavailableError,
)

__all__ = ["error_to_rpc", "plugin", "register_store_handlers", "store_options_from"]

DEFAULT_DB_URL = "sqlite:///pilot-checkpoints.db"
HANDLER_TIMEOUT_SECS = 60.0


def error_to_rpc(exc: CheckpointError) -> RpcError:
    """The RPC status a store error is sent as; its ``ErrorInfo`` names it exactly.

    ``info.reason`` is the error class in UPPER_SNAKE_CASE
    (``STORE_OVERLOADED_ERROR``), ``info.metadata["error"]`` the class name.
    """
    name = type(exc).__name__
    info = ErrorInfo(_upper_snake(name), _wire.ERROR_DOMAIN, {"error": name})
    message = str(exc)
    if isinstance(exc, CheckpointProtocolError | CheckpointUsageError):
        return InvalidArgument(message, info=info)
    if isinstance(exc, CheckpointAccessDenied):
        return PermissionDenied(message, info=info)
    if isinstance(exc, StoreOverloadedError):
        return ResourceExhausted(message, info=info)
    if isinstance(exc, StoreTimeoutError):
        return DeadlineExceeded(message, info=info)
    if isinstance(exc, StoreUnavailableError | StoreClosedError):
        return Unavailable(message, info=info)
    if isinstance(exc, StoreSchemaError):
        return FailedPrecondition(message, info=info)
    return Internal(message, info=info)


def _upper_snake(name: str) -> str:
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()


def _handler(service: CheckpointService, method: str) -> Callable[[Any, Context], Awaitable[Any]]:
    async def handle(payload: Any, ctx: Context) -> Any:
        try:
            return await service.handle(method, payload, caller_node_id=ctx.caller_node_id)
        except CheckpointError as exc:
            raise error_to_rpc(exc) from exc

    handle.__name__ = f"checkpoint_{method}"
    handle.__qualname__ = handle.__name__
    handle.__doc__ = f"Checkpoint store: {method} (scoped to the caller unless shared)."
    return handle


def register_store_handlers(
    worker: Any, service: CheckpointService, *, allow: list[str] | None = None
) -> list[HandlerSpec]:
    """Register the store's handlers (``checkpoint.<method>``) on ``worker``.

    Args:
        worker: A ``pilot_worker.WorkerServer``.
        service: The service wrapping the store.
        allow: Node ids allowed to call (``None``: the worker's default policy).
    """
    specs: list[HandlerSpec] = []
    for method in _wire.METHODS:
        spec = HandlerSpec(
            name=_wire.handler_name(method),
            fn=_handler(service, method),
            allow=allow,
            timeout_secs=HANDLER_TIMEOUT_SECS,
        )
        specs.append(worker.register(spec))
    return specs


def _flag(value: str | None, name: str) -> bool:
    if value is None or value == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise CheckpointConfigError(f"{name} must be true/false, got {value!r}")


def _number(value: str | None, name: str, kind: type[float] | type[int]) -> Any:
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except ValueError:
        raise CheckpointConfigError(f"{name} must be a number, got {value!r}") from None


def store_options_from(options: Mapping[str, str | None]) -> tuple[str, StoreOptions]:
    """Database URL and :class:`StoreOptions` from the plugin's option values."""
    url = options.get("checkpoint_db") or DEFAULT_DB_URL
    interval = _number(options.get("checkpoint_retention_interval"), "retention interval", float)
    retention = RetentionPolicy(
        max_age_secs=_number(options.get("checkpoint_max_age"), "max age", float),
        max_checkpoints_per_thread=_number(
            options.get("checkpoint_max_per_thread"), "max per thread", int
        ),
        **({"interval_secs": interval} if interval is not None else {}),
    )
    sync = (options.get("checkpoint_sqlite_sync") or "FULL").upper()
    if sync not in ("FULL", "NORMAL"):
        raise CheckpointConfigError("--checkpoint-sqlite-sync must be FULL or NORMAL")
    store_options = StoreOptions(
        shared=_flag(options.get("checkpoint_shared"), "--checkpoint-shared"),
        sqlite_synchronous="FULL" if sync == "FULL" else "NORMAL",
        retention=retention,
    )
    return url, store_options


async def _setup(ctx: PluginContext) -> None:
    url, options = store_options_from(ctx.options)
    store = await open_store(url, options)
    ctx.worker.on_shutdown(store.aclose)
    service = CheckpointService(store)
    register_store_handlers(ctx.worker, service)
    if options.retention.enabled:

        async def _retention() -> None:
            removed = await store.apply_retention()
            if removed:
                ctx.logger.info("checkpoint retention removed %d checkpoints", removed)

        ctx.worker.add_periodic(
            options.retention.interval_secs, _retention, name="checkpoint-retention"
        )
    ctx.logger.info(
        "checkpoint store ready: %s (schema v%d, %s)",
        store.url.render_as_string(hide_password=True),
        store.schema_version,
        "shared" if options.shared else "scoped by caller",
    )


plugin = Plugin(
    name="checkpoint-sqlite",
    description="LangGraph checkpoint store (SQLite or PostgreSQL) for PilotCheckpointSaver",
    options=(
        PluginOption(
            flag="--checkpoint-db",
            env=_env.PILOT_CHECKPOINT_DB,
            default=DEFAULT_DB_URL,
            help="database URL: sqlite:///path/to/state.db or postgresql+psycopg://user@host/db",
        ),
        PluginOption(
            flag="--checkpoint-shared",
            env=_env.PILOT_CHECKPOINT_SHARED,
            default="false",
            help="true: every caller sees every thread (default: threads scoped per caller)",
        ),
        PluginOption(
            flag="--checkpoint-max-age",
            env=_env.PILOT_CHECKPOINT_MAX_AGE,
            help="retention: delete checkpoints older than this many seconds (latest kept)",
        ),
        PluginOption(
            flag="--checkpoint-max-per-thread",
            env=_env.PILOT_CHECKPOINT_MAX_PER_THREAD,
            help="retention: keep at most this many checkpoints per thread namespace",
        ),
        PluginOption(
            flag="--checkpoint-retention-interval",
            default="300",
            help="seconds between retention passes (when a retention limit is set)",
        ),
        PluginOption(
            flag="--checkpoint-sqlite-sync",
            default="FULL",
            help="SQLite synchronous mode: FULL (fsync each commit) or NORMAL",
        ),
    ),
    setup=_setup,
)
