"""The remote backend: saver requests as pilot-rpc unary calls to a store worker.

Connections, the transport, the event loop of sync callers and retries belong
to :class:`pilot_rpc.PilotClient` (shared with remote nodes and event sources
by default); this module only names the calls and translates their errors.

pilot-rpc and pilot-transport errors are translated here, at the boundary, into
``pilot_checkpoint_sqlite.errors`` (chained with ``from``); the worker side of
the same translation is in ``_plugin.py``.
"""

from __future__ import annotations

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

__all__ = ["RemoteBackend", "build_client", "error_from_rpc"]

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


class RemoteBackend:
    """Calls the store handlers of one worker through a :class:`pilot_rpc.PilotClient`.

    The client's connection pool of the calling event loop is used, so async
    calls never hop threads. Retries happen once, in the RPC client: every
    store request is idempotent and sent with ``idempotent=True``, under the
    policy ``options.retry`` (``None``: the client's own policy).
    """

    loop_agnostic = True
    """The client keeps one connection pool per event loop: callable from any loop."""

    def __init__(
        self,
        client: PilotClient | None,
        *,
        peer: str,
        port: int,
        options: SaverOptions,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._peer = peer
        self._port = port
        self._options = options
        self._owns_client = owns_client

    @property
    def client(self) -> PilotClient:
        """The client in use (the shared default one unless one was given)."""
        if self._client is None:
            return default_client()
        return self._client

    async def call(
        self, method: str, payload: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Any:
        try:
            rpc = await self.client.rpc()
            return await rpc.call(
                self._peer,
                self._port,
                _wire.handler_name(method),
                payload,
                timeout=self._options.timeout,
                idempotency_key=idempotency_key,
                idempotent=True,
                retry=self._options.retry,
            )
        except RpcError as exc:
            raise error_from_rpc(exc, method) from exc
        except TransportUsageError as exc:
            raise CheckpointConfigError(f"{method}: {exc}") from exc
        except (TransportNetworkError, TransportError, OSError) as exc:
            raise StoreUnavailableError(f"{method}: {exc}") from exc

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
