"""What travels between clients and the broker plugin (msgpack-able values only).

Methods on the worker (all under the worker's own handler ACL, then the
broker's topic ACL):

- ``channels.subscribe`` (server streaming). Request ``{"v": 1, "pattern",
  "queue", "policy", "after", "start"}``. First item ``{"ready": {"sub",
  "cursor", "head", "queue", "policy"}}``; then ``{"ev": [[topic, payload,
  publisher, ts, offset], ...], "dropped": n}`` where ``dropped`` is the
  total dropped for this subscription so far.
- ``channels.publish`` (unary). Request ``{"v": 1, "ev": [[topic, payload], ...]}``;
  reply ``{"offsets": [offset | None, ...]}``.
- ``channels.stats`` (unary). Reply: broker counters and per-subscription depths.

Broker errors travel as RPC status codes with ``details["error"]`` naming the
``pilot_channels.errors`` class, so the client raises the same class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._event import Event
from .errors import BrokerProtocolError

__all__ = [
    "METHOD_PUBLISH",
    "METHOD_STATS",
    "METHOD_SUBSCRIBE",
    "WIRE_VERSION",
    "decode_events",
    "encode_events",
]

WIRE_VERSION = 1
METHOD_SUBSCRIBE = "channels.subscribe"
METHOD_PUBLISH = "channels.publish"
METHOD_STATS = "channels.stats"


def encode_events(events: Sequence[Event]) -> list[list[Any]]:
    return [[e.topic, e.payload, e.publisher, e.timestamp, e.offset] for e in events]


def decode_events(raw: Any) -> list[Event]:
    """Raises BrokerProtocolError on a malformed list."""
    if not isinstance(raw, list):
        raise BrokerProtocolError("malformed event batch from the broker")
    out: list[Event] = []
    try:
        for item in raw:  # pyright: ignore[reportUnknownVariableType]
            topic, payload, publisher, ts, offset = item
            if not isinstance(topic, str):
                raise TypeError("topic")
            out.append(
                Event(
                    topic=topic,
                    payload=payload,
                    publisher=publisher if isinstance(publisher, str) else None,
                    timestamp=float(ts),
                    offset=int(offset) if offset is not None else None,
                )
            )
    except (TypeError, ValueError) as exc:
        raise BrokerProtocolError(f"malformed event from the broker: {exc}") from exc
    return out
