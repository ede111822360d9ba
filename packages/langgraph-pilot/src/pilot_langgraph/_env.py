"""Environment variables read by pilot_langgraph.

The first four are ``pilot_transport.config``'s (the one place their names
live), shared with every package, so one set of variables configures a worker
and the graphs that call it.
"""

from __future__ import annotations

from typing import Final

from pilot_transport import config

__all__ = [
    "DEFAULT_PORT",
    "PILOT_CONFIG_DIR",
    "PILOT_DEMO_WORKER",
    "PILOT_IDENTITY",
    "PILOT_TRANSPORT_URL",
    "PILOT_TRUST",
    "PILOT_WORKER_HANDLERS",
]

PILOT_TRANSPORT_URL: Final = config.TRANSPORT_URL_ENV
"""Carrier URL of the shared default client (``tcp://127.0.0.1:0`` if unset)."""

PILOT_IDENTITY: Final = config.IDENTITY_ENV
"""Path of this process's identity key file (must exist when set)."""

PILOT_TRUST: Final = config.TRUST_ENV
"""Path of this process's trust store file (must exist when set)."""

PILOT_CONFIG_DIR: Final = config.CONFIG_DIR_ENV
"""Directory holding ``identity.key`` and ``trust.json`` when the two above are unset."""

DEFAULT_PORT: Final = 5000
"""Virtual port workers serve on unless told otherwise (pilot-worker's default)."""

PILOT_WORKER_HANDLERS: Final = "PILOT_WORKER_HANDLERS"
"""pilot-worker's comma-separated default ``--handlers`` (expanded by
``pilot-langgraph-worker``, which always adds its own built-in module)."""

PILOT_DEMO_WORKER: Final = "PILOT_DEMO_WORKER"
"""Set by ``pilot-langgraph demo`` on each worker it starts: the worker's name,
reported by the demo handlers next to their pid."""
