"""Names of the environment variables this package reads (one place, as constants)."""

from __future__ import annotations

PILOT_CHECKPOINT_DB = "PILOT_CHECKPOINT_DB"
"""Database URL of the store served by the ``checkpoint-sqlite`` worker plugin."""

PILOT_CHECKPOINT_SHARED = "PILOT_CHECKPOINT_SHARED"
"""``1``/``true``: every caller sees every thread (no per-identity scoping)."""

PILOT_CHECKPOINT_MAX_AGE = "PILOT_CHECKPOINT_MAX_AGE"
"""Retention: delete checkpoints older than this many seconds (unset: keep)."""

PILOT_CHECKPOINT_MAX_PER_THREAD = "PILOT_CHECKPOINT_MAX_PER_THREAD"
"""Retention: keep at most this many checkpoints per thread namespace (unset: keep)."""

PILOT_CHECKPOINT_PEER = "PILOT_CHECKPOINT_PEER"
"""Default peer (trust-store name, node id or address) of the saver's store worker."""

PILOT_CHECKPOINT_PORT = "PILOT_CHECKPOINT_PORT"
"""Default virtual port of the store worker (default 5000)."""

PILOT_TRANSPORT = "PILOT_TRANSPORT"
"""Transport URL used when the saver opens its own transport."""

PILOT_IDENTITY = "PILOT_IDENTITY"
"""Path of the identity key file used when the saver opens its own transport."""

PILOT_TRUST = "PILOT_TRUST"
"""Path of the trust store file used when the saver opens its own transport."""

PILOT_CONFIG_DIR = "PILOT_CONFIG_DIR"
"""Directory of the default ``identity.key`` and ``trust.json`` (as pilot-transport's CLI)."""
