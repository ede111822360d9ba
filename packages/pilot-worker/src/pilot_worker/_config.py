"""Worker-wide options."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pilot_worker._handler import Overflow
from pilot_worker.errors import WorkerConfigError

__all__ = ["DefaultPolicy", "WorkerConfig"]

DefaultPolicy = Literal["open", "closed"]


def _positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        value is None
        or isinstance(value, bool)
        or not isinstance(value, int | float)  # pyright: ignore[reportUnnecessaryIsInstance]
        or not math.isfinite(value)
        or value <= 0
    ):
        raise WorkerConfigError(f"WorkerConfig.{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Options of a :class:`WorkerServer`. Validated at construction; defaults are safe.

    Attributes:
        port: Virtual port the worker listens on (``0`` is not allowed: peers
            must know it).
        default_policy: ACL of handlers declared with ``allow=None``:
            ``"open"`` lets every authenticated peer in the trust store call,
            ``"closed"`` lets no one. ``allow=[]`` always denies everyone.
        introspection_allow: Node ids allowed to call ``_health`` and
            ``_handlers``. ``None`` follows ``default_policy`` like any handler.
        overflow: Default behaviour of a handler at ``max_concurrent``:
            ``"reject"`` (``RESOURCE_EXHAUSTED`` at once) or ``"queue"``.
        max_queued_per_handler: With ``"queue"``, at most this many calls wait
            per handler; more are rejected (``RESOURCE_EXHAUSTED``).
        sync_threads: Threads running sync handlers at once. Further sync calls
            wait for a thread (within their deadline); the event loop is never
            blocked.
        idempotency_ttl_secs: How long a result is remembered by idempotency key.
        idempotency_max_entries: At most this many remembered results (oldest
            evicted first).
        rate_limit_max_callers: At most this many callers tracked per rate-limited
            handler (least recently seen evicted first).
        latency_window: Recent latencies kept per handler for ``_handlers``
            percentiles.
        metrics_port: Port of the ``/metrics``, ``/healthz``, ``/readyz`` HTTP
            endpoint; ``None`` disables it, ``0`` picks a free port.
        metrics_host: Host it binds; loopback by default.
        drain_timeout_secs: How long :meth:`WorkerServer.drain` waits by default.
        log_calls: Log one line per call (logger ``pilot_worker.calls``).
        include_tracebacks: Send handler tracebacks to callers in error details
            (development only).
        max_connections_per_peer: At most this many connections from one
            authenticated peer at once (``None``: pilot-rpc's default). Passed to
            pilot-rpc's ``ServerOptions`` when the installed pilot-rpc supports a
            per-peer cap; otherwise a warning is logged at start and only the
            per-listener cap applies.
        ops_max_connections: Connections the ops HTTP endpoint holds at once;
            beyond it the longest-idle connection is closed first, so probes
            always get through.
        ops_read_timeout_secs: How long an ops HTTP connection may take to send
            its request head before it is closed.
    """

    port: int = 5000
    default_policy: DefaultPolicy = "open"
    introspection_allow: Sequence[str] | None = None
    overflow: Overflow = "reject"
    max_queued_per_handler: int = 64
    sync_threads: int = 16
    idempotency_ttl_secs: float = 600.0
    idempotency_max_entries: int = 10_000
    rate_limit_max_callers: int = 10_000
    latency_window: int = 1024
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    drain_timeout_secs: float = 10.0
    log_calls: bool = True
    include_tracebacks: bool = False
    max_connections_per_peer: int | None = None
    ops_max_connections: int = 64
    ops_read_timeout_secs: float = 5.0

    def __post_init__(self) -> None:
        port = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 2**16:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise WorkerConfigError(f"WorkerConfig.port must be 1..65535, got {self.port!r}")
        if self.default_policy not in ("open", "closed"):
            raise WorkerConfigError("WorkerConfig.default_policy must be 'open' or 'closed'")
        if self.overflow not in ("reject", "queue"):
            raise WorkerConfigError("WorkerConfig.overflow must be 'reject' or 'queue'")
        if self.introspection_allow is not None:
            if isinstance(self.introspection_allow, str):
                raise WorkerConfigError(
                    "WorkerConfig.introspection_allow must be a list of node ids"
                )
            object.__setattr__(self, "introspection_allow", tuple(self.introspection_allow))
        for name in (
            "max_queued_per_handler",
            "sync_threads",
            "idempotency_max_entries",
            "rate_limit_max_callers",
            "latency_window",
            "ops_max_connections",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise WorkerConfigError(f"WorkerConfig.{name} must be an int > 0, got {value!r}")
        _positive("idempotency_ttl_secs", self.idempotency_ttl_secs)
        _positive("drain_timeout_secs", self.drain_timeout_secs)
        _positive("ops_read_timeout_secs", self.ops_read_timeout_secs)
        per_peer = self.max_connections_per_peer
        if per_peer is not None and (
            isinstance(per_peer, bool) or not isinstance(per_peer, int) or per_peer <= 0  # pyright: ignore[reportUnnecessaryIsInstance]
        ):
            raise WorkerConfigError(
                "WorkerConfig.max_connections_per_peer must be None or an int > 0, "
                f"got {per_peer!r}"
            )
        if self.metrics_port is not None and (
            isinstance(self.metrics_port, bool)
            or not isinstance(self.metrics_port, int)  # pyright: ignore[reportUnnecessaryIsInstance]
            or not 0 <= self.metrics_port < 2**16
        ):
            raise WorkerConfigError("WorkerConfig.metrics_port must be None or 0..65535")
