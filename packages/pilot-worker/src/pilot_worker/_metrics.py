"""Prometheus metrics of a worker, on an injectable registry.

Metric names (the table is repeated in the package README)::

    pilot_worker_calls_total{handler,code}         counter    finished calls by status code
    pilot_worker_errors_total{handler,code}        counter    failed calls by status code
    pilot_worker_call_duration_seconds{handler}    histogram  arrival to answer
    pilot_worker_in_flight_calls{handler}          gauge      calls holding a slot, including
                                                              sync handlers past their timeout
    pilot_worker_rejections_total{handler,reason}  counter    refused before running; reason is
                                                              acl, rate_limit, concurrency_limit,
                                                              queue_full, draining, invalid_argument
    pilot_worker_idempotent_replays_total{handler} counter    answered from the idempotency cache
    pilot_worker_sync_threads_busy                 gauge      sync-pool threads running a function
    pilot_worker_periodic_failures_total{task}     counter    periodic task runs that raised
    pilot_worker_ready                             gauge      1 while accepting calls
    pilot_worker_info{version}                     info       static
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

__all__ = ["HandlerStats", "WorkerMetrics", "percentiles"]

_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class WorkerMetrics:
    """The worker's collectors, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, version: str) -> None:
        self.registry = registry
        self.calls = Counter(
            "pilot_worker_calls",
            "Finished handler calls by status code.",
            ["handler", "code"],
            registry=registry,
        )
        self.errors = Counter(
            "pilot_worker_errors",
            "Handler calls that failed, by status code.",
            ["handler", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "pilot_worker_call_duration_seconds",
            "Wall time of a handler call, from arrival to answer.",
            ["handler"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "pilot_worker_in_flight_calls",
            "Calls holding a slot (including sync handlers overrunning their timeout).",
            ["handler"],
            registry=registry,
        )
        self.rejections = Counter(
            "pilot_worker_rejections",
            "Calls refused before the handler ran, by reason.",
            ["handler", "reason"],
            registry=registry,
        )
        self.replays = Counter(
            "pilot_worker_idempotent_replays",
            "Calls answered from the idempotency cache.",
            ["handler"],
            registry=registry,
        )
        self.sync_busy = Gauge(
            "pilot_worker_sync_threads_busy",
            "Sync-handler pool threads running a function.",
            registry=registry,
        )
        self.periodic_failures = Counter(
            "pilot_worker_periodic_failures",
            "Periodic task runs that raised.",
            ["task"],
            registry=registry,
        )
        self.ready = Gauge(
            "pilot_worker_ready", "1 while the worker accepts calls.", registry=registry
        )
        Info("pilot_worker", "Static worker information.", registry=registry).info(
            {"version": version}
        )

    def bind_sync_busy(self, fn: Callable[[], float]) -> None:
        self.sync_busy.set_function(fn)


def percentiles(samples: deque[float], points: tuple[float, ...]) -> dict[str, float | None]:
    """Nearest-rank percentiles in milliseconds, keyed ``p50``, ``p90``..."""
    ordered = sorted(samples)
    out: dict[str, float | None] = {}
    for point in points:
        key = f"p{point:g}"
        if not ordered:
            out[key] = None
            continue
        rank = max(0, min(len(ordered) - 1, math.ceil(point / 100 * len(ordered)) - 1))
        out[key] = round(ordered[rank] * 1000, 3)
    return out


class HandlerStats:
    """Per-handler counts and a window of recent latencies, for ``_handlers``."""

    __slots__ = ("calls", "errors", "in_flight", "latencies", "rejected")

    def __init__(self, window: int) -> None:
        self.in_flight = 0
        self.calls = 0
        self.errors = 0
        self.rejected = 0
        self.latencies: deque[float] = deque(maxlen=window)
