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

import bisect
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["BUCKETS", "HandlerStats", "WorkerMetrics", "percentiles"]

BUCKETS = (
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
_BUCKET_LABELS = [*(repr(b) for b in BUCKETS), "+Inf"]


class HandlerStats:
    """Per-handler counters, kept as plain numbers on the event loop thread.

    The hot path only increments these; Prometheus reads them when scraped
    (:class:`_StatsCollector`), and ``_handlers`` reports them. A lock-taking
    metric update per event would cost more than the call itself.
    """

    __slots__ = (
        "buckets",
        "calls",
        "codes",
        "duration_sum",
        "errors",
        "in_flight",
        "latencies",
        "overruns",
        "rejected",
        "rejections",
        "replays",
    )

    def __init__(self, window: int) -> None:
        self.in_flight = 0
        self.calls = 0
        self.errors = 0
        self.rejected = 0
        self.replays = 0
        self.overruns = 0
        self.codes: dict[str, int] = {}
        self.rejections: dict[str, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.duration_sum = 0.0
        self.latencies: deque[float] = deque(maxlen=window)

    def observe(self, code: str, duration: float) -> None:
        """Count one finished call."""
        self.calls += 1
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        if code != "OK":
            self.errors += 1
        self.buckets[bisect.bisect_left(BUCKETS, duration)] += 1
        self.duration_sum += duration
        self.latencies.append(duration)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        self.rejections[reason] = self.rejections.get(reason, 0) + 1


class _StatsCollector(Collector):
    """Builds the per-handler families from :class:`HandlerStats` at scrape time."""

    def __init__(self, stats: Callable[[], Mapping[str, HandlerStats]]) -> None:
        self._stats = stats

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        stats = dict(self._stats())
        calls = CounterMetricFamily(
            "pilot_worker_calls",
            "Finished handler calls by status code.",
            labels=["handler", "code"],
        )
        errors = CounterMetricFamily(
            "pilot_worker_errors",
            "Handler calls that failed, by status code.",
            labels=["handler", "code"],
        )
        duration = HistogramMetricFamily(
            "pilot_worker_call_duration_seconds",
            "Wall time of a handler call, from arrival to answer.",
            labels=["handler"],
        )
        in_flight = GaugeMetricFamily(
            "pilot_worker_in_flight_calls",
            "Calls holding a slot (including sync handlers overrunning their timeout).",
            labels=["handler"],
        )
        rejections = CounterMetricFamily(
            "pilot_worker_rejections",
            "Calls refused before the handler ran, by reason.",
            labels=["handler", "reason"],
        )
        replays = CounterMetricFamily(
            "pilot_worker_idempotent_replays",
            "Calls answered from the idempotency cache.",
            labels=["handler"],
        )
        overruns = CounterMetricFamily(
            "pilot_worker_deadline_overruns",
            "Calls whose handler kept running after the call was answered at its "
            "deadline or cancelled by the caller (its late result is discarded).",
            labels=["handler"],
        )
        for name, st in sorted(stats.items()):
            for code, count in sorted(st.codes.items()):
                calls.add_metric([name, code], count)
                if code != "OK":
                    errors.add_metric([name, code], count)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for label, count in zip(_BUCKET_LABELS, st.buckets, strict=True):
                cumulative += count
                buckets.append((label, cumulative))
            duration.add_metric([name], buckets, st.duration_sum)
            in_flight.add_metric([name], st.in_flight)
            for reason, count in sorted(st.rejections.items()):
                rejections.add_metric([name, reason], count)
            replays.add_metric([name], st.replays)
            overruns.add_metric([name], st.overruns)
        yield from (calls, errors, duration, in_flight, rejections, replays, overruns)


class WorkerMetrics:
    """The worker's metrics, registered on ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        version: str,
        stats: Callable[[], Mapping[str, HandlerStats]],
    ) -> None:
        self.registry = registry
        registry.register(_StatsCollector(stats))
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
