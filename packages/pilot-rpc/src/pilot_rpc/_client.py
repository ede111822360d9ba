"""RpcClient: calls to peers over pooled, multiplexed connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from pilot_rpc import _protocol as P
from pilot_rpc._driver import ClientCall, ClientConnection
from pilot_rpc._errors_map import map_transport_error
from pilot_rpc._options import ClientOptions, RetryPolicy
from pilot_rpc._types import (
    IDEMPOTENCY_KEY,
    TRACEPARENT,
    MethodKind,
    ProgressCallback,
    TransportLike,
)
from pilot_rpc.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    RpcError,
    Unavailable,
)

__all__ = ["BidiStream", "RequestStream", "ResponseStream", "RpcClient"]

logger = logging.getLogger("pilot_rpc.client")


class RpcClient:
    """Calls methods on peers reached through a transport.

    Connections are opened lazily, one pool per ``(peer, port)``, and reused;
    calls are multiplexed on a connection up to the server's limit. A peer that
    cannot be reached is redialled with exponential backoff (calls in between
    fail fast with a retry-safe ``Unavailable``). Keepalive pings detect a dead
    peer within ``keepalive_interval + keepalive_timeout`` seconds.

    Args:
        transport: A ``pilot_transport.Transport`` (any :class:`TransportLike`).
        options: Connection, limit and retry settings; the defaults are safe.

    Use as ``async with RpcClient(transport) as client:`` or call :meth:`aclose`.
    """

    def __init__(self, transport: TransportLike, *, options: ClientOptions | None = None) -> None:
        self.transport = transport
        self.options = options or ClientOptions()
        self._pools: dict[tuple[str, int], _PeerPool] = {}
        self._closed = False
        pool_size = self.options.pool_size
        if pool_size is None:
            # The transport knows its carrier best (TransportLike.preferred_pool_size).
            preferred = getattr(transport, "preferred_pool_size", 1)
            pool_size = preferred if isinstance(preferred, int) and 1 <= preferred <= 1024 else 1
        self._pool_size = pool_size

    # -- unary ----------------------------------------------------------------------------------

    async def call(
        self,
        peer: str,
        port: int,
        method: str,
        request: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a deadline that travels to the server)
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        idempotent: bool = False,
        on_progress: ProgressCallback | None = None,
        retry: RetryPolicy | None = None,
    ) -> Any:
        """Call a unary method on ``peer`` at ``port`` and return its reply.

        Args:
            peer: Trust-store name, node id or Pilot address of the server.
            port: The (virtual) port it serves on.
            method: The method name.
            request: Any msgpack-able value.
            timeout: Seconds the whole call (retries included) may take; the
                server gets the remaining budget and stops the handler when it
                runs out. ``None``: ``options.default_timeout``.
            metadata: Headers for the handler (``str -> str``).
            idempotency_key: Stable key of the operation (sent as metadata).
            traceparent: W3C trace context (sent as metadata).
            idempotent: The call may be retried even after it reached the
                server (on the policy's ``idempotent_codes``).
            on_progress: Called with each progress value the handler sends
                (``ctx.send_progress``); may be a coroutine function. Runs in the
                caller's task, before the reply is returned.
            retry: This call's retry policy (``None``: ``options.retry``). A
                caller that fails over between peers itself passes
                ``RetryPolicy.disabled()`` so that retries happen in one layer.

        Returns:
            The handler's reply.

        Raises:
            RpcError: a subclass per status code: the handler's own error,
                ``DeadlineExceeded`` when the timeout passed, ``Unavailable`` when
                the peer cannot be reached or the connection was lost,
                ``Unauthenticated`` when the TLS identity is refused,
                ``InvalidArgument`` when ``request`` is not msgpack-encodable.

        Cancelling the calling task cancels the call on the server too.
        Safe to repeat only if the method is idempotent.
        """
        loop = asyncio.get_running_loop()
        if timeout is None:
            timeout = self.options.default_timeout
        deadline = None if timeout is None else loop.time() + timeout
        md = _metadata(metadata, idempotency_key, traceparent)
        attempt = 1
        while True:
            try:
                return await self._call_once(
                    peer, port, method, request, deadline, md, on_progress, loop
                )
            except RpcError as exc:
                delay = self._retry_delay(exc, attempt, idempotent, deadline, loop, retry)
                if delay is None:
                    raise
                logger.debug("retrying %s on %s:%s after %r", method, peer, port, exc)
            await asyncio.sleep(delay)
            attempt += 1

    async def _call_once(
        self,
        peer: str,
        port: int,
        method: str,
        request: Any,
        deadline: float | None,
        md: dict[str, str] | None,
        on_progress: ProgressCallback | None,
        loop: asyncio.AbstractEventLoop,
    ) -> Any:
        pool = self._pools.get((peer, port))
        if pool is None:
            pool = self._pool(peer, port)
        conn = pool.pick()
        if conn is None:
            conn = await pool.acquire(deadline)
        remaining = None
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded("deadline exceeded before the call was sent")
        call = conn.start_call(method, MethodKind.UNARY, request, remaining, md)
        try:
            if on_progress is None:
                return await call.future
            call.on_progress = on_progress
            return await conn.wait_reply(call)
        except BaseException:
            # Cancelled or timed out caller, or a failing progress callback: the server is told.
            conn.cancel(call)
            raise

    def _retry_delay(
        self,
        exc: RpcError,
        attempt: int,
        idempotent: bool,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
        policy: RetryPolicy | None = None,
    ) -> float | None:
        if policy is None:
            policy = self.options.retry
        if attempt >= policy.max_attempts or self._closed:
            return None
        # Safe: known not to have reached a handler (never sent, refused by a server going
        # away, or refused by the server before running it).
        safe = (isinstance(exc, Unavailable) and exc.retry_safe) or exc.details.get(
            "retry_safe"
        ) is True
        if not safe and not (idempotent and exc.code in policy.idempotent_codes):
            return None
        delay = policy.backoff(attempt)
        if policy.jitter:
            delay *= 1 + random.uniform(-policy.jitter, policy.jitter)
        if deadline is not None and loop.time() + delay >= deadline:
            return None
        return delay

    # -- streaming ------------------------------------------------------------------------------

    @asynccontextmanager
    async def stream(
        self,
        peer: str,
        port: int,
        method: str,
        request: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a deadline that travels to the server)
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> AsyncGenerator[ResponseStream]:
        """Call a server-streaming method; iterate the items it yields.

        ``async with client.stream(peer, port, "count", 10) as items:
        async for item in items: ...``. Items are flow-controlled: while the
        block does not take them, the server's handler waits (at most
        ``initial_window`` bytes are buffered here). Leaving the block before
        the end cancels the call on the server. The timeout covers the whole
        stream.

        Opening the call is retried per ``retry`` (``None``: ``options.retry``)
        only while it is known not to have reached a handler (a retry-safe
        ``Unavailable``); once the call is open nothing is retried. A caller
        that fails over between peers itself passes ``RetryPolicy.disabled()``.

        Raises:
            RpcError: as :meth:`call`, when opening the call or while iterating.
        """
        conn, call = await self._open(
            peer, port, method, MethodKind.SERVER_STREAMING, request, timeout, metadata,
            idempotency_key, traceparent, retry,
        )  # fmt: skip
        try:
            yield ResponseStream(conn, call)
        finally:
            conn.cancel(call)

    @asynccontextmanager
    async def client_streaming(
        self,
        peer: str,
        port: int,
        method: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a deadline that travels to the server)
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> AsyncGenerator[RequestStream]:
        """Call a client-streaming method: ``await s.send(item)`` ..., then ``await s.finish()``.

        Leaving the block without ``finish`` (or cancelling the task in it)
        cancels the call on the server.

        Opening the call is retried per ``retry`` (``None``: ``options.retry``)
        only while it is known not to have reached a handler (a retry-safe
        ``Unavailable``); once the call is open nothing is retried. A caller
        that fails over between peers itself passes ``RetryPolicy.disabled()``.

        Raises:
            RpcError: as :meth:`call`, when opening the call, from ``send`` or
                from ``finish``.
        """
        conn, call = await self._open(
            peer, port, method, MethodKind.CLIENT_STREAMING, P.NO_MESSAGE, timeout, metadata,
            idempotency_key, traceparent, retry,
        )  # fmt: skip
        try:
            yield RequestStream(conn, call)
        finally:
            conn.cancel(call)

    @asynccontextmanager
    async def bidi_streaming(
        self,
        peer: str,
        port: int,
        method: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a deadline that travels to the server)
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> AsyncGenerator[BidiStream]:
        """Call a bidirectional method: ``send``/``done_sending`` and iterate the replies.

        Leaving the block before the server ended the call (or cancelling the
        task in it) cancels the call on the server.

        Opening the call is retried per ``retry`` (``None``: ``options.retry``)
        only while it is known not to have reached a handler (a retry-safe
        ``Unavailable``); once the call is open nothing is retried. A caller
        that fails over between peers itself passes ``RetryPolicy.disabled()``.

        Raises:
            RpcError: as :meth:`call`, when opening the call, from ``send`` or
                while iterating.
        """
        conn, call = await self._open(
            peer, port, method, MethodKind.BIDI_STREAMING, P.NO_MESSAGE, timeout, metadata,
            idempotency_key, traceparent, retry,
        )  # fmt: skip
        try:
            yield BidiStream(conn, call)
        finally:
            conn.cancel(call)

    async def _open(
        self,
        peer: str,
        port: int,
        method: str,
        kind: MethodKind,
        request: Any,
        timeout: float | None,  # noqa: ASYNC109
        metadata: Mapping[str, str] | None,
        idempotency_key: str | None,
        traceparent: str | None,
        retry: RetryPolicy | None,
    ) -> tuple[ClientConnection, ClientCall]:
        loop = asyncio.get_running_loop()
        if timeout is None:
            timeout = self.options.default_timeout
        deadline = None if timeout is None else loop.time() + timeout
        md = _metadata(metadata, idempotency_key, traceparent)
        attempt = 1
        while True:
            try:
                pool = self._pools.get((peer, port)) or self._pool(peer, port)
                conn = pool.pick() or await pool.acquire(deadline)
                remaining = None
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise DeadlineExceeded("deadline exceeded before the call was sent")
                return conn, conn.start_call(method, kind, request, remaining, md)
            except RpcError as exc:
                delay = self._retry_delay(exc, attempt, False, deadline, loop, retry)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    # -- pools ----------------------------------------------------------------------------------

    def _pool(self, peer: str, port: int) -> _PeerPool:
        if self._closed:
            raise Cancelled("the client is closed")
        if not isinstance(peer, str) or not peer:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise InvalidArgument(f"peer must be a non-empty string, got {peer!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise InvalidArgument(f"port must be an int in [0, 65535], got {port!r}")
        pool = _PeerPool(self, peer, port, self._pool_size)
        self._pools[(peer, port)] = pool
        return pool

    def connections(self) -> int:
        """Open connections over all peers (for tests and metrics)."""
        return sum(len(pool.conns) for pool in self._pools.values())

    async def aclose(self) -> None:
        """Close every connection. Calls still pending fail with ``Cancelled``. Idempotent."""
        self._closed = True
        pools = list(self._pools.values())
        self._pools.clear()
        await asyncio.gather(*(pool.aclose() for pool in pools), return_exceptions=True)

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _PeerPool:
    """The connections to one ``(peer, port)``; dials lazily, with backoff after failures."""

    def __init__(self, client: RpcClient, peer: str, port: int, size: int) -> None:
        self.client = client
        self.peer = peer
        self.port = port
        self.size = size
        self.conns: list[ClientConnection] = []
        self.dialing = 0
        """Dials in progress, counted from the moment they are decided (not when they run)."""
        self.failures = 0
        self.retry_at = 0.0
        self.last_error: RpcError | None = None
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def pick(self) -> ClientConnection | None:
        """A connection with room for one more call, or None (no await)."""
        conns = self.conns
        if len(conns) == 1:
            conn = conns[0]
            if not conn.going_away and len(conn.calls) < conn.max_calls:
                if conn.calls and self.size > 1:
                    self._grow()
                return conn
            return None
        best: ClientConnection | None = None
        for conn in conns:
            if conn.going_away:
                continue
            n = len(conn.calls)
            if n == 0:
                return conn
            if n < conn.max_calls and (best is None or n < len(best.calls)):
                best = conn
        if best is not None and len(conns) + self.dialing < self.size:
            self._grow()
        return best

    def _grow(self) -> None:
        """Every connection is busy and the pool has room: dial one more in the background.

        A burst of calls can start several dials at once, never past the pool size.
        """
        if self.closed or self.client._closed:
            return
        if len(self.conns) + self.dialing >= self.size:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self.retry_at:
            return
        self.dialing += 1
        task = loop.create_task(self._dial(None, counted=True))
        self.tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # failures were recorded for backoff; nobody waits on it

    async def acquire(self, deadline: float | None) -> ClientConnection:
        loop = asyncio.get_running_loop()
        while True:
            if self.closed or self.client._closed:
                raise Cancelled("the client is closed")
            conn = self.pick()
            if conn is not None:
                return conn
            usable = sum(1 for c in self.conns if not c.going_away)
            if usable + self.dialing < self.size:
                self.dialing += 1
                await self._dial(deadline, counted=True)
                continue
            waiter = loop.create_future()
            self.waiters.append(waiter)
            await _wait(waiter, deadline, loop, "waiting for a free connection slot")

    async def _dial(self, deadline: float | None, *, counted: bool) -> ClientConnection:
        """Open one connection. ``counted``: the caller already added it to ``dialing``."""
        if not counted:
            self.dialing += 1
        try:
            return await self._dial_counted(deadline)
        finally:
            self.dialing -= 1
            self._wake_all()

    async def _dial_counted(self, deadline: float | None) -> ClientConnection:
        client = self.client
        options = client.options
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self.retry_at:
            # Not "next attempt in ...": whether another attempt follows is the
            # caller's retry policy's decision, not the pool's.
            error = Unavailable(
                f"{self.peer}:{self.port} is unreachable: {self.last_error} (the last dial "
                f"failed; this client dials it again after a {self.retry_at - now:.2f} s backoff)",
                retry_safe=True,
            )
            raise error from self.last_error
        timeout = options.connect_timeout
        if deadline is not None:
            timeout = min(timeout, deadline - now)
            if timeout <= 0:
                raise DeadlineExceeded("deadline exceeded while connecting")
        try:
            async with asyncio.timeout(timeout):
                stream = await client.transport.connect(self.peer, self.port, timeout=timeout)
                core = P.Connection(
                    P.Role.CLIENT,
                    max_frame_size=options.max_frame_size,
                    max_message_size=options.max_message_size,
                    initial_window=options.initial_window,
                )
                conn = ClientConnection(
                    stream,
                    core,
                    keepalive_interval=options.keepalive_interval,
                    keepalive_timeout=options.keepalive_timeout,
                    max_calls=options.max_calls_per_connection,
                    on_idle=self._on_idle,
                    idle_waiters=self.waiters,
                )
                conn.start()
                try:
                    await asyncio.shield(conn.hello)
                except BaseException:
                    await conn.aclose(flush_timeout=0.1)
                    raise
        except asyncio.CancelledError:
            raise
        except RpcError as exc:
            self._failed(exc, loop)
            raise Unavailable(
                f"cannot connect to {self.peer}:{self.port}: {exc}", retry_safe=True
            ) from exc
        except TimeoutError as exc:
            error = Unavailable(
                f"cannot connect to {self.peer}:{self.port}: timed out after {timeout:g} s",
                retry_safe=True,
            )
            self._failed(error, loop)
            if deadline is not None and loop.time() >= deadline:
                raise DeadlineExceeded("deadline exceeded while connecting") from exc
            raise error from exc
        except Exception as exc:
            error = map_transport_error(
                exc, f"cannot connect to {self.peer}:{self.port}", retry_safe=True
            )
            if isinstance(error, Unavailable):
                # Back off from an unreachable peer; a refused identity or an unknown
                # name is reported as itself on every attempt.
                self._failed(error, loop)
            raise error from exc
        self.failures = 0
        self.retry_at = 0.0
        if self.closed:
            await conn.aclose()
            raise Cancelled("the client is closed")
        self.conns.append(conn)
        conn.closed.add_done_callback(lambda _: self._remove(conn))
        return conn

    def _failed(self, error: RpcError, loop: asyncio.AbstractEventLoop) -> None:
        options = self.client.options
        self.failures += 1
        backoff = min(
            options.reconnect_backoff_max,
            options.reconnect_backoff * 2 ** (self.failures - 1),
        )
        self.retry_at = loop.time() + backoff * random.uniform(0.8, 1.0)
        self.last_error = error

    def _remove(self, conn: ClientConnection) -> None:
        with contextlib.suppress(ValueError):
            self.conns.remove(conn)
        self._wake_all()

    def _on_idle(self, conn: ClientConnection) -> None:
        waiters = self.waiters
        if waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if conn.going_away and not conn.calls and not conn.closed.done():
            task = asyncio.get_running_loop().create_task(conn.aclose())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self._wake_all()

    def _wake_all(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def aclose(self) -> None:
        self.closed = True
        for task in list(self.tasks):
            task.cancel()
        conns = list(self.conns)
        for conn in conns:
            conn.fail_all(Cancelled("the client was closed"))
            conn.core.goaway(0, "client closing")
            conn.kick()
        await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self._wake_all()


async def _wait(
    waiter: asyncio.Future[None],
    deadline: float | None,
    loop: asyncio.AbstractEventLoop,
    what: str,
) -> None:
    if deadline is None:
        await waiter
        return
    handle = loop.call_at(deadline, _expire_waiter, waiter, what)
    try:
        await waiter
    finally:
        handle.cancel()


def _expire_waiter(waiter: asyncio.Future[None], what: str) -> None:
    if not waiter.done():
        waiter.set_exception(DeadlineExceeded(f"deadline exceeded {what}"))


def _metadata(
    metadata: Mapping[str, str] | None, idempotency_key: str | None, traceparent: str | None
) -> dict[str, str] | None:
    if not metadata and idempotency_key is None and traceparent is None:
        return None
    md: dict[str, str] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise InvalidArgument(f"metadata must map str to str, got {key!r}: {value!r}")
            md[key] = value
    if idempotency_key is not None:
        md[IDEMPOTENCY_KEY] = str(idempotency_key)
    if traceparent is not None:
        md[TRACEPARENT] = str(traceparent)
    return md


class ResponseStream:
    """The items of a streaming call: ``async for item in stream``."""

    __slots__ = ("_call", "_conn")

    def __init__(self, conn: ClientConnection, call: ClientCall) -> None:
        self._conn = conn
        self._call = call

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        call = self._call
        items = call.items
        if items:  # the common case inline: an item is already here
            message, flow = items.popleft()
            call.unacked += flow
            if call.unacked >= self._conn.core.credit_threshold:
                self._conn.credit(call)
            return message
        return await self._conn.next_item(call)

    async def cancel(self) -> None:
        """Stop the call on the server; iteration ends with ``Cancelled``."""
        self._conn.cancel(self._call)

    @property
    def done(self) -> bool:
        """True once the server ended the call (or it failed / was cancelled)."""
        return self._call.done


class RequestStream:
    """The sending side of a client-streaming call."""

    __slots__ = ("_call", "_conn")

    def __init__(self, conn: ClientConnection, call: ClientCall) -> None:
        self._conn = conn
        self._call = call

    async def send(self, item: Any) -> None:
        """Send one item; waits while the server has not granted credit.

        Raises:
            InvalidArgument: ``item`` is not msgpack-encodable (nothing sent).
            RpcError: the call already ended (the server's status).
        """
        await self._conn.send_request_item(self._call, item)

    async def finish(self) -> Any:
        """End the request stream and return the server's reply.

        Once the reply came, calling it again returns the same reply.

        Raises:
            RpcError: the call failed (the server's status, as :meth:`RpcClient.call`).
        """
        self._conn.end_requests(self._call)
        return await self._call.future


class BidiStream(ResponseStream):
    """Both sides of a bidirectional call: ``send``, ``done_sending``, ``async for``."""

    __slots__ = ()

    async def send(self, item: Any) -> None:
        """Send one item; waits while the server has not granted credit.

        Raises:
            InvalidArgument: ``item`` is not msgpack-encodable (nothing sent).
            RpcError: the call already ended (the server's status).
        """
        await self._conn.send_request_item(self._call, item)

    async def done_sending(self) -> None:
        """End the request stream (the server's iterator stops); replies keep coming.

        Raises:
            FailedPrecondition: the request stream was already ended.
        """
        self._conn.end_requests(self._call)
