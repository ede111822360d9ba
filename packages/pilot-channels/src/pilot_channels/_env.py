"""Environment variable names read by pilot-channels (all in one place)."""

from __future__ import annotations

__all__ = [
    "ENV_CONFIG",
    "ENV_DB",
    "ENV_DURABLE",
    "ENV_POLICY",
    "ENV_QUEUE",
]

ENV_CONFIG = "PILOT_CHANNELS_CONFIG"
"""Path of the broker's JSON configuration (ACL, durable topics, limits)."""
ENV_DB = "PILOT_CHANNELS_DB"
"""Path of the durable log's SQLite file."""
ENV_DURABLE = "PILOT_CHANNELS_DURABLE"
"""Comma-separated patterns of durable topics (default retention)."""
ENV_POLICY = "PILOT_CHANNELS_POLICY"
"""Default slow-consumer policy: drop_oldest, block or disconnect."""
ENV_QUEUE = "PILOT_CHANNELS_QUEUE"
"""Default per-subscriber queue length."""
