"""Environment variables read by pilot-transport, in one place."""

from __future__ import annotations

__all__ = [
    "CONFIG_DIR_ENV",
    "DEFAULT_TRANSPORT_URL",
    "IDENTITY_ENV",
    "TRANSPORT_ENV",
    "TRUST_ENV",
]

TRANSPORT_ENV = "PILOT_TRANSPORT"
"""Transport URL used when ``open_transport(url=None)`` (``tcp://...``, ``memory://...``, ``pilot://...``)."""

IDENTITY_ENV = "PILOT_IDENTITY"
"""Path of the identity key file used by the CLI when ``--identity`` is not given."""

TRUST_ENV = "PILOT_TRUST"
"""Path of the trust store file used by the CLI when ``--trust`` is not given."""

CONFIG_DIR_ENV = "PILOT_CONFIG_DIR"
"""Directory holding the default identity and trust files (default ``~/.config/pilot``)."""

DEFAULT_TRANSPORT_URL = "tcp://127.0.0.1:0"
"""The embedded carrier on loopback with a free port: safe, needs no daemon."""
