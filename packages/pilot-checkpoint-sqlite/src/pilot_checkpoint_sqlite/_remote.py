"""The remote backend: saver requests as pilot-rpc unary calls to a store worker.

Connections, the transport, the event loop of sync callers and retries belong
to :class:`pilot_rpc.PilotClient` (shared with remote nodes and event sources
by default); this module only names the calls and translates their errors.

pilot-rpc and pilot-transport errors are translated here, at the boundary, into
``pilot_checkpoint_sqlite.errors`` (chained with ``from``); the worker side of
the same translation is in ``_plugin.py``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any

from pilot_rpc import (
    Cancelled,
    ClientOptions,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PilotClient,
    ResourceExhausted,
    RetryPolicy,
    RpcClient,
    RpcError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    default_client,
)
from pilot_transport.errors import TransportError, TransportNetworkError, TransportUsageError

from pilot_checkpoint_sqlite import _wire
from pilot_checkpoint_sqlite._options import SaverOptions
from pilot_checkpoint_sqlite.errors import (
    CheckpointAccessDenied,
    CheckpointConfigError,
    CheckpointError,
    CheckpointProtocolError,
    CheckpointStoreError,
    CheckpointUsageError,
    StoreClosedError,
    StoreOverloadedError,
    StoreSchemaError,
    StoreTimeoutError,
    StoreUnavailableError,
)

__all__ = ["RemoteBackend", "build_client", "error_from_rpc", "failover_safe"]

logger = logging.getLogger(__name__)

_NO_RETRY = RetryPolicy.disabled()

_KINDS: dict[str, type[CheckpointError]] = {
    cls.__name__: cls
    for cls in (
        CheckpointUsageError,
        CheckpointConfigError,
        CheckpointAccessDenied,
        CheckpointStoreError,
        StoreUnavailableError,
        StoreTimeoutError,
        StoreSchemaError,
        StoreOverloadedError,
        StoreClosedError,
        CheckpointProtocolError,
    )
}


def error_from_rpc(exc: RpcError, method: str) -> CheckpointError:
    """The checkpoint error a failed call stands for."""
    details: Any = getattr(exc, "details", None) or {}
    if exc.info.domain == _wire.ERROR_DOMAIN:
        kind: Any = exc.info.metadata.get("error")
    else:  # a store of 0.1.x names the class in details["kind"]
        kind = details.get("kind") if isinstance(details, dict) else None
    message = f"{method}: {exc.message or exc}"
    if isinstance(kind, str) and kind in _KINDS:
        # The store said precisely what failed (see _plugin.error_to_rpc).
        return _KINDS[kind](message)
    if isinstance(exc.__cause__, TransportUsageError):
        # Our own configuration (an unknown peer, a missing trust file), not the store.
        return CheckpointConfigError(message)
    if isinstance(exc, Unavailable):
        return StoreUnavailableError(message)
    if isinstance(exc, DeadlineExceeded):
        return StoreTimeoutError(message)
    if isinstance(exc, PermissionDenied | Unauthenticated):
        return CheckpointAccessDenied(message)
    if isinstance(exc, Unimplemented | NotFound):
        return CheckpointConfigError(
            f"{message} (is the peer a store worker, started with --plugin checkpoint-sqlite?)"
        )
    if isinstance(exc, ResourceExhausted):
        reason = exc.info.reason.lower()
        if isinstance(details, dict):
            reason += " " + str(details.get("reason", ""))
        if "size" in reason or "large" in exc.message:
            return CheckpointUsageError(message)
        return StoreOverloadedError(message)
    if isinstance(exc, InvalidArgument):
        return CheckpointProtocolError(message)
    if isinstance(exc, FailedPrecondition):
        return CheckpointStoreError(message)
    if isinstance(exc, Cancelled):
        return StoreClosedError(message)
    return CheckpointStoreError(message)


def failover_safe(exc: RpcError, policy: RetryPolicy) -> bool:
    """Whether a failed store request may be sent again, to the same or another peer.

    The rule of the RPC client's own retries: the call is known not to have
    reached a handler (``retry_safe``), or it failed with one of the policy's
    ``idempotent_codes`` (every store request is idempotent).
    """
    if isinstance(exc, Unavailable) and exc.retry_safe:
        return True
    details: Any = exc.details
    if isinstance(details, dict) and details.get("retry_safe") is True:
        return True
    return exc.code in policy.idempotent_codes


class RemoteBackend:
    """Calls the store handlers of store workers through a :class:`pilot_rpc.PilotClient`.

    The client's connection pool of the calling event loop is used, so async
    calls never hop threads. Every store request is idempotent and sent with
    ``idempotent=True``; retries happen in one layer only, under the policy
    ``options.retry`` (``None``: the client's own policy):

    * one peer: the RPC client retries the call itself;
    * several peers (a store tier on one PostgreSQL database): this backend
      runs the attempts, each a single RPC attempt, and a request that fails
      with a retry-safe error moves on to the next peer at once (in list
      order, wrapping around); coming back to a peer already tried by this
      request waits the policy's backoff first. ``max_attempts`` counts
      attempts over all peers together, inside one ``options.timeout``.
      The peer that last answered is used first by the next request (sticky),
      so a tier is used as primary and standbys, not round-robin.
    """

    loop_agnostic = True
    """The client keeps one connection pool per event loop: callable from any loop."""

    bounded_by_timeout = True
    """Every call ends within ``options.timeout`` (``StoreTimeoutError`` past it).

    The RPC deadline covers reaching the store worker, every attempt and the
    backoff between them (one peer: the RPC client's own; several: this
    backend's), so the saver adds no timer of its own around it. Only opening
    the client's transport on its first use runs under the transport's own
    limits.
    """

    def __init__(
        self,
        client: PilotClient | None,
        *,
        peer: str | Sequence[str],
        port: int,
        options: SaverOptions,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._peers: tuple[str, ...] = (peer,) if isinstance(peer, str) else tuple(peer)
        if not self._peers:
            raise CheckpointConfigError("at least one store peer is needed")
        self._current = 0
        self._port = port
        self._options = options
        self._owns_client = owns_client

    @property
    def client(self) -> PilotClient:
        """The client in use (the shared default one unless one was given)."""
        if self._client is None:
            return default_client()
        return self._client

    @property
    def peers(self) -> tuple[str, ...]:
        """The store workers, in failover order."""
        return self._peers

    @property
    def current_peer(self) -> str:
        """The store worker the next request goes to first (the last one that answered)."""
        return self._peers[self._current]

    async def call(
        self, method: str, payload: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Any:
        try:
            rpc = await self.client.rpc()
            if len(self._peers) == 1:
                return await rpc.call(
                    self._peers[0],
                    self._port,
                    _wire.handler_name(method),
                    payload,
                    timeout=self._options.timeout,
                    idempotency_key=idempotency_key,
                    idempotent=True,
                    retry=self._options.retry,
                )
            policy = self._options.retry if self._options.retry is not None else rpc.options.retry
            return await self._failover(rpc, policy, method, payload, idempotency_key)
        except RpcError as exc:
            raise error_from_rpc(exc, method) from exc
        except TransportUsageError as exc:
            raise CheckpointConfigError(f"{method}: {exc}") from exc
        except (TransportNetworkError, TransportError, OSError) as exc:
            raise StoreUnavailableError(f"{method}: {exc}") from exc

    async def _failover(
        self,
        rpc: RpcClient,
        policy: RetryPolicy,
        method: str,
        payload: dict[str, Any],
        idempotency_key: str | None,
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.timeout
        name = _wire.handler_name(method)
        index = self._current
        tried: set[int] = set()
        attempt = 1
        while True:
            tried.add(index)
            try:
                reply = await rpc.call(
                    self._peers[index],
                    self._port,
                    name,
                    payload,
                    timeout=max(deadline - loop.time(), 0.001),
                    idempotency_key=idempotency_key,
                    idempotent=True,
                    retry=_NO_RETRY,
                )
            except RpcError as exc:
                if attempt >= policy.max_attempts or not failover_safe(exc, policy):
                    raise
                failed = index
                index = (index + 1) % len(self._peers)
                if self._current == failed:
                    # Later requests skip the failed peer too (until the new one fails).
                    self._current = index
                delay = 0.0
                if index in tried:
                    # Every peer failed this request once: back off before going round again.
                    delay = policy.backoff(attempt)
                    if policy.jitter:
                        delay *= 1 + random.uniform(-policy.jitter, policy.jitter)
                    if loop.time() + delay >= deadline:
                        raise
                logger.debug(
                    "store request %s failed on %s (%r); trying %s",
                    method,
                    self._peers[failed],
                    exc,
                    self._peers[index],
                )
                if delay:
                    await asyncio.sleep(delay)
                attempt += 1
                continue
            self._current = index
            return reply

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()

    def close(self) -> None:
        if self._owns_client and self._client is not None:
            self._client.close()


def build_client(
    *, transport: Any, identity: Any, trust: Any, options: SaverOptions
) -> PilotClient | None:
    """The client a saver opens for ``transport=``/``identity=``/``trust=``.

    ``None`` when none of them is given: the saver shares the default client.

    Raises:
        CheckpointConfigError: a bad combination of arguments.
    """
    if transport is None and identity is None and trust is None:
        return None
    client_options = ClientOptions(connect_timeout=options.connect_timeout)
    if transport is not None and not isinstance(transport, str):
        if identity is not None or trust is not None:
            raise CheckpointConfigError(
                "identity=/trust= configure a transport the saver opens; with an open "
                "transport= they are not used"
            )
        return PilotClient(transport=transport, options=client_options)
    return PilotClient(url=transport, identity=identity, trust=trust, options=client_options)
