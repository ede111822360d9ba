"""The event a subscriber receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Event"]


@dataclass(frozen=True, slots=True)
class Event:
    """One published event, as delivered to a subscriber.

    Attributes:
        topic: the concrete topic it was published to (never a pattern).
        payload: the published value (any msgpack-able value; ``bytes`` from a
            Pilot daemon's event stream).
        publisher: authenticated node id of the publisher; ``None`` when the
            broker's own process published it, or when it came from a Pilot
            daemon (whose event stream does not say who published).
        timestamp: Unix time (seconds) at which the broker accepted it.
        offset: position in the broker's durable log for durable topics
            (increasing across all durable topics of one broker, with gaps);
            ``None`` for non-durable topics.
    """

    topic: str
    payload: Any
    publisher: str | None
    timestamp: float
    offset: int | None = None
