"""Options: small frozen keyword-only dataclasses, validated at construction."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from ._topics import compile_pattern
from .errors import ChannelConfigError, InvalidPatternError

__all__ = [
    "AclRule",
    "BrokerOptions",
    "DurableTopic",
    "PublisherOptions",
    "ReconnectPolicy",
    "Retention",
    "SlowConsumerPolicy",
    "SubscribeOptions",
]


class SlowConsumerPolicy(StrEnum):
    """What the broker does when a subscriber's queue of non-durable events is full.

    - ``DROP_OLDEST`` (default): drop the oldest queued event and count it; the
      subscriber sees the count (``PilotChannel.dropped``). Publishers and other
      subscribers are never slowed.
    - ``BLOCK``: the publisher's ``publish`` waits until the subscriber has room.
      One publish call waits at most ``BrokerOptions.block_timeout_secs`` in all,
      however many ``BLOCK`` subscribers are stuck (they are waited for together,
      against one deadline); those still full then are disconnected.
    - ``DISCONNECT``: end the subscriber's stream at once; the client reconnects
      (non-durable events published meanwhile are lost; durable ones are resumed).
    """

    DROP_OLDEST = "drop_oldest"
    BLOCK = "block"
    DISCONNECT = "disconnect"


def _positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise ChannelConfigError(f"{name} is required")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ChannelConfigError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ChannelConfigError(f"{name} must be > 0, got {value!r}")


def _pattern(name: str, value: str) -> None:
    try:
        compile_pattern(value)
    except InvalidPatternError as exc:
        raise ChannelConfigError(f"{name}: {exc}") from exc


def _node_ids(name: str, value: Collection[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ChannelConfigError(f"{name} must be a collection of node ids, not one str")
    ids = frozenset(value)
    for node in ids:
        if not isinstance(node, str) or not node:  # pyright: ignore[reportUnnecessaryIsInstance] -- checks user data
            raise ChannelConfigError(f"{name} holds a non-string or empty node id: {node!r}")
    return ids


@dataclass(frozen=True, kw_only=True)
class Retention:
    """How much of a durable topic's log is kept, per topic; ``None`` = no limit.

    The oldest events go first once any limit is passed. A subscriber that falls
    further behind than the retention loses the pruned events.
    """

    max_events: int | None = 100_000
    max_age_secs: float | None = 7 * 24 * 3600.0
    max_bytes: int | None = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        _positive("Retention.max_events", self.max_events)
        _positive("Retention.max_age_secs", self.max_age_secs)
        _positive("Retention.max_bytes", self.max_bytes)


@dataclass(frozen=True, kw_only=True)
class AclRule:
    """Who may publish to and subscribe to topics matching ``pattern``.

    ``publish``/``subscribe`` are node ids (``Identity.node_id``) of trusted
    peers; ``None`` means any trusted peer, an empty collection means nobody.
    The first rule whose pattern matches a topic decides for that topic.
    """

    pattern: str
    publish: Collection[str] | None = None
    subscribe: Collection[str] | None = None

    def __post_init__(self) -> None:
        _pattern("AclRule.pattern", self.pattern)
        object.__setattr__(self, "publish", _node_ids("AclRule.publish", self.publish))
        object.__setattr__(self, "subscribe", _node_ids("AclRule.subscribe", self.subscribe))


@dataclass(frozen=True, kw_only=True)
class DurableTopic:
    """Topics matching ``pattern`` are durable: logged with offsets, resumable."""

    pattern: str
    retention: Retention = field(default_factory=Retention)

    def __post_init__(self) -> None:
        _pattern("DurableTopic.pattern", self.pattern)


@dataclass(frozen=True, kw_only=True)
class BrokerOptions:
    """Configuration of a broker (the ``channels`` worker plugin builds one).

    Attributes:
        acl: ordered topic ACL rules; the first matching rule decides.
        default_access: for topics no rule matches: ``"open"`` (any trusted peer;
            only peers in the worker's trust store reach the broker at all) or
            ``"closed"`` (nobody).
        durable: which topics are durable (opt-in; all others are at-most-once).
        log_path: SQLite file of the durable log; ``None`` keeps it in memory
            (durable across subscriber reconnects, not across broker restarts).
        default_queue: per-subscriber queue length when the subscriber asks none.
        max_queue: the largest queue a subscriber may ask for.
        default_policy: slow-consumer policy when the subscriber asks none.
        allow_block: whether subscribers may choose ``BLOCK`` (which can slow publishers).
        block_timeout_secs: the longest one publish call waits on ``BLOCK``
            subscribers, however many are stuck (5 s).
        max_subscriptions: total subscriptions the broker accepts (10,000).
        max_subscriptions_per_peer: subscriptions one node id may hold (256);
            past either cap ``subscribe`` raises ``SubscriptionLimitError``.
        max_payload_bytes: larger payloads are refused.
        retention_interval_secs: how often retention runs.
    """

    acl: Sequence[AclRule] = ()
    default_access: Literal["open", "closed"] = "open"
    durable: Sequence[DurableTopic] = ()
    log_path: str | None = None
    default_queue: int = 1024
    max_queue: int = 65536
    default_policy: SlowConsumerPolicy = SlowConsumerPolicy.DROP_OLDEST
    allow_block: bool = True
    block_timeout_secs: float = 5.0
    max_payload_bytes: int = 1024 * 1024
    max_subscriptions: int = 10_000
    max_subscriptions_per_peer: int = 256
    retention_interval_secs: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "acl", tuple(self.acl))
        object.__setattr__(self, "durable", tuple(self.durable))
        if self.default_access not in ("open", "closed"):
            raise ChannelConfigError(
                f"default_access must be 'open' or 'closed', got {self.default_access!r}"
            )
        for name in (
            "default_queue",
            "max_queue",
            "max_payload_bytes",
            "max_subscriptions",
            "max_subscriptions_per_peer",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ChannelConfigError(f"BrokerOptions.{name} must be an int > 0, got {value!r}")
        if self.default_queue > self.max_queue:
            raise ChannelConfigError("BrokerOptions.default_queue must be <= max_queue")
        _positive("BrokerOptions.block_timeout_secs", self.block_timeout_secs, allow_none=False)
        _positive(
            "BrokerOptions.retention_interval_secs", self.retention_interval_secs, allow_none=False
        )
        try:
            object.__setattr__(self, "default_policy", SlowConsumerPolicy(self.default_policy))
        except ValueError as exc:
            raise ChannelConfigError(
                f"unknown slow-consumer policy {self.default_policy!r}"
            ) from exc

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides: Any) -> BrokerOptions:
        """Build options from JSON-shaped data (the plugin's ``--channels-config``).

        Shape: ``{"acl": [{"pattern", "publish", "subscribe"}], "default_access",
        "durable": [{"pattern", "retention": {"max_events", "max_age_secs",
        "max_bytes"}}], "log_path", "default_queue", "max_queue", "default_policy",
        "allow_block", "block_timeout_secs", "max_payload_bytes", ...}``.

        Raises:
            ChannelConfigError: unknown keys or invalid values.
        """
        values: dict[str, Any] = dict(data)
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ChannelConfigError(f"unknown broker option(s): {', '.join(sorted(unknown))}")
        try:
            if "acl" in values:
                values["acl"] = [
                    r if isinstance(r, AclRule) else AclRule(**r) for r in values["acl"]
                ]
            if "durable" in values:
                durable: list[DurableTopic] = []
                for item in values["durable"]:
                    if isinstance(item, DurableTopic):
                        durable.append(item)
                    elif isinstance(item, str):
                        durable.append(DurableTopic(pattern=item))
                    else:
                        spec = dict(item)
                        retention = spec.pop("retention", None)
                        durable.append(
                            DurableTopic(
                                **spec,
                                retention=Retention(**retention)
                                if retention is not None
                                else Retention(),
                            )
                        )
                values["durable"] = durable
            return cls(**values)
        except TypeError as exc:
            raise ChannelConfigError(f"invalid broker configuration: {exc}") from exc

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> BrokerOptions:
        """Read :meth:`from_mapping` data from a JSON file.

        Raises:
            ChannelConfigError: the file is unreadable, not JSON, or invalid.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ChannelConfigError(f"cannot read broker config {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict):
            raise ChannelConfigError(f"broker config {str(path)!r} must hold a JSON object")
        return cls.from_mapping(data, **overrides)  # pyright: ignore[reportUnknownArgumentType]


@dataclass(frozen=True, kw_only=True)
class ReconnectPolicy:
    """Client auto-reconnect: exponential backoff with jitter. On by default.

    ``max_attempts=None`` retries until ``close()``; a number gives up after that
    many failed attempts in a row and raises the last error from ``recv``.
    """

    enabled: bool = True
    initial_backoff_secs: float = 0.1
    max_backoff_secs: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        _positive(
            "ReconnectPolicy.initial_backoff_secs", self.initial_backoff_secs, allow_none=False
        )
        _positive("ReconnectPolicy.max_backoff_secs", self.max_backoff_secs, allow_none=False)
        if self.multiplier < 1:
            raise ChannelConfigError("ReconnectPolicy.multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ChannelConfigError("ReconnectPolicy.jitter must be within [0, 1]")
        if self.max_attempts is not None and self.max_attempts <= 0:
            raise ChannelConfigError("ReconnectPolicy.max_attempts must be > 0 or None")

    def backoff(self, attempt: int, random: float) -> float:
        """Delay before reconnect ``attempt`` (1-based); ``random`` is in [0, 1)."""
        base = min(
            self.max_backoff_secs,
            self.initial_backoff_secs * self.multiplier ** max(0, attempt - 1),
        )
        return base * (1 - self.jitter + 2 * self.jitter * random)


@dataclass(frozen=True, kw_only=True)
class SubscribeOptions:
    """How a :class:`~pilot_channels.PilotChannel` subscribes.

    Attributes:
        queue_size: broker-side queue length for this subscriber (``None``: the
            broker's default; capped by the broker's ``max_queue``).
        policy: slow-consumer policy (``None``: the broker's default).
        start: where durable topics start when no offset is known:
            ``"latest"`` (only events published after subscribing) or
            ``"earliest"`` (everything retained).
        resume_after: resume durable topics after this offset (the last one the
            application processed, e.g. saved from ``PilotChannel.last_offset``
            by a previous process); overrides ``start``.
        buffer_batches: client-side buffer, in batches received from the broker.
        reconnect: auto-reconnect policy (on by default).
        connect_timeout_secs: time to open the subscription on each attempt.
    """

    queue_size: int | None = None
    policy: SlowConsumerPolicy | None = None
    start: Literal["latest", "earliest"] = "latest"
    resume_after: int | None = None
    buffer_batches: int = 16
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    connect_timeout_secs: float = 10.0

    def __post_init__(self) -> None:
        if self.queue_size is not None and (
            isinstance(self.queue_size, bool) or self.queue_size <= 0
        ):
            raise ChannelConfigError("SubscribeOptions.queue_size must be > 0 or None")
        if self.policy is not None:
            try:
                object.__setattr__(self, "policy", SlowConsumerPolicy(self.policy))
            except ValueError as exc:
                raise ChannelConfigError(f"unknown slow-consumer policy {self.policy!r}") from exc
        if self.start not in ("latest", "earliest"):
            raise ChannelConfigError("SubscribeOptions.start must be 'latest' or 'earliest'")
        if self.resume_after is not None and (
            isinstance(self.resume_after, bool)
            or not isinstance(self.resume_after, int)  # pyright: ignore[reportUnnecessaryIsInstance]
            or self.resume_after < 0
        ):
            raise ChannelConfigError("SubscribeOptions.resume_after must be an int >= 0 or None")
        if self.buffer_batches <= 0:
            raise ChannelConfigError("SubscribeOptions.buffer_batches must be > 0")
        _positive(
            "SubscribeOptions.connect_timeout_secs", self.connect_timeout_secs, allow_none=False
        )


@dataclass(frozen=True, kw_only=True)
class PublisherOptions:
    """How a :class:`~pilot_channels.PilotPublisher` sends.

    Concurrent ``publish`` calls are grouped into one request of at most
    ``max_batch`` events; at most ``max_pending`` events wait to be sent (further
    ``publish`` calls wait for room).

    Attributes:
        timeout_secs: the longest one ``publish`` waits for the broker's answer.
        max_batch: events per request.
        max_pending: events waiting to be sent.
        retry: retry a request that failed on the network with this policy
            (only ``max_attempts`` and the backoff are used; ``None``: no retry).
            A retried publish may be delivered twice if the first reached the broker.
    """

    timeout_secs: float = 10.0
    max_batch: int = 256
    max_pending: int = 4096
    retry: ReconnectPolicy | None = field(
        default_factory=lambda: ReconnectPolicy(max_attempts=3, max_backoff_secs=1.0)
    )

    def __post_init__(self) -> None:
        _positive("PublisherOptions.timeout_secs", self.timeout_secs, allow_none=False)
        if self.max_batch <= 0 or self.max_pending <= 0:
            raise ChannelConfigError("PublisherOptions.max_batch and max_pending must be > 0")
