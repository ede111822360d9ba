"""Where remote calls run: pilot-rpc's :class:`~pilot_rpc.PilotClient`, seen from LangGraph.

Every remote node, fan-out, event source and discovery call goes through one
``PilotClient``: the one given as ``client=``, one built around a
``transport=`` (one per transport object), else the process-wide shared
client for the configuration (``pilot_rpc.default_client``: ``PILOT_TRANSPORT_URL``,
``PILOT_IDENTITY``, ``PILOT_TRUST``, ``PILOT_CONFIG_DIR``, or what
:func:`configure_default_transport` set). ``PilotCheckpointSaver`` and the
pilot-channels clients share the same default client, so a graph with remote
nodes, a remote saver and an event source opens one transport per event loop.

Async calls run on the caller's loop; sync calls (``invoke``/``stream``/
``batch``) run on the client's one background loop thread.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pilot_langgraph.errors import PilotUsageError

if TYPE_CHECKING:
    from pilot_rpc import PilotClient, RpcClient, TransportLike
    from pilot_transport import Identity, TrustStore

__all__ = [
    "DefaultTransportSettings",
    "aclose_default_transport",
    "client_for",
    "configure_default_transport",
    "get_client",
    "pilot_client",
    "run_sync",
    "run_sync_iter",
]

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class DefaultTransportSettings:
    """How the process-wide default client opens its transport.

    Attributes:
        url: Carrier URL; ``None`` reads ``PILOT_TRANSPORT_URL`` (default ``tcp://127.0.0.1:0``).
        identity: Identity, or path of its key file (must exist); ``None`` reads
            ``PILOT_IDENTITY``, else the config directory's ``identity.key``
            (created on first use, with a log line saying where).
        trust: Trust store, or path of its file (must exist); ``None`` reads
            ``PILOT_TRUST``, else the config directory's ``trust.json``.
    """

    url: str | None = None
    identity: Identity | str | os.PathLike[str] | None = None
    trust: TrustStore | str | os.PathLike[str] | None = None


def configure_default_transport(
    *,
    url: str | None = None,
    identity: Identity | str | os.PathLike[str] | None = None,
    trust: TrustStore | str | os.PathLike[str] | None = None,
) -> None:
    """Set how the shared default client opens its transport.

    Same as ``pilot_rpc.configure_default_client``.

    Applies to components that resolve the default after this call; clients
    already handed out keep their configuration until
    :func:`aclose_default_transport`. Safe to repeat.
    """
    from pilot_rpc import configure_default_client

    configure_default_client(url=url, identity=identity, trust=trust)


async def aclose_default_transport() -> None:
    """Close every shared default client (``pilot_rpc.aclose_default_clients``) and its transports.

    Safe to repeat; the next remote call opens a fresh one.
    """
    from pilot_rpc import aclose_default_clients

    await aclose_default_clients()


_by_transport: weakref.WeakKeyDictionary[Any, PilotClient] = weakref.WeakKeyDictionary()
_by_transport_lock = threading.Lock()


def client_for(client: PilotClient | None, transport: TransportLike | None) -> PilotClient | None:
    """The client a component built with ``client=``/``transport=`` uses (``None``: the default).

    Raises:
        PilotUsageError: both were given, or ``client`` is not a ``PilotClient``.
    """
    from pilot_rpc import PilotClient

    if client is not None:
        if transport is not None:
            raise PilotUsageError("pass either client= or transport=, not both")
        if not isinstance(client, PilotClient):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise PilotUsageError(f"client must be a pilot_rpc.PilotClient, got {client!r}")
        return client
    if transport is None:
        return None
    with _by_transport_lock:
        wrapped = _by_transport.get(transport)
        if wrapped is None:
            wrapped = _by_transport[transport] = PilotClient(transport=transport)
        return wrapped


def pilot_client(target: PilotClient | TransportLike | None) -> PilotClient:
    """The :class:`~pilot_rpc.PilotClient` for ``target`` (``None``: the shared default)."""
    from pilot_rpc import PilotClient, default_client

    if target is None:
        return default_client()
    if isinstance(target, PilotClient):
        return target
    wrapped = client_for(None, target)
    assert wrapped is not None
    return wrapped


async def get_client(target: PilotClient | TransportLike | None) -> RpcClient:
    """The RPC client (connection pool) of ``target`` on the running loop."""
    return await pilot_client(target).rpc()


def run_sync(
    make: Callable[[], Coroutine[Any, Any, T]],
    *,
    client: PilotClient | TransportLike | None,
) -> T:
    """Run ``make()`` to completion from sync code on ``client``'s loop.

    Works with or without a running loop in the calling thread. The coroutine is
    cancelled if the waiting thread is interrupted.

    Raises:
        PilotUsageError: a supplied transport whose loop is not running in another
            thread, or a call from the thread of that very loop (it would deadlock).
    """
    from pilot_rpc import FailedPrecondition

    runtime = pilot_client(client)
    started = False

    def start() -> Coroutine[Any, Any, T]:
        nonlocal started
        started = True
        return make()

    try:
        return runtime.run_sync(start)
    except FailedPrecondition as exc:
        if started:  # the remote side's own error, not a misuse of the client
            raise
        raise PilotUsageError(exc.message or str(exc)) from exc


def run_sync_iter(
    make: Callable[[], AsyncIterator[T]],
    *,
    client: PilotClient | TransportLike | None,
) -> Iterator[T]:
    """Iterate an async iterator from sync code, one item at a time (no buffering)."""
    from pilot_rpc import FailedPrecondition

    runtime = pilot_client(client)
    started = False

    def start() -> AsyncIterator[T]:
        nonlocal started
        started = True
        return make()

    try:
        yield from runtime.run_sync_iter(start)
    except FailedPrecondition as exc:
        if started:
            raise
        raise PilotUsageError(exc.message or str(exc)) from exc
