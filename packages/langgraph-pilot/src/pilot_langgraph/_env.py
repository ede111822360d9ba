"""Environment variables read by pilot_langgraph (the only place their names live).

The first four are shared with pilot-transport and pilot-worker, so one set of
variables configures a worker and the graphs that call it.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_CONFIG_DIR",
    "DEFAULT_PORT",
    "IDENTITY_FILE",
    "PILOT_CONFIG_DIR",
    "PILOT_DEMO_WORKER",
    "PILOT_IDENTITY",
    "PILOT_TRANSPORT",
    "PILOT_TRUST",
    "PILOT_WORKER_HANDLERS",
    "TRUST_FILE",
    "XDG_CONFIG_HOME",
]

PILOT_TRANSPORT: Final = "PILOT_TRANSPORT"
"""Carrier URL of the process-wide default transport (``tcp://127.0.0.1:0`` if unset)."""

PILOT_IDENTITY: Final = "PILOT_IDENTITY"
"""Path of this process's identity key file (created with mode 0600 if missing)."""

PILOT_TRUST: Final = "PILOT_TRUST"
"""Path of this process's trust store file."""

PILOT_CONFIG_DIR: Final = "PILOT_CONFIG_DIR"
"""Directory holding ``identity.key`` and ``trust.json`` when the two above are unset."""

XDG_CONFIG_HOME: Final = "XDG_CONFIG_HOME"
"""Standard variable: with no ``PILOT_CONFIG_DIR``, the files live in ``$XDG_CONFIG_HOME/pilot``."""

DEFAULT_CONFIG_DIR: Final = "~/.config/pilot"
IDENTITY_FILE: Final = "identity.key"
TRUST_FILE: Final = "trust.json"
DEFAULT_PORT: Final = 5000
"""Virtual port workers serve on unless told otherwise (pilot-worker's default)."""

PILOT_WORKER_HANDLERS: Final = "PILOT_WORKER_HANDLERS"
"""pilot-worker's comma-separated default ``--handlers`` (expanded by
``pilot-langgraph-worker``, which always adds its own built-in module)."""

PILOT_DEMO_WORKER: Final = "PILOT_DEMO_WORKER"
"""Set by ``pilot-langgraph demo`` on each worker it starts: the worker's name,
reported by the demo handlers next to their pid."""
