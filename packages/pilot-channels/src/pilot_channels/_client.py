"""Clients: PilotChannel (subscribe), PilotPublisher (publish), publish_once.

Both talk to a broker through a small backend interface: the RPC backend calls
the ``channels`` plugin of a worker; the daemon backend (``_daemon``) talks to
a Pilot daemon's built-in event stream. The reconnect, buffering and
de-duplication logic here is the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import warnings
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, Protocol, Self

from pilot_rpc import PilotClient, RetryPolicy, RpcClient, TransportLike, default_client
from prometheus_client import CollectorRegistry

from ._errmap import from_lower, is_retryable
from ._event import Event
from ._metrics import client_metrics
from ._options import PublisherOptions, SubscribeOptions
from ._tasks import cancel_and_wait
from ._topics import compile_pattern, validate_topic
from ._wire import METHOD_PUBLISH, METHOD_STATS, METHOD_SUBSCRIBE, WIRE_VERSION, decode_events
from .errors import (
    BrokerProtocolError,
    BrokerUnavailableError,
    ChannelClosedError,
    ChannelConfigError,
    ChannelError,
    ChannelTimeoutError,
)

__all__ = ["DEFAULT_PORT", "PilotChannel", "PilotPublisher", "publish_once"]

logger = logging.getLogger("pilot_channels.client")

DEFAULT_PORT = 5000
"""The worker port a broker is reached on unless told otherwise (the worker's default)."""

_NO_RETRY = RetryPolicy.disabled()


class Backend(Protocol):
    """How a client reaches a broker (worker plugin or Pilot daemon)."""

    description: str

    def subscribe(self, request: dict[str, Any]) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """Open a subscription stream; items in the ``_wire`` shape."""
        ...

    async def publish(
        self,
        events: list[list[Any]],
        timeout: float,  # noqa: ASYNC109
    ) -> list[int | None]:
        """Publish ``[[topic, payload], ...]``; return offsets."""
        ...

    async def call(
        self,
        method: str,
        request: Any,
        timeout: float,  # noqa: ASYNC109
    ) -> Any:
        """Any other unary call (``channels.stats``)."""
        ...

    async def aclose(self) -> None: ...


class RpcBackend:
    """Reaches the ``channels`` plugin of a worker through a :class:`pilot_rpc.PilotClient`.

    ``target`` is a ``PilotClient`` (shared, not closed here), an ``RpcClient``
    (shared, not closed here), a transport (wrapped in a ``PilotClient`` owned
    and closed here; the transport itself stays open) or ``None`` (the shared
    default client, ``pilot_rpc.default_client()``, resolved on first use).

    Unary calls are sent with ``RetryPolicy.disabled()``: the publisher's
    ``PublisherOptions.retry`` is the one retry layer of a publish.
    """

    def __init__(
        self, target: PilotClient | RpcClient | TransportLike | None, peer: str, port: int
    ) -> None:
        self._rpc: RpcClient | None = None
        self._client: PilotClient | None = None
        self._owns = False
        if isinstance(target, RpcClient):
            self._rpc = target
        elif isinstance(target, PilotClient):
            self._client = target
        elif target is not None:
            self._client, self._owns = PilotClient(transport=target), True
        self._peer = peer
        self._port = port
        self.description = f"{peer}:{port}"

    async def _get(self) -> RpcClient:
        if self._rpc is not None:
            return self._rpc
        if self._client is None:
            self._client = default_client()
        return await self._client.rpc()

    @asynccontextmanager
    async def subscribe(self, request: dict[str, Any]) -> AsyncGenerator[AsyncIterator[Any]]:
        rpc = await self._get()
        async with rpc.stream(self._peer, self._port, METHOD_SUBSCRIBE, request) as items:
            yield items

    async def publish(
        self,
        events: list[list[Any]],
        timeout: float,  # noqa: ASYNC109
    ) -> list[int | None]:
        reply = await self.call(METHOD_PUBLISH, {"v": WIRE_VERSION, "ev": events}, timeout)
        offsets = reply.get("offsets") if isinstance(reply, dict) else None
        if not isinstance(offsets, list) or len(offsets) != len(events):  # pyright: ignore[reportUnknownArgumentType]
            raise BrokerProtocolError("malformed publish reply from the broker")
        return [int(o) if o is not None else None for o in offsets]  # pyright: ignore[reportUnknownVariableType]

    async def call(
        self,
        method: str,
        request: Any,
        timeout: float,  # noqa: ASYNC109
    ) -> Any:
        rpc = await self._get()
        return await rpc.call(
            self._peer, self._port, method, request, timeout=timeout, retry=_NO_RETRY
        )

    async def aclose(self) -> None:
        if self._owns and self._client is not None:
            await self._client.aclose()


def _split(first: Any, pattern: str | None) -> tuple[Any, str]:
    """``(target, pattern)`` from ``PilotChannel(target, pattern)`` or ``PilotChannel(pattern)``."""
    if pattern is None:
        if not isinstance(first, str):
            raise ChannelConfigError("PilotChannel needs a topic pattern")
        return None, first
    return first, pattern


def _target(first: Any, client: PilotClient | None) -> Any:
    if client is not None:
        if first is not None:
            raise ChannelConfigError(
                "pass either a transport/client positionally or client=, not both"
            )
        if not isinstance(client, PilotClient):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ChannelConfigError(f"client must be a pilot_rpc.PilotClient, got {client!r}")
        return client
    return first


async def _wait(event: asyncio.Event, deadline: float | None) -> bool:
    """Wait for ``event`` until ``deadline`` (loop time); False on timeout."""
    if deadline is None:
        await event.wait()
        return True
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        return False
    try:
        async with asyncio.timeout(remaining):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


class PilotChannel:
    """A subscription to topics matching ``pattern`` on a broker.

    Events come as :class:`Event` objects through ``async for``, :meth:`recv` or
    :meth:`events`. The channel reconnects by itself with backoff when the link
    or the broker fails (``SubscribeOptions.reconnect``), logs each attempt on
    the ``pilot_channels.client`` logger and counts it in the
    ``pilot_channels_client_reconnects_total`` metric. On durable topics it
    resumes after the last offset it delivered and drops any event delivered
    twice, so the application sees each durable event once and in order.
    Non-durable topics are at-most-once: events published while disconnected, or
    dropped by the broker's slow-consumer policy (see :attr:`dropped`), are gone.

    Example::

        async with PilotChannel("agents.>", peer="broker") as channel:  # the default client
            async for event in channel:
                print(event.topic, event.payload)

    Args:
        transport: optional, first positional: a ``pilot_rpc.PilotClient`` or an
            ``RpcClient`` to share, or a transport (wrapped in a client owned by
            the channel). Omitted: ``client=``, else the shared default client.
        pattern: topic pattern (``*`` one segment, ``>`` the rest; see the README).
        client: the ``pilot_rpc.PilotClient`` to subscribe through.
        peer: the broker worker (trust-store name, node id or Pilot address).
        port: the broker worker's port.
        options: queue size, slow-consumer policy, start/resume, reconnect.
        registry: prometheus registry for client metrics (default: the global one).

    Raises:
        InvalidPatternError: ``pattern`` is malformed (raised here, at once).
    """

    def __init__(
        self,
        transport: PilotClient | RpcClient | TransportLike | str | None = None,
        pattern: str | None = None,
        *,
        peer: str,
        port: int = DEFAULT_PORT,
        options: SubscribeOptions | None = None,
        registry: CollectorRegistry | None = None,
        client: PilotClient | None = None,
    ) -> None:
        first, topic_pattern = _split(transport, pattern)
        backend = RpcBackend(_target(first, client), peer, port)
        self._init(backend, topic_pattern, options, registry)

    @classmethod
    def with_backend(
        cls,
        backend: Backend,
        pattern: str,
        *,
        options: SubscribeOptions | None = None,
        registry: CollectorRegistry | None = None,
    ) -> PilotChannel:
        """A channel over another backend (the Pilot daemon adapter uses this)."""
        self = cls.__new__(cls)
        self._init(backend, pattern, options, registry)
        return self

    @classmethod
    def from_daemon(
        cls,
        pattern: str,
        *,
        socket_path: str | None = None,
        address: str | None = None,
        options: SubscribeOptions | None = None,
        registry: CollectorRegistry | None = None,
    ) -> PilotChannel:
        """Subscribe on a Pilot daemon's built-in event stream (port 1002).

        Args:
            pattern: as for the constructor; wildcards are filtered client-side.
            socket_path: the local daemon's socket (default ``/tmp/pilot.sock``).
            address: Pilot address of the daemon to use (default: the local one).
            options: as for the constructor (``policy`` is always drop-oldest here).
            registry: prometheus registry for client metrics.

        Every topic is at-most-once over a daemon and events carry no publisher
        (see the README's "Pilot daemon interop").
        """
        from ._daemon import DaemonBackend

        opts = options if options is not None else SubscribeOptions()
        backend = DaemonBackend(
            socket_path=socket_path, address=address, queue_size=opts.queue_size or 4096
        )
        return cls.with_backend(backend, pattern, options=opts, registry=registry)

    def _init(
        self,
        backend: Backend,
        pattern: str,
        options: SubscribeOptions | None,
        registry: CollectorRegistry | None,
    ) -> None:
        self.pattern = compile_pattern(pattern).text
        self.options = options if options is not None else SubscribeOptions()
        self._backend = backend
        self._metrics = client_metrics(registry)
        self._batches: deque[list[Event]] = deque()
        self._pending: deque[Event] = deque()
        self._data = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._cursor: int | None = self.options.resume_after
        self._failure: ChannelError | None = None
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._conn_dropped = 0
        self.connected = False
        """Whether a subscription stream is established right now."""
        self.reconnects = 0
        """Reconnect attempts made so far."""
        self.dropped = 0
        """Events the broker dropped for this subscriber (``drop_oldest`` policy)."""
        self.duplicates = 0
        """Durable events received again after a reconnect and not delivered twice."""

    @property
    def last_offset(self) -> int | None:
        """Offset of the last durable event delivered (or the log head when subscribed).

        Persist it and pass it as ``SubscribeOptions(resume_after=...)`` to resume
        in a new process with no loss and no duplicate.
        """
        return self._cursor

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closed

    async def open(self) -> Self:
        """Subscribe and wait until the broker has registered the subscription.

        Events published after this returns reach the channel. Safe to repeat.

        Raises:
            ChannelPermissionError: the topic ACL refuses this node.
            InvalidPatternError, ChannelConfigError: the broker refused the request.
            BrokerUnavailableError: the broker cannot be reached (the first
                attempt is not retried; later failures are).
            ChannelTimeoutError: no answer within ``connect_timeout_secs``.
            ChannelClosedError: the channel was closed.
        """
        if self._closed:
            raise ChannelClosedError("the channel is closed")
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._ready = loop.create_future()
            self._task = loop.create_task(self._run(), name=f"pilot-channel {self.pattern}")
        assert self._ready is not None
        try:
            await asyncio.shield(self._ready)
        except ChannelError:
            await self.aclose()
            raise
        return self

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _request(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "pattern": self.pattern,
            "queue": self.options.queue_size,
            "policy": self.options.policy.value if self.options.policy is not None else None,
            "after": self._cursor,
            "start": self.options.start,
        }

    async def _run(self) -> None:
        assert self._ready is not None
        ready = self._ready
        policy = self.options.reconnect
        attempt = 0
        while True:
            error: ChannelError
            try:
                async with self._backend.subscribe(self._request()) as items:
                    iterator = aiter(items)
                    try:
                        async with asyncio.timeout(self.options.connect_timeout_secs):
                            first = await anext(iterator)
                    except TimeoutError as exc:
                        raise ChannelTimeoutError(
                            f"no answer from {self._backend.description} within "
                            f"{self.options.connect_timeout_secs} s"
                        ) from exc
                    info = first.get("ready") if isinstance(first, dict) else None
                    if not isinstance(info, dict):
                        raise BrokerProtocolError("the broker did not confirm the subscription")
                    if self._cursor is None:
                        cursor = info.get("cursor")  # pyright: ignore[reportUnknownMemberType]
                        self._cursor = int(cursor) if isinstance(cursor, int) else None
                    self._conn_dropped = 0
                    self.connected = True
                    self._metrics.connected.labels("subscriber").inc()
                    if not ready.done():
                        ready.set_result(None)
                    elif attempt:
                        logger.info(
                            "channel %r: resubscribed to %s",
                            self.pattern,
                            self._backend.description,
                        )
                    attempt = 0
                    async for item in iterator:
                        await self._deliver_item(item)
                    error = BrokerUnavailableError(
                        f"{self._backend.description} ended the subscription stream"
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = from_lower(exc, what=f"subscription to {self._backend.description}")
                if error is not exc:
                    error.__cause__ = exc
            finally:
                if self.connected:
                    self.connected = False
                    self._metrics.connected.labels("subscriber").dec()
            if not ready.done():
                ready.set_exception(error)
                return
            attempt += 1
            if (
                not policy.enabled
                or not is_retryable(error)
                or (policy.max_attempts is not None and attempt > policy.max_attempts)
            ):
                logger.error("channel %r: giving up: %s", self.pattern, error)
                self._failure = error
                self._data.set()
                return
            delay = policy.backoff(attempt, random.random())
            self.reconnects += 1
            self._metrics.reconnects.labels("subscriber").inc()
            logger.warning(
                "channel %r: subscription to %s lost (%s); reconnecting in %.2f s (attempt %d)",
                self.pattern,
                self._backend.description,
                error,
                delay,
                attempt,
            )
            await asyncio.sleep(delay)

    async def _deliver_item(self, item: Any) -> None:
        if not isinstance(item, dict):
            raise BrokerProtocolError("malformed item on the subscription stream")
        events = decode_events(item.get("ev", []))  # pyright: ignore[reportUnknownMemberType]
        dropped = item.get("dropped", 0)  # pyright: ignore[reportUnknownMemberType]
        if isinstance(dropped, int) and dropped > self._conn_dropped:
            self._metrics.broker_drops.inc(dropped - self._conn_dropped)
            self.dropped += dropped - self._conn_dropped
            self._conn_dropped = dropped
        if not events:
            return
        while len(self._batches) >= self.options.buffer_batches:
            self._room.clear()
            await self._room.wait()
        self._batches.append(events)
        self._data.set()

    def _next_ready(self) -> Event | None:
        while True:
            while self._pending:
                event = self._pending.popleft()
                if event.offset is not None:
                    if self._cursor is not None and event.offset <= self._cursor:
                        self.duplicates += 1
                        self._metrics.duplicates.inc()
                        continue
                    self._cursor = event.offset
                self._metrics.received.inc()
                return event
            if not self._batches:
                return None
            self._pending.extend(self._batches.popleft())
            self._room.set()

    async def recv(self, timeout: float | None = None) -> Event:  # noqa: ASYNC109 (documented API)
        """Return the next event, waiting up to ``timeout`` seconds (None: forever).

        Opens the channel first if needed. Cancellation loses no event.

        Raises:
            ChannelTimeoutError: no event within ``timeout``.
            ChannelClosedError: the channel was closed.
            ChannelError: the subscription failed for good (reconnect off, gave up,
                or a permission/usage error); the same error on every later call.
        """
        if self._task is None:
            await self.open()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            event = self._next_ready()
            if event is not None:
                return event
            if self._closed:
                raise ChannelClosedError("the channel is closed")
            if self._failure is not None:
                raise self._failure
            self._data.clear()
            if not await _wait(self._data, deadline):
                raise ChannelTimeoutError(f"no event on {self.pattern!r} within {timeout} s")

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.recv()
        except ChannelClosedError:
            raise StopAsyncIteration from None

    async def events(
        self,
        max_events: int | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[Event]:
        """Yield events until ``max_events`` were yielded or the channel closes.

        ``timeout`` bounds the wait for each event. Cancellation loses no event.

        Raises:
            ChannelTimeoutError: no event within ``timeout``.
            ChannelError: the subscription failed for good, as :meth:`recv`.
        """
        count = 0
        while max_events is None or count < max_events:
            try:
                event = await self.recv(timeout)
            except ChannelClosedError:
                return
            count += 1
            yield event

    async def aclose(self) -> None:
        """Unsubscribe and stop reconnecting; events still buffered are dropped.

        Safe to repeat. Cancelling it re-raises CancelledError; the channel is
        closed to callers from the first line on.
        """
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ChannelClosedError("the channel was closed"))
            with contextlib.suppress(ChannelClosedError):
                await self._ready
        self._data.set()
        self._room.set()
        self._batches.clear()
        self._pending.clear()
        await self._backend.aclose()

    async def close(self) -> None:
        """Deprecated alias of :meth:`aclose` (removed in the next release)."""
        warnings.warn(
            "PilotChannel.close() is deprecated; use aclose()", DeprecationWarning, stacklevel=2
        )
        await self.aclose()


_Pending = tuple[str, Any, asyncio.Future[int | None]]


class PilotPublisher:
    """Publishes events to a broker.

    Concurrent :meth:`publish` calls are grouped into one request; each call
    returns when the broker has routed its event (and, on a durable topic,
    logged it). Example::

        async with PilotPublisher(peer="broker") as publisher:  # the default client
            offset = await publisher.publish("agents.results", {"answer": 42})

    A publish request is sent at most ``options.retry.max_attempts`` times
    (default 3; the RPC layer underneath does not retry it again).

    Args:
        transport: optional: a ``pilot_rpc.PilotClient`` or ``RpcClient`` to
            share, or a transport (wrapped in a client owned by the publisher).
            Omitted: ``client=``, else the shared default client.
        client: the ``pilot_rpc.PilotClient`` to publish through.
        peer: the broker worker.
        port: the broker worker's port.
        options: timeouts, batching, retry.
        registry: prometheus registry for client metrics (default: the global one).
    """

    def __init__(
        self,
        transport: PilotClient | RpcClient | TransportLike | None = None,
        *,
        peer: str,
        port: int = DEFAULT_PORT,
        options: PublisherOptions | None = None,
        registry: CollectorRegistry | None = None,
        client: PilotClient | None = None,
    ) -> None:
        self._init(RpcBackend(_target(transport, client), peer, port), options, registry)

    @classmethod
    def with_backend(
        cls,
        backend: Backend,
        *,
        options: PublisherOptions | None = None,
        registry: CollectorRegistry | None = None,
    ) -> PilotPublisher:
        """A publisher over another backend (the Pilot daemon adapter uses this)."""
        self = cls.__new__(cls)
        self._init(backend, options, registry)
        return self

    @classmethod
    def from_daemon(
        cls,
        *,
        socket_path: str | None = None,
        address: str | None = None,
        options: PublisherOptions | None = None,
        registry: CollectorRegistry | None = None,
    ) -> PilotPublisher:
        """Publish on a Pilot daemon's built-in event stream (port 1002).

        Payloads must be ``bytes`` or ``str`` (sent UTF-8); ``publish`` returns
        None once the bytes are handed to the daemon (it sends no acknowledgement).
        """
        from ._daemon import DaemonBackend

        backend = DaemonBackend(socket_path=socket_path, address=address)
        return cls.with_backend(backend, options=options, registry=registry)

    def _init(
        self,
        backend: Backend,
        options: PublisherOptions | None,
        registry: CollectorRegistry | None,
    ) -> None:
        self.options = options if options is not None else PublisherOptions()
        self._backend = backend
        self._metrics = client_metrics(registry)
        self._queue: deque[_Pending] = deque()
        self._room = asyncio.Event()
        self._room.set()
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.retries = 0
        """Publish requests retried after a network failure."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def publish(self, topic: str, payload: Any) -> int | None:
        """Publish one event; return its durable-log offset, or None on a non-durable topic.

        Not idempotent: a retried request (after a network failure) may
        deliver the event twice. Cancellation before the request is sent
        withdraws the event; after, it may still be published.

        Raises:
            InvalidTopicError: ``topic`` is malformed.
            PayloadTooLargeError: the broker's payload limit.
            ChannelPermissionError: the topic ACL refuses this node.
            ChannelTimeoutError: no answer within ``timeout_secs``.
            BrokerUnavailableError: the broker could not be reached (after retries).
            ChannelClosedError: the publisher was closed.
        """
        validate_topic(topic)
        if self._closed:
            raise ChannelClosedError("the publisher is closed")
        while len(self._queue) >= self.options.max_pending:
            self._room.clear()
            await self._room.wait()
            if self._closed:
                raise ChannelClosedError("the publisher is closed")
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._queue.append((topic, payload, future))
        self._work.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._sender(), name="pilot-channels publisher"
            )
        return await future

    async def publish_many(self, events: Sequence[tuple[str, Any]]) -> list[int | None]:
        """Publish several events in order; see :meth:`publish`.

        Returns:
            The offsets, in the order of ``events`` (None on non-durable topics).

        Raises:
            ChannelError: the first failure, as :meth:`publish`; the other
                events are published independently and may have gone out.
        """
        return list(await asyncio.gather(*(self.publish(t, p) for t, p in events)))

    async def stats(self, timeout: float = 10.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Broker totals, and queue depth, drops and deliveries of this node's subscriptions.

        Raises:
            ChannelError: as :meth:`publish`.
        """
        try:
            reply = await self._backend.call(METHOD_STATS, None, timeout)
        except ChannelError:
            raise
        except Exception as exc:
            raise from_lower(exc, what="stats") from exc
        if not isinstance(reply, dict):
            raise BrokerProtocolError("malformed stats reply")
        return reply  # pyright: ignore[reportUnknownVariableType]

    async def _sender(self) -> None:
        while True:
            if not self._queue:
                self._work.clear()
                await self._work.wait()
                continue
            batch: list[_Pending] = []
            while self._queue and len(batch) < self.options.max_batch:
                item = self._queue.popleft()
                if not item[2].done():
                    batch.append(item)
            self._room.set()
            if batch:
                await self._send(batch)

    async def _send(self, batch: list[_Pending]) -> None:
        events = [[topic, payload] for topic, payload, _ in batch]
        retry = self.options.retry
        attempt = 0
        while True:
            try:
                offsets = await self._backend.publish(events, self.options.timeout_secs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = from_lower(exc, what=f"publish to {self._backend.description}")
                if error is not exc:
                    error.__cause__ = exc
                attempt += 1
                if (
                    retry is not None
                    and isinstance(error, BrokerUnavailableError)
                    and (retry.max_attempts is None or attempt < retry.max_attempts)
                ):
                    self.retries += 1
                    self._metrics.reconnects.labels("publisher").inc()
                    delay = retry.backoff(attempt, random.random())
                    logger.warning("publish failed (%s); retrying in %.2f s", error, delay)
                    await asyncio.sleep(delay)
                    continue
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                return
            self._metrics.published.inc(len(batch))
            for (_, _, future), offset in zip(batch, offsets, strict=True):
                if not future.done():
                    future.set_result(offset)
            return

    async def aclose(self) -> None:
        """Stop; publishes not yet sent fail with ChannelClosedError. Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        while self._queue:
            _, _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(ChannelClosedError("the publisher was closed"))
        self._room.set()
        await self._backend.aclose()

    async def close(self) -> None:
        """Deprecated alias of :meth:`aclose` (removed in the next release)."""
        warnings.warn(
            "PilotPublisher.close() is deprecated; use aclose()", DeprecationWarning, stacklevel=2
        )
        await self.aclose()


async def publish_once(
    transport: PilotClient | RpcClient | TransportLike | None,
    topic: str,
    payload: Any,
    *,
    peer: str,
    port: int = DEFAULT_PORT,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> int | None:
    """Publish one event and return its offset (None on a non-durable topic).

    Opens and closes its own connection when given a transport; share an
    ``RpcClient`` (or use :class:`PilotPublisher`) to publish often.

    Raises:
        The errors of :meth:`PilotPublisher.publish`.
    """
    publisher = PilotPublisher(
        transport, peer=peer, port=port, options=PublisherOptions(timeout_secs=timeout, retry=None)
    )
    async with publisher:
        return await publisher.publish(topic, payload)
