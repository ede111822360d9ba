"""Environment variable names read by pilot-worker (all in one place)."""

from __future__ import annotations

from pilot_transport import config as _config

__all__ = [
    "ENV_DEFAULT_POLICY",
    "ENV_DRAIN_TIMEOUT",
    "ENV_HANDLERS",
    "ENV_IDEMPOTENCY_STORE",
    "ENV_IDENTITY",
    "ENV_LOG_FORMAT",
    "ENV_LOG_LEVEL",
    "ENV_METRICS_HOST",
    "ENV_METRICS_PORT",
    "ENV_OTEL_ENDPOINT",
    "ENV_OTEL_SERVICE_NAME",
    "ENV_PLUGINS",
    "ENV_PORT",
    "ENV_READY_FILE",
    "ENV_TRANSPORT",
    "ENV_TRUST",
    "PLUGIN_ENTRY_POINT_GROUP",
]

ENV_TRANSPORT = _config.TRANSPORT_URL_ENV
"""Transport URL (``pilot_transport.config``): ``tcp://...``, ``pilot:///...``."""
ENV_IDENTITY = _config.IDENTITY_ENV
"""Path of the worker's identity key file (``pilot_transport.config``)."""
ENV_TRUST = _config.TRUST_ENV
"""Path of the worker's trust store file (``pilot_transport.config``)."""
ENV_PORT = "PILOT_WORKER_PORT"
"""Virtual port the worker serves on."""
ENV_HANDLERS = "PILOT_WORKER_HANDLERS"
"""Comma-separated handler modules, used when no ``--handlers`` is given."""
ENV_PLUGINS = "PILOT_WORKER_PLUGINS"
"""Comma-separated plugin names, used when no ``--plugin`` is given."""
ENV_METRICS_PORT = "PILOT_WORKER_METRICS_PORT"
"""Port of the /metrics, /healthz, /readyz HTTP endpoint (unset: disabled)."""
ENV_METRICS_HOST = "PILOT_WORKER_METRICS_HOST"
"""Host the HTTP endpoint binds (default 127.0.0.1)."""
ENV_LOG_FORMAT = "PILOT_WORKER_LOG_FORMAT"
"""``plain`` or ``json``."""
ENV_LOG_LEVEL = "PILOT_WORKER_LOG_LEVEL"
"""Logging level name."""
ENV_DRAIN_TIMEOUT = "PILOT_WORKER_DRAIN_TIMEOUT"
"""Seconds to let in-flight calls finish on SIGTERM/SIGINT."""
ENV_DEFAULT_POLICY = "PILOT_WORKER_DEFAULT_POLICY"
"""``open`` or ``closed``: the ACL of handlers with ``allow=None``."""
ENV_READY_FILE = "PILOT_WORKER_READY_FILE"
"""Path where a JSON line ``{node_id, endpoint, port, pid, ...}`` is written once serving."""
ENV_IDEMPOTENCY_STORE = "PILOT_WORKER_IDEMPOTENCY_STORE"
"""Database URL of the shared idempotency journal (``--idempotency-store``)."""
ENV_OTEL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
"""Standard OpenTelemetry variable: when set, the CLI wires the OTLP exporter."""
ENV_OTEL_SERVICE_NAME = "OTEL_SERVICE_NAME"
"""Standard OpenTelemetry variable: the service name of exported spans."""

PLUGIN_ENTRY_POINT_GROUP = "pilot_worker.plugins"
"""Entry-point group in which installed distributions publish :class:`Plugin` objects."""
