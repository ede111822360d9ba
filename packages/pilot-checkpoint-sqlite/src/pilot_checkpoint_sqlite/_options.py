"""Options of the saver and of the store: frozen, keyword-only, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pilot_rpc import RetryPolicy

from pilot_checkpoint_sqlite.errors import CheckpointConfigError

__all__ = ["RetentionPolicy", "SaverOptions", "StoreOptions"]

DEFAULT_PORT = 5000
"""Virtual port a store worker listens on unless told otherwise."""


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
        raise CheckpointConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class SaverOptions:
    """Options of :class:`PilotCheckpointSaver`.

    Attributes:
        timeout: Deadline of one request to the store in seconds, retries
            included (default 30).
        connect_timeout: Deadline to reach the store worker, in seconds (default
            10); used when the saver opens its own client.
        retry: The ``pilot_rpc.RetryPolicy`` of store requests; ``None`` (the
            default) uses the client's own policy (``max_attempts=3``, retried
            on ``UNAVAILABLE``). Every store request is idempotent, so it is
            retried with its one idempotency key. This is the only retry layer.
        list_page_size: Rows fetched per ``list`` request (default 64, max 1000).
        close_timeout: How long ``close()`` waits for in-flight requests (default 5).
    """

    timeout: float = 30.0
    connect_timeout: float = 10.0
    retry: RetryPolicy | None = None
    list_page_size: int = 64
    close_timeout: float = 5.0

    def __post_init__(self) -> None:
        _positive("timeout", self.timeout)
        _positive("connect_timeout", self.connect_timeout)
        _positive("close_timeout", self.close_timeout)
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise CheckpointConfigError("retry must be a pilot_rpc.RetryPolicy or None")
        if (
            isinstance(self.list_page_size, bool)
            or not isinstance(self.list_page_size, int)  # pyright: ignore[reportUnnecessaryIsInstance]
            or not 1 <= self.list_page_size <= 1000
        ):
            raise CheckpointConfigError("list_page_size must be an int in [1, 1000]")

    def sync_wait(self) -> float:
        """Upper bound of one sync call: the request deadline (retries included) plus slack."""
        return self.timeout + 1.0


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """Optional automatic retention, applied periodically by the store.

    Both limits are off by default: nothing is deleted unless asked. The most
    recent checkpoint of every thread namespace is always kept, so a thread
    can always resume. See the README for the interaction with LangGraph's
    beta ``DeltaChannel`` (pruning intermediate checkpoints can cut its
    history).

    Attributes:
        max_age_secs: Delete checkpoints (and their writes) stored longer
            ago than this.
        max_checkpoints_per_thread: Keep at most this many checkpoints per
            thread namespace, the newest ones.
        interval_secs: How often the policy runs (default 300).
    """

    max_age_secs: float | None = None
    max_checkpoints_per_thread: int | None = None
    interval_secs: float = 300.0

    def __post_init__(self) -> None:
        _positive("max_age_secs", self.max_age_secs, allow_none=True)
        _positive("interval_secs", self.interval_secs)
        m = self.max_checkpoints_per_thread
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise CheckpointConfigError("max_checkpoints_per_thread must be an int >= 1 or None")

    @property
    def enabled(self) -> bool:
        return self.max_age_secs is not None or self.max_checkpoints_per_thread is not None


@dataclass(frozen=True, kw_only=True)
class StoreOptions:
    """Options of :class:`CheckpointStore`.

    Attributes:
        shared: When true every caller sees every thread; by default threads
            are scoped by the caller's authenticated node id.
        sqlite_synchronous: ``"FULL"`` (default): every commit is fsynced, so
            an acknowledged write survives kill -9 and a power cut as far as
            SQLite promises. ``"NORMAL"`` survives kill -9 of the process but
            may lose the last commits on power loss; faster on slow disks.
        read_pool_size: Read connections (reads never wait for the writer).
        max_batch: Most requests grouped into one write transaction.
        max_queue: Most write requests waiting; more raise
            ``StoreOverloadedError`` (bounded memory, back-pressure).
        busy_timeout: Seconds SQLite waits on a lock held by another process.
        retention: Optional age/size retention policy.
    """

    shared: bool = False
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    read_pool_size: int = 4
    max_batch: int = 256
    max_queue: int = 4096
    busy_timeout: float = 10.0
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)

    def __post_init__(self) -> None:
        if self.sqlite_synchronous not in ("FULL", "NORMAL"):
            raise CheckpointConfigError("sqlite_synchronous must be 'FULL' or 'NORMAL'")
        for name in ("read_pool_size", "max_batch", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointConfigError(f"{name} must be an int >= 1, got {value!r}")
        _positive("busy_timeout", self.busy_timeout)
        if not isinstance(self.retention, RetentionPolicy):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise CheckpointConfigError("retention must be a RetentionPolicy")
