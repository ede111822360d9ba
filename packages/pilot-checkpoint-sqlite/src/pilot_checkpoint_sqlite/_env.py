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
"""Default peer (trust-store name, node id or address) of the saver's store worker.

A comma-separated list names the store workers of a store tier, in failover order.
"""

PILOT_CHECKPOINT_PORT = "PILOT_CHECKPOINT_PORT"
"""Default virtual port of the store worker (default 5000)."""

# The transport URL, identity, trust and config-directory variables are
# pilot_transport.config's (TRANSPORT_URL_ENV, IDENTITY_ENV, TRUST_ENV,
# CONFIG_DIR_ENV): the saver reads them through pilot_rpc.PilotClient.
