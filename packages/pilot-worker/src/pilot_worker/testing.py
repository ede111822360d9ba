"""Drive handlers in unit tests without a network (filled in with the RPC binding)."""

from __future__ import annotations

__all__: list[str] = []
