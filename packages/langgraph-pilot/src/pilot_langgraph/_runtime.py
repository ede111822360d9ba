"""Where remote calls run: the default transport, per-loop RPC clients, sync bridging.

Theory of operation
-------------------
A transport and its RPC client belong to the event loop that opened them.
Async calls run on the caller's own loop (no thread hop on the hot path): the
first call on a loop opens the process-wide *default* transport for that loop,
configured from :func:`configure_default_transport`, else the environment
(``PILOT_TRANSPORT``, ``PILOT_IDENTITY``, ``PILOT_TRUST``, ``PILOT_CONFIG_DIR``),
so ``PilotRemoteRunnable(node="search", peer="worker-a")`` needs no setup code.

Sync calls (``invoke``/``stream``/``batch``) never start a loop of their own per
call. With the default transport they run on one background loop thread owned
by this module (started lazily, stopped at interpreter exit); with an explicit
transport they run on the loop that transport's client lives on. Either way
they work whether or not the calling thread has a running loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pilot_langgraph import _env
from pilot_langgraph.errors import PilotUsageError

if TYPE_CHECKING:
    from pilot_rpc import RpcClient
    from pilot_transport import Identity, Transport, TrustStore

__all__ = [
    "DefaultTransportSettings",
    "aclose_default_transport",
    "configure_default_transport",
    "default_transport",
    "get_client",
    "run_sync",
    "run_sync_iter",
]

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class DefaultTransportSettings:
    """How the process-wide default transport is opened.

    Attributes:
        url: Carrier URL; ``None`` reads ``PILOT_TRANSPORT`` (default ``tcp://127.0.0.1:0``).
        identity: Identity, or path of its key file; ``None`` reads ``PILOT_IDENTITY``,
            else ``$PILOT_CONFIG_DIR/identity.key`` (created with mode 0600).
        trust: Trust store, or path of its file; ``None`` reads ``PILOT_TRUST``, else
            ``$PILOT_CONFIG_DIR/trust.json``.
    """

    url: str | None = None
    identity: Identity | str | os.PathLike[str] | None = None
    trust: TrustStore | str | os.PathLike[str] | None = None


_settings = DefaultTransportSettings()
_settings_lock = threading.Lock()


def configure_default_transport(
    *,
    url: str | None = None,
    identity: Identity | str | os.PathLike[str] | None = None,
    trust: TrustStore | str | os.PathLike[str] | None = None,
) -> None:
    """Set how the default transport is opened (before the first remote call).

    Loops that already opened a default transport keep it until
    :func:`aclose_default_transport` is awaited on them. Safe to repeat.
    """
    global _settings
    with _settings_lock:
        _settings = DefaultTransportSettings(url=url, identity=identity, trust=trust)


def _config_dir() -> Path:
    # the same lookup as the pilot-transport command line
    if configured := os.environ.get(_env.PILOT_CONFIG_DIR):
        return Path(configured).expanduser()
    if xdg := os.environ.get(_env.XDG_CONFIG_HOME):
        return Path(xdg).expanduser() / "pilot"
    return Path(_env.DEFAULT_CONFIG_DIR).expanduser()


def _identity_and_trust(settings: DefaultTransportSettings) -> tuple[Identity, TrustStore]:
    # Small one-time local file reads; done before the transport opens.
    from pilot_transport import Identity, TrustStore

    identity: Any = settings.identity
    if identity is None:
        identity = os.environ.get(_env.PILOT_IDENTITY) or str(_config_dir() / _env.IDENTITY_FILE)
    if not isinstance(identity, Identity):
        path = Path(identity).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = Identity.load_or_create(path)
    trust: Any = settings.trust
    if trust is None:
        trust = os.environ.get(_env.PILOT_TRUST) or str(_config_dir() / _env.TRUST_FILE)
    if not isinstance(trust, TrustStore):
        path = Path(trust).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        trust = TrustStore.open(path)
    return identity, trust


async def _open_default_transport() -> Transport:
    from pilot_transport import open_transport

    settings = _settings
    identity, trust = _identity_and_trust(settings)
    url = settings.url or os.environ.get(_env.PILOT_TRANSPORT) or None
    return await open_transport(url, identity=identity, trust=trust)


class _LoopClients:
    """The RPC clients of one event loop (default transport + explicit ones)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = asyncio.Lock()
        self.default_transport: Transport | None = None
        self.default_client: RpcClient | None = None
        self.explicit: weakref.WeakKeyDictionary[Transport, RpcClient] = weakref.WeakKeyDictionary()


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClients] = (
    weakref.WeakKeyDictionary()
)
# transport -> loop its client runs on, so sync calls can be routed there
_transport_loops: weakref.WeakKeyDictionary[Transport, asyncio.AbstractEventLoop] = (
    weakref.WeakKeyDictionary()
)


def _new_client(transport: Transport) -> RpcClient:
    from pilot_rpc import ClientOptions, RetryPolicy, RpcClient

    # Retries and failover are decided one layer up (PilotRemoteRunnable), where the
    # LangGraph task id is known; the client itself only reconnects.
    return RpcClient(transport, options=ClientOptions(retry=RetryPolicy.disabled()))


async def get_client(transport: Transport | None) -> RpcClient:
    """The RPC client for ``transport`` (``None``: the default) on the running loop."""
    loop = asyncio.get_running_loop()
    state = _per_loop.get(loop)
    if state is None:
        state = _per_loop.setdefault(loop, _LoopClients(loop))
    if transport is not None:
        client = state.explicit.get(transport)
        if client is None:
            client = _new_client(transport)
            state.explicit[transport] = client
            _transport_loops[transport] = loop
        return client
    if state.default_client is not None:
        return state.default_client
    async with state.lock:
        if state.default_client is None:
            opened = await _open_default_transport()
            state.default_transport = opened
            state.default_client = _new_client(opened)
        return state.default_client


async def default_transport() -> Transport:
    """The default transport of the running loop (opened on first use)."""
    await get_client(None)
    state = _per_loop[asyncio.get_running_loop()]
    assert state.default_transport is not None
    return state.default_transport


async def aclose_default_transport() -> None:
    """Close the running loop's default transport and every client made on this loop.

    Safe to repeat; the next remote call opens a fresh one.
    """
    loop = asyncio.get_running_loop()
    state = _per_loop.pop(loop, None)
    if state is None:
        return
    for client in list(state.explicit.values()):
        await client.aclose()
    if state.default_client is not None:
        await state.default_client.aclose()
    if state.default_transport is not None:
        await state.default_transport.aclose()


class _BackgroundLoop:
    """One event loop on a daemon thread, for sync calls with the default transport."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name="pilot-langgraph-sync", daemon=True)
                thread.start()
                if not started.wait(timeout=10.0):  # pragma: no cover
                    raise RuntimeError("the pilot-langgraph background loop did not start")
                self._loop, self._thread = loop, thread
            return self._loop

    def is_current_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(aclose_default_transport(), loop)
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            future.result(timeout=5.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
        if not thread.is_alive():
            loop.close()


_background = _BackgroundLoop()
atexit.register(_background.stop)


def _owner_loop(transport: Transport | None) -> asyncio.AbstractEventLoop:
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if transport is None:
        if _background.is_current_thread():
            raise PilotUsageError("sync calls cannot be made from pilot-langgraph's own loop")
        return _background.get()
    owner = _transport_loops.get(transport)
    if owner is None or owner.is_closed() or not owner.is_running():
        raise PilotUsageError(
            "sync methods with an explicit transport need the event loop that transport "
            "was opened on, running in another thread, after one async call on it; use "
            "the async methods, or omit transport= to use the default transport"
        )
    if owner is here:
        raise PilotUsageError(
            "a sync call on the transport's own event loop would block it; "
            "use the async method (ainvoke/astream/abatch)"
        )
    return owner


def run_sync(
    make: Callable[[], Coroutine[Any, Any, T]],
    *,
    transport: Transport | None,
) -> T:
    """Run ``make()`` to completion from sync code, on the loop that owns ``transport``.

    Works with or without a running loop in the calling thread. The coroutine is
    cancelled if the waiting thread is interrupted.

    Raises:
        PilotUsageError: an explicit transport whose loop is not running in another
            thread, or a call from the thread of that very loop (it would deadlock).
    """
    loop = _owner_loop(transport)
    future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(make(), loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


async def _next_item(agen: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return False, await anext(agen)
    except StopAsyncIteration:
        return True, None


def run_sync_iter(
    make: Callable[[], AsyncIterator[T]],
    *,
    transport: Transport | None,
) -> Iterator[T]:
    """Iterate an async iterator from sync code, one item at a time (no buffering)."""
    loop = _owner_loop(transport)
    agen = make()
    try:
        while True:
            future = asyncio.run_coroutine_threadsafe(_next_item(agen), loop)
            try:
                done, item = future.result()
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
            with contextlib.suppress(Exception):
                closing.result(timeout=10.0)
