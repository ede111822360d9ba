"""The broker: routes published events to subscriptions.

Theory of operation
-------------------
Every subscription owns two bounded deques: ``live`` for events of
non-durable topics and ``durable`` for events of durable topics, each at most
``queue_size`` events (and ``max_queue_bytes`` payload bytes). A publish routes
each event to the subscriptions whose pattern matches its topic and whose node
may read it (the route of a topic is cached until subscriptions change).

Non-durable events are at-most-once. When ``live`` is full, the subscription's
slow-consumer policy decides: ``drop_oldest`` drops and counts, ``disconnect``
ends the subscription, ``block`` makes that publish wait for room. All the
``block`` subscribers one publish call waits on are waited for *together*,
against one deadline of ``block_timeout_secs`` per call (not per subscriber):
the subscribers still full at the deadline are disconnected, so a publish is
stalled at most ``block_timeout_secs`` however many subscribers are stuck.
Nothing else ever waits on a subscriber, so one slow subscriber neither slows
the others nor grows memory.

Durable events are first appended to the log, then offered to each matching
subscription. A subscription is either *live* (it has seen every durable event
up to the log head; new ones are queued directly) or *lagging*. A full
``durable`` deque never drops: the subscription turns lagging, and later
refills its deque from the log, from its ``cursor`` (the last offset queued or
scanned), until a read reaches the head and it turns live again. A subscriber
resuming from an offset starts lagging at that offset. Log appends, reads and
the live/lagging switch all run on the event loop thread with no ``await``
between them, so no event can slip between a read and the switch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgpack
from prometheus_client import CollectorRegistry

from ._acl import TopicAcl
from ._event import Event
from ._log import DurableLog
from ._metrics import BrokerMetrics
from ._options import BrokerOptions, SlowConsumerPolicy
from ._tasks import cancel_and_wait
from ._topics import TopicPattern, compile_pattern, validate_topic
from .errors import (
    BrokerUnavailableError,
    ChannelClosedError,
    ChannelConfigError,
    ChannelError,
    ChannelPermissionError,
    ChannelTimeoutError,
    PayloadTooLargeError,
    SlowConsumerError,
    SubscriptionLimitError,
)

__all__ = ["Broker", "Subscription"]

logger = logging.getLogger("pilot_channels.broker")

MAX_QUEUE_BYTES = 64 * 1024 * 1024
_ROUTE_CACHE_LIMIT = 8192

_Item = tuple[int, Event, int]  # (arrival sequence, event, payload size)


def payload_size(payload: Any) -> int:
    """Bytes a payload occupies on the wire (cheap for bytes and str)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return len(payload)
    if isinstance(payload, str):
        return len(payload) * 4 if len(payload) > 1024 else len(payload.encode("utf-8"))
    return len(pack(payload))


def pack(value: Any) -> bytes:
    """msgpack-encode ``value`` (bytes stay bytes, str stays str)."""
    data = msgpack.packb(value, use_bin_type=True)
    assert isinstance(data, bytes)
    return data


class Subscription:
    """One subscriber's bounded queues; obtained from :meth:`Broker.subscribe`.

    Not thread-safe; use from the broker's event loop.
    """

    def __init__(
        self,
        broker: Broker,
        sub_id: int,
        *,
        node_id: str | None,
        pattern: TopicPattern,
        queue_size: int,
        policy: SlowConsumerPolicy,
        cursor: int,
        lagging: bool,
    ) -> None:
        self._broker = broker
        self.id = sub_id
        self.node_id = node_id
        self.pattern = pattern
        self.queue_size = queue_size
        self.policy = policy
        self.cursor = cursor
        self.lagging = lagging
        self.head_at_start = broker.head
        self.dropped = 0
        self.delivered = 0
        self._live: deque[_Item] = deque()
        self._durable: deque[_Item] = deque()
        self._live_bytes = 0
        self._durable_bytes = 0
        self._wake = asyncio.Event()
        # Publishers waiting for room in ``live`` (block policy): each waiting
        # publish registers one event, set when room appears or on close.
        self._waiters: set[asyncio.Event] = set()
        self._error: ChannelError | None = None
        self.closed = False

    @property
    def depth(self) -> int:
        """Events queued for this subscriber."""
        return len(self._live) + len(self._durable)

    def _live_full(self) -> bool:
        return len(self._live) >= self.queue_size or self._live_bytes >= MAX_QUEUE_BYTES

    def _durable_full(self) -> bool:
        return len(self._durable) >= self.queue_size or self._durable_bytes >= MAX_QUEUE_BYTES

    # -- called by the broker while publishing -------------------------------

    def _push_live(self, item: _Item) -> None:
        self._live.append(item)
        self._live_bytes += item[2]
        self._wake.set()

    def _offer_live(self, item: _Item) -> bool:
        """Queue a non-durable event; False when the publisher must wait (block)."""
        if not self._live_full():
            self._push_live(item)
            return True
        if self.policy is SlowConsumerPolicy.DROP_OLDEST:
            old = self._live.popleft()
            self._live_bytes -= old[2]
            self.dropped += 1
            self._broker.metrics.dropped.inc()
            self._push_live(item)
            return True
        if self.policy is SlowConsumerPolicy.DISCONNECT:
            self._disconnect_slow("its queue was full (disconnect policy)")
            return True
        return False

    def _notify_space(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    def _offer_durable(self, item: _Item) -> None:
        if self.lagging:
            return
        if self._durable_full():
            self.lagging = True
            return
        self._durable.append(item)
        self._durable_bytes += item[2]
        assert item[1].offset is not None
        self.cursor = item[1].offset
        self._wake.set()

    def _disconnect_slow(self, why: str) -> None:
        self._broker.metrics.slow_disconnects.labels(self.policy.value).inc()
        logger.warning(
            "disconnecting slow subscriber %s (node %s, pattern %r): %s",
            self.id,
            self.node_id,
            self.pattern.text,
            why,
        )
        self._fail(SlowConsumerError(f"disconnected by the broker: {why}"))

    def _fail(self, error: ChannelError) -> None:
        if self.closed:
            return
        self._error = error
        self.closed = True
        self._live.clear()
        self._durable.clear()
        self._live_bytes = self._durable_bytes = 0
        self._wake.set()
        self._notify_space()
        self._broker._remove(self)

    # -- called by the subscriber side ---------------------------------------

    def _refill(self) -> None:
        """While lagging, move durable events from the log into the deque."""
        log = self._broker.log
        if log is None:
            self.lagging = False
            return
        while self.lagging and not self._durable_full():
            want = max(64, self.queue_size - len(self._durable))
            rows = log.read_after(self.cursor, want)
            for row in rows:
                if self._durable_full():
                    return
                self.cursor = row.offset
                if not self.pattern.matches(row.topic) or not self._broker.acl.may_read(
                    self.node_id, row.topic
                ):
                    continue
                event = Event(
                    topic=row.topic,
                    payload=msgpack.unpackb(row.payload, raw=False),
                    publisher=row.publisher,
                    timestamp=row.timestamp,
                    offset=row.offset,
                )
                self._durable.append((self._broker._next_seq(), event, len(row.payload)))
                self._durable_bytes += len(row.payload)
            if len(rows) < want:
                self.lagging = False

    def take_nowait(self, max_items: int = 1024) -> list[Event]:
        """Queued events, oldest first, at most ``max_items``; may be empty.

        Raises:
            SlowConsumerError: the broker disconnected this subscriber.
            BrokerUnavailableError: the broker closed.
            ChannelClosedError: the subscription was closed by its owner.
        """
        if self._error is not None:
            raise self._error
        if self.lagging:
            self._refill()
        batch: list[Event] = []
        live, durable = self._live, self._durable
        while len(batch) < max_items and (live or durable):
            if durable and (not live or durable[0][0] < live[0][0]):
                item = durable.popleft()
                self._durable_bytes -= item[2]
            else:
                item = live.popleft()
                self._live_bytes -= item[2]
            batch.append(item[1])
        if batch:
            self.delivered += len(batch)
            self._broker.metrics.deliveries.inc(len(batch))
            if self._waiters and not self._live_full():
                self._notify_space()
            if self.lagging:
                self._refill()
        if not live and not durable:
            self._wake.clear()
        return batch

    async def next_batch(
        self,
        max_items: int = 1024,
        timeout: float | None = None,  # noqa: ASYNC109 (documented API)
    ) -> list[Event]:
        """Wait for queued events and return them (at least one, at most ``max_items``).

        Cancellation leaves the queue intact.

        Raises:
            ChannelTimeoutError: nothing arrived within ``timeout`` seconds.
            SlowConsumerError, BrokerUnavailableError, ChannelClosedError: as
                :meth:`take_nowait`.
        """
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            batch = self.take_nowait(max_items)
            if batch:
                return batch
            if deadline is None:
                await self._wake.wait()
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise ChannelTimeoutError(f"no event within {timeout} s")
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                continue

    def close(self) -> None:
        """End the subscription and free its queues. Idempotent."""
        self._fail(ChannelClosedError("subscription closed"))


class Broker:
    """Topic router with bounded per-subscriber queues and an optional durable log.

    Usable in-process (``async with Broker(options) as broker``) or through
    the ``channels`` worker plugin, which serves it to peers.

    Args:
        options: broker configuration.
        registry: prometheus registry for the broker metrics (a private one if None).
        clock: wall clock for event timestamps and retention.
    """

    def __init__(
        self,
        options: BrokerOptions | None = None,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options if options is not None else BrokerOptions()
        self.metrics = BrokerMetrics(registry)
        self.acl = TopicAcl(self.options.acl, default_access=self.options.default_access)
        self._clock = clock
        self._durable_patterns = [compile_pattern(d.pattern) for d in self.options.durable]
        self.log: DurableLog | None = (
            DurableLog(self.options.log_path, self.options.durable, clock=clock)
            if self.options.durable
            else None
        )
        if self.options.log_path is not None and not self.options.durable:
            logger.info("log_path is set but no topic is durable; the log is not opened")
        self._subs: dict[int, Subscription] = {}
        self._per_node: dict[str | None, int] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._routes: dict[str, tuple[Subscription, ...]] = {}
        self._durable_cache: dict[str, bool] = {}
        self._retention_task: asyncio.Task[None] | None = None
        self._closed = False
        self.metrics.bind(
            subscribers=lambda: len(self._subs),
            queue_depth=lambda: sum(s.depth for s in self._subs.values()),
            queue_depth_max=lambda: max((s.depth for s in self._subs.values()), default=0),
            lagging=lambda: sum(1 for s in self._subs.values() if s.lagging),
            log_events=lambda: self.log.events if self.log else 0,
            log_bytes=lambda: self.log.bytes if self.log else 0,
        )

    @property
    def head(self) -> int:
        """The newest offset in the durable log (0 when none)."""
        return self.log.head if self.log is not None else 0

    @property
    def subscriptions(self) -> Sequence[Subscription]:
        """The open subscriptions (a snapshot)."""
        return tuple(self._subs.values())

    async def __aenter__(self) -> Broker:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start retention (needs a running loop). Idempotent."""
        if self._retention_task is None and self.log is not None and not self._closed:
            self._retention_task = asyncio.get_running_loop().create_task(
                self._retention_loop(), name="pilot-channels-retention"
            )

    async def _retention_loop(self) -> None:
        while True:
            self.run_retention()
            await asyncio.sleep(self.options.retention_interval_secs)

    def run_retention(self) -> int:
        """Apply retention now; return the number of events deleted (logs failures)."""
        if self.log is None:
            return 0
        try:
            deleted = self.log.enforce_retention()
        except ChannelError:
            logger.exception("durable log retention failed")
            return 0
        if deleted:
            logger.info("retention deleted %d durable events", deleted)
        return deleted

    async def aclose(self) -> None:
        """Close every subscription (they see BrokerUnavailableError) and the log. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._retention_task is not None:
            await cancel_and_wait(self._retention_task)
        for sub in list(self._subs.values()):
            sub._fail(BrokerUnavailableError("the broker is shutting down"))
        if self.log is not None:
            self.log.close()

    def _next_seq(self) -> int:
        return next(self._seq)

    def is_durable(self, topic: str) -> bool:
        """Whether ``topic`` is durable under this broker's configuration."""
        found = self._durable_cache.get(topic)
        if found is None:
            found = any(p.matches(topic) for p in self._durable_patterns)
            if len(self._durable_cache) >= _ROUTE_CACHE_LIMIT:
                self._durable_cache.clear()
            self._durable_cache[topic] = found
        return found

    def _route(self, topic: str) -> tuple[Subscription, ...]:
        found = self._routes.get(topic)
        if found is None:
            acl = self.acl
            found = tuple(
                s
                for s in self._subs.values()
                if s.pattern.matches(topic) and acl.may_read(s.node_id, topic)
            )
            if len(self._routes) >= _ROUTE_CACHE_LIMIT:
                self._routes.clear()
            self._routes[topic] = found
        return found

    def _remove(self, sub: Subscription) -> None:
        if self._subs.pop(sub.id, None) is not None:
            self._routes.clear()
            left = self._per_node.get(sub.node_id, 1) - 1
            if left:
                self._per_node[sub.node_id] = left
            else:
                self._per_node.pop(sub.node_id, None)

    def subscribe(
        self,
        pattern: str | TopicPattern,
        *,
        node_id: str | None = None,
        queue_size: int | None = None,
        policy: SlowConsumerPolicy | str | None = None,
        after: int | None = None,
        start: Literal["latest", "earliest"] = "latest",
    ) -> Subscription:
        """Open a subscription.

        Args:
            pattern: topic pattern (see :mod:`pilot_channels` for the syntax).
            node_id: authenticated node id of the subscriber (None: this process).
            queue_size: queue length (broker default if None; capped by ``max_queue``).
            policy: slow-consumer policy (broker default if None).
            after: resume durable topics after this offset (the last one the
                subscriber processed); overrides ``start``.
            start: where durable topics start without ``after``.

        Raises:
            InvalidPatternError: bad pattern.
            ChannelPermissionError: the ACL lets this node read no topic of the pattern.
            ChannelConfigError: a forbidden or unknown policy.
            SubscriptionLimitError: the broker holds ``max_subscriptions``, or
                this node holds ``max_subscriptions_per_peer`` (a subclass of
                ChannelConfigError).
            BrokerUnavailableError: the broker is closed.
        """
        if self._closed:
            raise BrokerUnavailableError("the broker is closed")
        compiled = compile_pattern(pattern)
        opts = self.options
        if start not in ("latest", "earliest"):
            raise ChannelConfigError(f"start must be 'latest' or 'earliest', got {start!r}")
        if after is not None and (isinstance(after, bool) or not isinstance(after, int)):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ChannelConfigError(f"after must be an int offset, got {after!r}")
        if not self.acl.may_subscribe(node_id, compiled):
            self.metrics.denied.labels("subscribe").inc()
            raise ChannelPermissionError(
                f"node {node_id} may not subscribe to any topic matching {compiled.text!r}"
            )
        try:
            chosen = SlowConsumerPolicy(policy) if policy is not None else opts.default_policy
        except ValueError as exc:
            raise ChannelConfigError(f"unknown slow-consumer policy {policy!r}") from exc
        if chosen is SlowConsumerPolicy.BLOCK and not opts.allow_block and node_id is not None:
            raise ChannelConfigError("this broker does not allow the 'block' policy")
        size = opts.default_queue if queue_size is None else queue_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ChannelConfigError(f"queue_size must be an int > 0, got {queue_size!r}")
        size = min(size, opts.max_queue)
        if len(self._subs) >= opts.max_subscriptions:
            self.metrics.denied.labels("subscription_limit").inc()
            raise SubscriptionLimitError(
                f"the broker holds its maximum of {opts.max_subscriptions} subscriptions"
            )
        if (
            node_id is not None
            and self._per_node.get(node_id, 0) >= opts.max_subscriptions_per_peer
        ):
            self.metrics.denied.labels("subscription_limit").inc()
            raise SubscriptionLimitError(
                f"node {node_id} holds its maximum of "
                f"{opts.max_subscriptions_per_peer} subscriptions "
                "(BrokerOptions.max_subscriptions_per_peer); close one first"
            )
        wants_durable = self.log is not None and any(
            p.overlaps(compiled) for p in self._durable_patterns
        )
        if not wants_durable:
            cursor, lagging = self.head, False
        elif after is not None:
            cursor, lagging = max(0, int(after)), True
        elif start == "earliest":
            cursor, lagging = 0, True
        else:
            cursor, lagging = self.head, False
        sub = Subscription(
            self,
            next(self._ids),
            node_id=node_id,
            pattern=compiled,
            queue_size=size,
            policy=chosen,
            cursor=cursor,
            lagging=lagging,
        )
        self._subs[sub.id] = sub
        self._per_node[node_id] = self._per_node.get(node_id, 0) + 1
        self._routes.clear()
        return sub

    async def publish(
        self, topic: str, payload: Any, *, publisher: str | None = None
    ) -> int | None:
        """Publish one event; return its offset on a durable topic, else None.

        See :meth:`publish_many`.
        """
        return (await self.publish_many([(topic, payload)], publisher=publisher))[0]

    async def publish_many(
        self, events: Sequence[tuple[str, Any]], *, publisher: str | None = None
    ) -> list[int | None]:
        """Publish events in order; all are checked before any is routed.

        Returns once every event is queued for every matching subscriber. Under
        the ``block`` policy that may wait, but one call waits at most
        ``block_timeout_secs`` in all, however many subscribers are stuck and
        however many events the batch holds: the stuck subscribers are waited
        for concurrently against one deadline, and those still full at the
        deadline are disconnected. Non-durable events are at-most-once; durable
        events are in the log when this returns.

        Raises:
            InvalidTopicError: a bad topic name.
            PayloadTooLargeError: a payload above ``max_payload_bytes``.
            ChannelPermissionError: the ACL refuses ``publisher`` on a topic.
            DurableLogError: the log could not be written (nothing was routed).
            BrokerUnavailableError: the broker is closed.

        Cancellation while waiting on a ``block`` subscriber leaves the events
        already queued in place; the rest of the batch is not routed.
        """
        if self._closed:
            raise BrokerUnavailableError("the broker is closed")
        now = self._clock()
        limit = self.options.max_payload_bytes
        prepared: list[tuple[str, Any, int, bool]] = []
        for topic, payload in events:
            validate_topic(topic)
            if not self.acl.may_publish(publisher, topic):
                self.metrics.denied.labels("publish").inc()
                raise ChannelPermissionError(f"node {publisher} may not publish to {topic!r}")
            size = payload_size(payload)
            if size > limit:
                raise PayloadTooLargeError(
                    f"payload of {size} bytes on {topic!r} exceeds the limit of {limit} bytes"
                )
            prepared.append((topic, payload, size, self.is_durable(topic)))
        offsets: list[int | None] = [None] * len(prepared)
        rows = [
            (topic, now, publisher, pack(payload))
            for topic, payload, _, durable in prepared
            if durable
        ]
        if rows:
            assert self.log is not None
            written = iter(self.log.append_many(rows))
            for index, item in enumerate(prepared):
                if item[3]:
                    offsets[index] = next(written)
            self.metrics.events_in.labels("true").inc(len(rows))
        if len(rows) < len(prepared):
            self.metrics.events_in.labels("false").inc(len(prepared) - len(rows))
        # Durable events are all in the log: route them first, with no await in
        # between, so the live/lagging state of every subscription stays exact.
        for index, (topic, payload, size, durable) in enumerate(prepared):
            if durable:
                event = Event(topic, payload, publisher, now, offsets[index])
                item = (self._next_seq(), event, size)
                for sub in self._route(topic):
                    sub._offer_durable(item)
        deadline: float | None = None
        for topic, payload, size, durable in prepared:
            if durable:
                continue
            item = (self._next_seq(), Event(topic, payload, publisher, now, None), size)
            blocked = [s for s in self._route(topic) if not s.closed and not s._offer_live(item)]
            if blocked:
                self.metrics.publish_blocked.inc()
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + self.options.block_timeout_secs
                await self._deliver_blocked(item, blocked, deadline)
        return offsets

    async def _deliver_blocked(
        self, item: _Item, blocked: list[Subscription], deadline: float
    ) -> None:
        """Queue ``item`` to ``block`` subscribers as each gets room, until ``deadline``.

        All of them are waited for at once; the ones still full at the deadline
        are disconnected. Cancellation leaves the ones already served in place.
        """
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        for sub in blocked:
            sub._waiters.add(wake)
        pending = blocked
        try:
            while True:
                wake.clear()
                still: list[Subscription] = []
                for sub in pending:
                    if sub.closed:
                        continue
                    if sub._live_full():
                        still.append(sub)
                    else:
                        sub._push_live(item)
                pending = still
                if not pending:
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        await wake.wait()
                except TimeoutError:
                    continue  # one more pass: serve those that got room at the last moment
        finally:
            for sub in blocked:
                sub._waiters.discard(wake)
        bound = self.options.block_timeout_secs
        for sub in pending:
            sub._disconnect_slow(
                f"its queue stayed full while a publish waited its bound of {bound} s "
                "(block policy)"
            )
