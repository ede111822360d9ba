"""Prometheus metrics of the broker and the clients, on an injectable registry."""

from __future__ import annotations

import weakref
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["BrokerMetrics", "ClientMetrics", "client_metrics"]


class BrokerMetrics:
    """Broker metrics; gauges read the broker's state when scraped."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        self.registry = reg
        self.events_in = Counter(
            "pilot_channels_events_in",
            "Events accepted from publishers.",
            ["durable"],
            registry=reg,
        )
        self.deliveries = Counter(
            "pilot_channels_deliveries",
            "Events handed to subscribers' streams (events out).",
            registry=reg,
        )
        self.dropped = Counter(
            "pilot_channels_dropped",
            "Events dropped from a full subscriber queue (drop_oldest policy).",
            registry=reg,
        )
        self.slow_disconnects = Counter(
            "pilot_channels_slow_consumer_disconnects",
            "Subscribers disconnected because their queue stayed full.",
            ["policy"],
            registry=reg,
        )
        self.denied = Counter(
            "pilot_channels_denied",
            "Publish or subscribe attempts refused by the topic ACL or a subscription cap.",
            ["action"],
            registry=reg,
        )
        self.publish_blocked = Counter(
            "pilot_channels_publish_blocked",
            "Times a publish waited on a full subscriber queue (block policy).",
            registry=reg,
        )
        self.subscribers = Gauge("pilot_channels_subscribers", "Open subscriptions.", registry=reg)
        self.queue_depth = Gauge(
            "pilot_channels_queue_depth", "Events queued for all subscribers.", registry=reg
        )
        self.queue_depth_max = Gauge(
            "pilot_channels_queue_depth_max",
            "Events queued for the most backed-up subscriber.",
            registry=reg,
        )
        self.lagging = Gauge(
            "pilot_channels_lagging_subscribers",
            "Durable subscribers reading from the log rather than live.",
            registry=reg,
        )
        self.log_events = Gauge(
            "pilot_channels_durable_log_events", "Events retained in the durable log.", registry=reg
        )
        self.log_bytes = Gauge(
            "pilot_channels_durable_log_bytes",
            "Payload bytes retained in the durable log.",
            registry=reg,
        )

    def bind(
        self,
        *,
        subscribers: Callable[[], float],
        queue_depth: Callable[[], float],
        queue_depth_max: Callable[[], float],
        lagging: Callable[[], float],
        log_events: Callable[[], float],
        log_bytes: Callable[[], float],
    ) -> None:
        self.subscribers.set_function(subscribers)
        self.queue_depth.set_function(queue_depth)
        self.queue_depth_max.set_function(queue_depth_max)
        self.lagging.set_function(lagging)
        self.log_events.set_function(log_events)
        self.log_bytes.set_function(log_bytes)


class ClientMetrics:
    """Client-side metrics, shared by every channel and publisher on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reconnects = Counter(
            "pilot_channels_client_reconnects",
            "Reconnect attempts by channel clients.",
            ["kind"],
            registry=registry,
        )
        self.connected = Gauge(
            "pilot_channels_client_connected",
            "Channel clients currently connected to their broker.",
            ["kind"],
            registry=registry,
        )
        self.received = Counter(
            "pilot_channels_client_events_received",
            "Events delivered to the application by channel clients.",
            registry=registry,
        )
        self.duplicates = Counter(
            "pilot_channels_client_duplicates_dropped",
            "Durable events received twice after a reconnect and not delivered again.",
            registry=registry,
        )
        self.broker_drops = Counter(
            "pilot_channels_client_broker_dropped",
            "Events the broker reported dropped for these subscribers (slow consumer).",
            registry=registry,
        )
        self.published = Counter(
            "pilot_channels_client_events_published",
            "Events accepted by the broker from publishers.",
            registry=registry,
        )


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, ClientMetrics] = (
    weakref.WeakKeyDictionary()
)


def client_metrics(registry: CollectorRegistry | None) -> ClientMetrics:
    """The client metrics on ``registry`` (default: prometheus' global registry)."""
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    found = _by_registry.get(registry)
    if found is None:
        found = ClientMetrics(registry)
        _by_registry[registry] = found
    return found
