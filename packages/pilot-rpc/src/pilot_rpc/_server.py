"""RpcServer: a method table served on transport listeners."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from pilot_transport.aio import aclose_quietly, cancel_and_wait
from pilot_transport.errors import ListenerClosedError

from pilot_rpc import _protocol as P
from pilot_rpc._driver import DRAIN_REASON, Authorize, ServerConnection
from pilot_rpc._options import ServerOptions
from pilot_rpc._types import AnyHandler, ListenerLike, MethodKind, StreamLike

__all__ = ["RpcServer"]

logger = logging.getLogger("pilot_rpc.server")

F = TypeVar("F", bound=AnyHandler)

_FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BACKOFF_MIN = 0.01
_ACCEPT_BACKOFF_MAX = 1.0
_LOG_EVERY = 10.0
"""Seconds between two log lines about the same kind of refused or failed accept."""


class _RateLimitedLog:
    """One log line per ``_LOG_EVERY`` seconds per key, counting what it did not print."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def __call__(self, key: str, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < _LOG_EVERY:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        skipped = self._skipped.pop(key, 0)
        self._last[key] = now
        if skipped:
            message += " (%d more like this in the last %.0f s)"
            args = (*args, skipped, now - last if last is not None else 0.0)
        logger.log(level, message, *args)


def _peer_key(peer: Any) -> str:
    """The authenticated peer's identity, for per-peer limits."""
    for name in ("node_id", "name"):
        value = getattr(peer, name, None)
        if value:
            return str(value)
    return repr(peer)


class RpcServer:
    """Serves named methods to the authenticated peers of one or more listeners.

    Each call runs in its own task. A connection runs at most
    ``options.max_concurrent_calls_per_connection`` calls at once (the client
    is told and queues beyond it). Handlers receive ``(request, ctx)`` where
    ``ctx`` is a :class:`~pilot_rpc.CallContext`; a handler raising an
    :class:`~pilot_rpc.RpcError` subclass sends that code, message and details,
    any other exception reaches the caller as ``Internal`` with its type and
    message (and the traceback only when ``include_tracebacks`` is set).

    Before anything of a call is buffered (on the first piece of its CALL
    frame), the server checks that the method exists with that shape and asks
    ``authorize``; a refused call's further pieces are dropped unread.

    Args:
        options: Limits and behaviour; the defaults are safe.
        authorize: ``authorize(method: str, peer: PeerInfo) -> None``, called on
            the event loop for every call before its request is buffered or its
            handler started. Return to allow; raise an :class:`~pilot_rpc.RpcError`
            (typically :class:`~pilot_rpc.PermissionDenied`, with an
            :class:`~pilot_rpc.ErrorInfo`) to refuse: the caller gets exactly that
            error. It must not block; any other exception refuses the call with
            ``Internal`` (fail closed) and is logged. ``None``: every
            authenticated peer may call every method.
    """

    def __init__(
        self, *, options: ServerOptions | None = None, authorize: Authorize | None = None
    ) -> None:
        self.options = options or ServerOptions()
        self.authorize = authorize
        self._budget = P.UnfinishedBudget(self.options.max_unfinished_bytes)
        self._per_peer: dict[str, int] = {}
        self._log = _RateLimitedLog()
        self._methods: dict[str, tuple[MethodKind, AnyHandler]] = {}
        self._connections: set[ServerConnection] = set()
        self._connection_tasks: set[asyncio.Task[None]] = set()
        self._accept_tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._inflight = 0

    # -- the method table -----------------------------------------------------------------------

    def unary(self, name: str) -> Callable[[F], F]:
        """Decorator: register ``async def handler(request, ctx) -> reply`` as ``name``."""
        return self._decorator(name, MethodKind.UNARY)

    def server_streaming(self, name: str) -> Callable[[F], F]:
        """Decorator: register ``async def handler(request, ctx)`` that yields items."""
        return self._decorator(name, MethodKind.SERVER_STREAMING)

    def client_streaming(self, name: str) -> Callable[[F], F]:
        """Decorator: register ``async def handler(requests, ctx) -> reply``.

        ``requests`` is an async iterator of the caller's items.
        """
        return self._decorator(name, MethodKind.CLIENT_STREAMING)

    def bidi_streaming(self, name: str) -> Callable[[F], F]:
        """Decorator: register ``async def handler(requests, ctx)`` that yields items."""
        return self._decorator(name, MethodKind.BIDI_STREAMING)

    def _decorator(self, name: str, kind: MethodKind) -> Callable[[F], F]:
        def register(fn: F) -> F:
            self.add_method(name, fn, kind=kind)
            return fn

        return register

    def add_method(self, name: str, handler: AnyHandler, *, kind: MethodKind) -> None:
        """Register ``handler`` under ``name``.

        Raises:
            ValueError: the name is taken or invalid.
            TypeError: ``handler`` is not callable, or a streaming kind got a
                plain coroutine function (it must be an async generator, or
                return an (async) iterable).
        """
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered (use replace_method)")
        self.replace_method(name, handler, kind=kind)

    def replace_method(self, name: str, handler: AnyHandler, *, kind: MethodKind) -> None:
        """Register or replace ``name``. Calls already running keep the old handler."""
        if not isinstance(name, str) or not 0 < len(name) <= 1024:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"method name must be a non-empty string of <= 1024 chars: {name!r}")
        if not callable(handler):
            raise TypeError(f"handler for {name!r} is not callable: {handler!r}")
        kind = MethodKind(kind)
        if kind in (MethodKind.SERVER_STREAMING, MethodKind.BIDI_STREAMING) and (
            inspect.iscoroutinefunction(handler)
        ):
            raise TypeError(
                f"handler for streaming method {name!r} must be an async generator "
                "(use yield), not a coroutine function"
            )
        self._methods[name] = (kind, handler)

    def remove_method(self, name: str) -> None:
        """Unregister ``name``. Calls already running finish. Raises KeyError if unknown."""
        del self._methods[name]

    @property
    def methods(self) -> dict[str, MethodKind]:
        """The registered method names and their kinds (a copy)."""
        return {name: kind for name, (kind, _) in self._methods.items()}

    # -- serving --------------------------------------------------------------------------------

    async def serve(self, listener: ListenerLike) -> None:
        """Accept and serve connections from ``listener`` until cancelled or the listener closes.

        Several listeners may be served at once. Cancelling ``serve`` stops
        accepting and closes this server's connections at once (in-flight calls
        are cancelled); use :meth:`drain` first for a graceful stop. The
        listener itself is left to its owner.
        """
        backoff = _ACCEPT_BACKOFF_MIN
        try:
            while not self._draining:
                try:
                    stream = await listener.accept()
                except asyncio.CancelledError:
                    raise
                except ListenerClosedError:
                    return  # the listener's owner closed it: serving it is over
                except OSError as exc:
                    if exc.errno not in _FD_EXHAUSTED or self._draining:
                        if not self._draining:
                            logger.exception("accepting a connection failed; no longer serving")
                        return
                    # Out of file descriptors (or kernel memory): back off and try again,
                    # with one log line now and then instead of one per attempt.
                    self._log(
                        "fd",
                        logging.WARNING,
                        "accepting a connection failed (%s); retrying in %.2f s",
                        errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _ACCEPT_BACKOFF_MAX)
                    continue
                except Exception:
                    if not self._draining:
                        logger.exception("accepting a connection failed; no longer serving")
                    return
                backoff = _ACCEPT_BACKOFF_MIN
                if self._draining:
                    await _close_quietly(stream)
                    return
                if len(self._connections) >= self.options.max_connections:
                    self._log(
                        "max_connections",
                        logging.WARNING,
                        "refusing a connection: max_connections=%d reached",
                        self.options.max_connections,
                    )
                    await _close_quietly(stream)
                    continue
                key = _peer_key(stream.peer)
                if self._per_peer.get(key, 0) >= self.options.max_connections_per_peer:
                    self._log(
                        f"per_peer:{key}",
                        logging.WARNING,
                        "refusing a connection from %s: max_connections_per_peer=%d reached",
                        key,
                        self.options.max_connections_per_peer,
                    )
                    await _close_quietly(stream)
                    continue
                self._start_connection(stream)
        finally:
            if not self._draining:
                await self._close_connections()

    def _start_connection(self, stream: StreamLike) -> ServerConnection:
        options = self.options
        core = P.Connection(
            P.Role.SERVER,
            max_frame_size=options.max_frame_size,
            max_message_size=options.max_message_size,
            max_concurrent_calls=options.max_concurrent_calls_per_connection,
            initial_window=options.initial_window,
            max_unfinished_bytes=(
                options.max_unfinished_bytes_per_connection or options.max_message_size
            ),
            shared_budget=self._budget,
        )
        conn = ServerConnection(
            stream,
            core,
            options=options,
            methods=self._methods,
            on_call_done=self._call_done,
            idle_waiters=self._idle_waiters,
            authorize=self._authorize_call,
        )
        self._connections.add(conn)
        key = _peer_key(stream.peer)
        self._per_peer[key] = self._per_peer.get(key, 0) + 1
        task = asyncio.get_running_loop().create_task(self._run_connection(conn))
        self._connection_tasks.add(task)
        task.add_done_callback(self._connection_tasks.discard)
        return conn

    async def _run_connection(self, conn: ServerConnection) -> None:
        conn.start()
        try:
            try:
                await asyncio.wait_for(asyncio.shield(conn.hello), self.options.hello_timeout)
            except TimeoutError:
                logger.info("closing a connection that sent no HELLO in time")
                await conn.aclose(flush_timeout=0.1)
                return
            except Exception as exc:
                logger.debug("connection ended before its HELLO: %s", exc)
            await conn.closed
        finally:
            await conn.aclose()
            # Handlers still running when the connection ended were cancelled by the driver;
            # wait for them to unwind so nothing outlives the connection.
            await conn.wait_calls(1.0)
            self._forget(conn)

    def _forget(self, conn: ServerConnection) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            key = _peer_key(conn.peer)
            left = self._per_peer.get(key, 0) - 1
            if left > 0:
                self._per_peer[key] = left
            else:
                self._per_peer.pop(key, None)

    def _authorize_call(self, method: str, peer: Any) -> None:
        authorize = self.authorize  # read per call: it may be replaced while serving
        if authorize is not None:
            authorize(method, peer)

    def _call_done(self) -> None:
        if self._idle_waiters and self.inflight == 0:
            # Emptied in place: connections hold a reference to this list.
            waiters = list(self._idle_waiters)
            self._idle_waiters.clear()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    @property
    def inflight(self) -> int:
        """Calls currently running, over all connections."""
        return sum(conn.inflight for conn in self._connections)

    @asynccontextmanager
    async def serve_in_background(
        self,
        listener: ListenerLike,
        *,
        drain_timeout: float = 5.0,
    ) -> AsyncGenerator[RpcServer]:
        """Serve ``listener`` in a background task while the block runs.

        On exit, drains (goaway, then up to ``drain_timeout`` seconds for
        in-flight calls) and stops; the serving task never outlives the block.
        """
        task = asyncio.get_running_loop().create_task(self.serve(listener))
        self._accept_tasks.add(task)
        try:
            yield self
        finally:
            try:
                await self.drain(timeout=drain_timeout)
            finally:
                await cancel_and_wait(task)
                self._accept_tasks.discard(task)

    async def drain(self, timeout: float = 10.0) -> int:  # noqa: ASYNC109 (grace period)
        """Stop gracefully: goaway, let in-flight calls finish, then cut the rest.

        New connections are no longer served; every connection gets a GOAWAY
        (clients send further calls elsewhere, and calls that crossed the GOAWAY
        are refused with a retry-safe ``Unavailable``). In-flight calls have up
        to ``timeout`` seconds; those still running are cancelled and their
        callers get ``Unavailable``. Replies are then written out completely
        (including parts waiting for the caller's credit) before each connection is
        closed gracefully (the stream's ``aclose()``), within what is left of
        ``timeout`` (at least 1 s). Safe to call more than once; afterwards
        the server serves no new connections (build a new one to serve again).
        Cancelling ``drain`` leaves the calls running; call :meth:`aclose`.

        Returns:
            The number of calls that were cut.
        """
        self._draining = True
        for task in list(self._accept_tasks):
            task.cancel()
        for conn in list(self._connections):
            conn.core.goaway(0, "server draining")
            conn.kick()
        loop = asyncio.get_running_loop()
        ends = loop.time() + timeout
        if self.inflight:
            waiter = loop.create_future()
            self._idle_waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, timeout)
        cut = 0
        conns = list(self._connections)
        for conn in conns:
            cut += conn.cancel_all(DRAIN_REASON)
        # Let the cut handlers send their status before the connections close.
        await asyncio.gather(*(conn.wait_calls(1.0) for conn in conns))
        # Every reply (and status) is written out before its connection closes, within
        # what is left of the drain window (at least a moment for the statuses of cut calls).
        left = max(ends - loop.time(), 1.0)
        await asyncio.gather(*(conn.flush(left) for conn in conns))
        await self._close_connections()
        return cut

    async def aclose(self) -> None:
        """Stop at once: in-flight calls are cancelled, connections closed. Idempotent."""
        self._draining = True
        for task in list(self._accept_tasks):
            task.cancel()
        conns = list(self._connections)
        for conn in conns:
            conn.cancel_all(DRAIN_REASON)
        await asyncio.gather(*(conn.wait_calls(1.0) for conn in conns))
        await self._close_connections()

    async def _close_connections(self) -> None:
        conns = list(self._connections)
        if conns:
            await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
        tasks = list(self._connection_tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._connections.clear()
        self._per_peer.clear()

    def _describe(self) -> dict[str, Any]:
        return {name: kind.name for name, (kind, _) in self._methods.items()}


async def _close_quietly(stream: StreamLike) -> None:
    await aclose_quietly(stream.aclose())
