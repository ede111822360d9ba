"""PilotClient: the one client runtime every package above pilot-rpc builds on.

Theory of operation
-------------------
A transport and the RPC connections over it belong to the event loop that
opened them. A :class:`PilotClient` therefore keeps, per event loop, one
transport (opened lazily on the first call from that loop, unless the caller
supplied one) and one :class:`RpcClient` (its connection pool). Async callers
run on their own loop: no thread hop on the hot path.

Sync callers (LangGraph's ``invoke``, a checkpointer's ``get_tuple``) go
through :meth:`PilotClient.run_sync` / :meth:`PilotClient.run_sync_iter`,
which run the coroutine on the one background event-loop thread this client
owns (started lazily, stopped by :meth:`close`/:meth:`aclose` or at
interpreter exit). With a supplied transport, sync calls run on the loop that
transport lives on instead.

When a loop shuts down (``asyncio.run``, ``asyncio.Runner``, pytest-asyncio
all call ``loop.shutdown_asyncgens()``), a small async generator registered
on that loop closes the loop's connections and transport there, before the
loop goes away.

:func:`default_client` keeps one shared client per configuration (URL,
identity, trust), so a graph with remote nodes, a remote checkpoint saver and
an event source opens one transport.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar, cast

from pilot_rpc._client import RpcClient
from pilot_rpc._options import ClientOptions, RetryPolicy
from pilot_rpc._types import ProgressCallback, TransportLike
from pilot_rpc.errors import Cancelled, DeadlineExceeded, FailedPrecondition

if TYPE_CHECKING:
    from pilot_transport import Identity, TrustStore
    from pilot_transport.config import ClientConfig

    IdentityArg = Identity | str | os.PathLike[str] | None
    TrustArg = TrustStore | str | os.PathLike[str] | None

__all__ = [
    "PilotClient",
    "aclose_default_clients",
    "configure_default_client",
    "default_client",
]

logger = logging.getLogger("pilot_rpc.runtime")

T = TypeVar("T")

_STOP_TIMEOUT = 5.0


class _LoopState:
    __slots__ = ("guard", "lock", "rpc", "transport")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.transport: TransportLike | None = None
        self.rpc: RpcClient | None = None
        self.guard: AsyncGenerator[None] | None = None


class PilotClient:
    """One transport and one connection pool per event loop, one retry policy, sync bridging.

    Build one yourself, or share the process-wide one for a configuration with
    :func:`default_client`. Every client of langgraph-pilot
    (``PilotRemoteRunnable``, ``PilotCheckpointSaver``, ``PilotEventSource``,
    ``PilotChannel``, ``PilotPublisher``) takes ``client=``.

    Args:
        url: Carrier URL of the transport this client opens; ``None`` reads
            ``PILOT_TRANSPORT_URL`` (see ``pilot_transport.config``).
        identity: ``pilot_transport.Identity`` or key file path; ``None`` reads
            ``PILOT_IDENTITY``, else the config directory's ``identity.key``
            (created on first use, with a log line saying where).
        trust: ``pilot_transport.TrustStore`` or trust file path; ``None`` reads
            ``PILOT_TRUST``, else the config directory's ``trust.json``.
        transport: An open transport to use instead of opening one (then
            ``url``/``identity``/``trust`` must be ``None``); it is not closed
            by this client. Sync calls then run on the loop it lives on (the
            loop running when the client was built, else the first one that
            calls through it).
        options: Connection settings of the per-loop :class:`RpcClient`.
        retry: The retry policy of every call made through this client
            (default ``options.retry``: 3 attempts, retried only when safe).

    Named files that do not exist are errors (``IdentityNotFoundError``,
    ``TrustFileNotFoundError``), raised by the first call.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        identity: IdentityArg = None,
        trust: TrustArg = None,
        transport: TransportLike | None = None,
        options: ClientOptions | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if transport is not None and (url is not None or identity is not None or trust is not None):
            raise FailedPrecondition("pass either transport= or url=/identity=/trust=, not both")
        options = options if options is not None else ClientOptions()
        if retry is not None:
            options = dataclasses.replace(options, retry=retry)
        self.options = options
        self._url = url
        self._identity = identity
        self._trust = trust
        self._transport = transport
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._owner_loop: asyncio.AbstractEventLoop | None = None
        self._opened = 0
        self._resolved: ClientConfig | None = None  # pinned by default_client()
        if transport is not None:
            with contextlib.suppress(RuntimeError):
                self._owner_loop = asyncio.get_running_loop()

    # -- facts -----------------------------------------------------------------------------------

    @property
    def retry(self) -> RetryPolicy:
        """The one retry policy of this client's calls."""
        return self.options.retry

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose`/:meth:`close` was called."""
        return self._closed

    @property
    def transports_opened(self) -> int:
        """How many transports this client has opened so far (0 with a supplied one)."""
        return self._opened

    @property
    def supplied_transport(self) -> TransportLike | None:
        """The transport given to the constructor, if any."""
        return self._transport

    def __repr__(self) -> str:
        what = repr(self._transport) if self._transport is not None else (self._url or "default")
        return f"<PilotClient {what} loops={len(self._states)} closed={self._closed}>"

    # -- async side ------------------------------------------------------------------------------

    async def rpc(self) -> RpcClient:
        """The :class:`RpcClient` of the running loop, opening the transport on first use.

        Safe to repeat (returns the same client on the same loop). Cancelling
        while the transport opens abandons the open.

        Raises:
            Cancelled: the client is closed.
            pilot_transport.errors.TransportError: the transport cannot be opened
                (a named file is missing, a bad URL, an unusable key).
        """
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is not None and state.rpc is not None:
            return state.rpc
        if state is None:
            with self._lock:
                if self._closed:
                    raise Cancelled("the PilotClient is closed")
                state = self._states.get(loop)
                fresh = state is None
                if state is None:
                    state = self._states[loop] = _LoopState()
            if fresh:
                guard = self._guard(loop, state)
                await guard.__anext__()  # registers it with this loop's asyncgen hooks
                state.guard = guard
        async with state.lock:
            if state.rpc is None:
                if self._closed:
                    raise Cancelled("the PilotClient is closed")
                if self._transport is not None:
                    if self._owner_loop is None:
                        self._owner_loop = loop
                    transport = self._transport
                else:
                    transport = await self._open_transport()
                    state.transport = transport
                state.rpc = RpcClient(transport, options=self.options)
            return state.rpc

    async def transport(self) -> TransportLike:
        """The transport of the running loop (opened on first use); see :meth:`rpc`."""
        await self.rpc()
        if self._transport is not None:
            return self._transport
        transport = self._states[asyncio.get_running_loop()].transport
        assert transport is not None
        return transport

    async def _open_transport(self) -> TransportLike:
        import pilot_transport
        from pilot_transport import config

        resolved = self._resolved
        if resolved is None:
            resolved = config.resolve(
                self._url,
                self._identity if _is_path(self._identity) else None,
                self._trust if _is_path(self._trust) else None,
            )
        identity = self._identity
        if not isinstance(identity, pilot_transport.Identity):
            identity = resolved.load_identity()
        trust = self._trust
        if not isinstance(trust, pilot_transport.TrustStore):
            trust = resolved.open_trust()
        transport = await pilot_transport.open_transport(
            resolved.url, identity=identity, trust=trust
        )
        self._opened += 1
        logger.debug("opened transport %r for %r", transport, self)
        return cast(TransportLike, transport)

    async def _guard(
        self, loop: asyncio.AbstractEventLoop, state: _LoopState
    ) -> AsyncGenerator[None]:
        try:
            yield
        finally:
            with self._lock:
                if self._states.get(loop) is state:
                    del self._states[loop]
            await _close_state(state)

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
    ) -> Any:
        """:meth:`RpcClient.call` on the running loop's client, with this client's policy.

        Raises:
            RpcError: as :meth:`RpcClient.call`.
            pilot_transport.errors.TransportError: the transport cannot be opened.
        """
        client = await self.rpc()
        return await client.call(
            peer,
            port,
            method,
            request,
            timeout=timeout,
            metadata=metadata,
            idempotency_key=idempotency_key,
            traceparent=traceparent,
            idempotent=idempotent,
            on_progress=on_progress,
        )

    # -- sync side -------------------------------------------------------------------------------

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise Cancelled("the PilotClient is closed")
            if self._thread_loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name="pilot-client", daemon=True)
                thread.start()
                if not started.wait(timeout=10.0):  # pragma: no cover - a stuck interpreter
                    raise DeadlineExceeded("the PilotClient's event loop thread did not start")
                self._thread_loop, self._thread = loop, thread
                _live_threads.add(self)
            return self._thread_loop

    def on_own_thread(self) -> bool:
        """Whether the calling thread is this client's background loop thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def _sync_loop(self) -> asyncio.AbstractEventLoop:
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if self._transport is None:
            if self.on_own_thread():
                raise FailedPrecondition(
                    "a sync call from the PilotClient's own loop thread would deadlock; "
                    "use the async method"
                )
            return self._background_loop()
        owner = self._owner_loop
        if owner is None or owner.is_closed() or not owner.is_running():
            raise FailedPrecondition(
                "sync calls through a supplied transport need the event loop that transport "
                "was opened on, running in another thread; use the async methods, or let the "
                "client open its own transport"
            )
        if owner is here:
            raise FailedPrecondition(
                "a sync call on the transport's own event loop would block it; use the async method"
            )
        return owner

    def run_sync(
        self, make: Callable[[], Coroutine[Any, Any, T]], *, timeout: float | None = None
    ) -> T:
        """Run ``make()`` to completion from sync code (with or without a running loop here).

        The coroutine runs on this client's background loop (or the supplied
        transport's loop). If the waiting thread is interrupted (for example
        ``KeyboardInterrupt``) or ``timeout`` passes, the coroutine is
        cancelled on its loop and the interruption (or ``DeadlineExceeded``)
        propagates. Safe to repeat.

        Raises:
            FailedPrecondition: called from the loop that would run it (a deadlock).
            DeadlineExceeded: ``timeout`` seconds passed.
            Cancelled: the client was closed while the call ran.
            Whatever the coroutine raises.
        """
        try:
            loop = self._sync_loop()
        except BaseException:
            # make() was never called: nothing to close.
            raise
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(make(), loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"no result within {timeout}s") from None
        except concurrent.futures.CancelledError:
            raise Cancelled("the call was cancelled (the client is closing)") from None
        except BaseException:
            future.cancel()
            raise

    async def run_async(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Await ``make()`` on this client's sync loop, from any loop.

        For work bound to that one loop (a resource opened there). Awaited in
        place when already on it. Cancelling the awaiting task cancels the
        coroutine on its loop. Safe to repeat.

        Raises:
            FailedPrecondition: as :meth:`run_sync`, for a supplied transport's loop.
            Cancelled: the client is closed.
        """
        loop = self._background_loop() if self._transport is None else self._owner_loop
        if loop is None or loop.is_closed():
            raise FailedPrecondition("the supplied transport's event loop is not known yet")
        if asyncio.get_running_loop() is loop:
            return await make()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(make(), loop))

    def run_sync_iter(self, make: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """Iterate an async iterator from sync code, one item at a time (no buffering).

        Closing the sync iterator early (``break``, an exception) closes the
        async one on its loop. Raises as :meth:`run_sync`.
        """
        loop = self._sync_loop()
        agen = make()
        try:
            while True:
                future = asyncio.run_coroutine_threadsafe(_next_item(agen), loop)
                try:
                    done, item = future.result()
                except concurrent.futures.CancelledError:
                    raise Cancelled("the call was cancelled (the client is closing)") from None
                except BaseException:
                    future.cancel()
                    raise
                if done:
                    return
                yield cast(T, item)
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not loop.is_closed():
                closing = asyncio.run_coroutine_threadsafe(aclose(), loop)
                with contextlib.suppress(Exception, concurrent.futures.CancelledError):
                    closing.result(timeout=_STOP_TIMEOUT)

    # -- closing ---------------------------------------------------------------------------------

    def _take_all(self) -> list[tuple[asyncio.AbstractEventLoop, _LoopState]]:
        with self._lock:
            self._closed = True
            states = list(self._states.items())
            self._states.clear()
        _forget(self)
        return states

    async def aclose(self) -> None:
        """Close every connection pool and every transport this client opened. Idempotent.

        The running loop's are closed here; other loops' on their own loops
        (waited for at most 5 s each); then the background thread stops.
        Calls in flight fail. A supplied transport is left open.
        """
        current = asyncio.get_running_loop()
        for loop, state in self._take_all():
            if loop is current:
                await _close_guard(state)
            elif not loop.is_closed() and loop.is_running():
                done = asyncio.run_coroutine_threadsafe(_close_guard(state), loop)
                with contextlib.suppress(Exception, concurrent.futures.CancelledError):
                    await asyncio.wait_for(asyncio.wrap_future(done), _STOP_TIMEOUT)
        await asyncio.to_thread(self._stop_thread)

    def close(self) -> None:
        """Sync twin of :meth:`aclose` (from any thread without a loop of this client).

        Raises:
            FailedPrecondition: called on a loop this client has state on (use ``aclose``).
        """
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is not None and current in self._states:
            raise FailedPrecondition("close() on a loop the client runs on; await aclose()")
        for loop, state in self._take_all():
            if not loop.is_closed() and loop.is_running():
                done = asyncio.run_coroutine_threadsafe(_close_guard(state), loop)
                with contextlib.suppress(Exception, concurrent.futures.CancelledError):
                    done.result(_STOP_TIMEOUT)
        self._stop_thread()

    def _stop_thread(self) -> None:
        with self._lock:
            loop, thread = self._thread_loop, self._thread
            self._thread_loop = self._thread = None
        _live_threads.discard(self)
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:  # pragma: no cover - guarded by close()
            loop.call_soon(loop.stop)
            return
        loop.call_soon_threadsafe(_cancel_all_and_stop, loop)
        thread.join(_STOP_TIMEOUT)
        if not thread.is_alive():
            loop.close()

    async def __aenter__(self) -> PilotClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def _close_guard(state: _LoopState) -> None:
    guard = state.guard
    if guard is not None:
        with contextlib.suppress(Exception):
            await guard.aclose()
    else:
        await _close_state(state)


async def _close_state(state: _LoopState) -> None:
    rpc, state.rpc = state.rpc, None
    transport, state.transport = state.transport, None
    if rpc is not None:
        try:
            await rpc.aclose()
        except Exception as exc:  # the loop may be going away; nothing to report to
            logger.debug("closing a per-loop RPC client failed: %r", exc)
    if transport is not None:
        aclose = getattr(transport, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception as exc:
                logger.debug("closing a per-loop transport failed: %r", exc)


async def _next_item(agen: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return False, await anext(agen)
    except StopAsyncIteration:
        return True, None


def _cancel_all_and_stop(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()

    async def drain() -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.shutdown_asyncgens()  # closes the per-loop state of every client here
        loop.stop()

    loop.create_task(drain())


def _is_path(value: object) -> TypeGuard[str | os.PathLike[str]]:
    return isinstance(value, str | os.PathLike)


# -- the process-wide registry ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    url: str | None = None
    identity: Any = None
    trust: Any = None


_defaults = _Settings()
_registry: dict[tuple[str, str, str], PilotClient] = {}
_registry_lock = threading.Lock()
_live_threads: set[PilotClient] = set()


def _settings_for(url: str | None, identity: Any, trust: Any) -> _Settings:
    defaults = _defaults
    return _Settings(
        url=url if url is not None else defaults.url,
        identity=identity if identity is not None else defaults.identity,
        trust=trust if trust is not None else defaults.trust,
    )


def _key_part(value: Any, path: str) -> str:
    if value is None or _is_path(value):
        return path
    fingerprint = getattr(value, "fingerprint", None)
    if isinstance(fingerprint, str):
        return f"<identity {fingerprint}>"
    return f"<object {id(value)}>"


def configure_default_client(
    *, url: str | None = None, identity: IdentityArg = None, trust: TrustArg = None
) -> None:
    """Set what :func:`default_client` uses where its caller passes ``None``.

    ``None`` here means "from the environment" (``pilot_transport.config``).
    Clients already handed out keep their configuration. Safe to repeat.
    """
    global _defaults, _last_default
    with _registry_lock:
        _defaults = _Settings(url=url, identity=identity, trust=trust)
        _last_default = None


def default_client(
    *, url: str | None = None, identity: IdentityArg = None, trust: TrustArg = None
) -> PilotClient:
    """The shared :class:`PilotClient` for this configuration, created on first use.

    The configuration is resolved now (arguments, then
    :func:`configure_default_client`, then the environment); two callers that
    resolve to the same URL, identity file and trust file share one client,
    hence one transport per event loop. No file is read here.
    """
    from pilot_transport import config

    # Fast path of the common call (no arguments): the same configured defaults and
    # the same environment as last time resolve to the same client.
    env = None
    if url is None and identity is None and trust is None:
        env = tuple(map(os.environ.get, _RESOLVE_ENV))
        last = _last_default
        if last is not None and last[0] is _defaults and last[1] == env and not last[2].closed:
            return last[2]
    settings = _settings_for(url, identity, trust)
    resolved = config.resolve(
        settings.url,
        settings.identity if _is_path(settings.identity) else None,
        settings.trust if _is_path(settings.trust) else None,
    )
    key = (
        resolved.url,
        _key_part(settings.identity, str(resolved.identity.path)),
        _key_part(settings.trust, str(resolved.trust.path)),
    )
    with _registry_lock:
        client = _registry.get(key)
        if client is None or client.closed:
            client = PilotClient(
                url=resolved.url,
                identity=None if _is_path(settings.identity) else settings.identity,
                trust=None if _is_path(settings.trust) else settings.trust,
            )
            client._resolved = resolved
            _registry[key] = client
        if env is not None:
            _remember_default(env, client)
        return client


_RESOLVE_ENV = (
    "PILOT_TRANSPORT_URL",
    "PILOT_TRANSPORT",
    "PILOT_IDENTITY",
    "PILOT_TRUST",
    "PILOT_CONFIG_DIR",
    "XDG_CONFIG_HOME",
    "HOME",
)
"""What ``pilot_transport.config.resolve`` reads from the environment."""
_last_default: tuple[_Settings, tuple[str | None, ...], PilotClient] | None = None


def _remember_default(env: tuple[str | None, ...], client: PilotClient) -> None:
    global _last_default
    _last_default = (_defaults, env, client)


def _forget(client: PilotClient) -> None:
    global _last_default
    with _registry_lock:
        if _last_default is not None and _last_default[2] is client:
            _last_default = None
        for key, value in list(_registry.items()):
            if value is client:
                del _registry[key]


async def aclose_default_clients() -> None:
    """Close every shared client :func:`default_client` handed out. Safe to repeat.

    The next :func:`default_client` call builds fresh ones.
    """
    global _last_default
    with _registry_lock:
        clients = list(_registry.values())
        _registry.clear()
        _last_default = None
    for client in clients:
        await client.aclose()


@atexit.register
def _stop_at_exit() -> None:  # pragma: no cover - interpreter exit
    for client in list(_live_threads):
        with contextlib.suppress(Exception):
            client.close()
