"""The remote backend: saver requests as pilot-rpc unary calls to a store worker.

pilot-rpc and pilot-transport errors are translated here, at the boundary, into
``pilot_checkpoint_sqlite.errors`` (chained with ``from``); the worker side of
the same translation is in ``_plugin.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pilot_rpc import (
    Cancelled,
    ClientOptions,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RpcClient,
    RpcError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from pilot_transport.errors import TransportError, TransportNetworkError, TransportUsageError

from pilot_checkpoint_sqlite import _env, _wire
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

__all__ = ["RemoteBackend", "error_from_rpc", "open_remote_backend"]

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
    kind = details.get("kind") if isinstance(details, dict) else None
    message = f"{method}: {exc.message or exc}"
    if isinstance(kind, str) and kind in _KINDS:
        # The store said precisely what failed (see _plugin.error_to_rpc).
        return _KINDS[kind](message)
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
        reason = str(details.get("reason", "")) if isinstance(details, dict) else ""
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
    """Calls the store handlers of one worker over a :class:`pilot_rpc.RpcClient`."""

    def __init__(
        self,
        client: RpcClient,
        *,
        peer: str,
        port: int,
        options: SaverOptions,
        owned_transport: Any = None,
    ) -> None:
        self._client = client
        self._peer = peer
        self._port = port
        self._options = options
        self._owned_transport = owned_transport

    async def call(
        self, method: str, payload: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Any:
        try:
            return await self._client.call(
                self._peer,
                self._port,
                _wire.handler_name(method),
                payload,
                timeout=self._options.timeout,
                idempotency_key=idempotency_key,
                idempotent=True,
            )
        except RpcError as exc:
            raise error_from_rpc(exc, method) from exc
        except TransportUsageError as exc:
            raise CheckpointConfigError(f"{method}: {exc}") from exc
        except TransportNetworkError as exc:
            raise StoreUnavailableError(f"{method}: {exc}") from exc

    async def aclose(self) -> None:
        try:
            await self._client.aclose()
        finally:
            if self._owned_transport is not None:
                transport, self._owned_transport = self._owned_transport, None
                await transport.aclose()


def _config_dir() -> Path:
    # Same defaults as the pilot-transport command line that creates the files.
    explicit = os.environ.get(_env.PILOT_CONFIG_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".config") / "pilot"


def _default_file(env: str, name: str) -> str | None:
    value = os.environ.get(env)
    if value:
        return os.path.expanduser(value)
    candidate = _config_dir() / name
    return str(candidate) if candidate.exists() else None


async def open_remote_backend(
    *,
    peer: str,
    port: int,
    transport: Any,
    identity: Any,
    trust: Any,
    options: SaverOptions,
) -> RemoteBackend:
    """Connect lazily to ``peer``: open a transport if none was given, then a client.

    Raises:
        CheckpointConfigError: no identity/trust for an own transport, bad URL or files.
        StoreUnavailableError: the transport cannot be opened.
    """
    owned: Any = None
    if transport is None or isinstance(transport, str):
        from pilot_transport import open_transport

        url = transport if transport is not None else os.environ.get(_env.PILOT_TRANSPORT)
        identity = (
            identity if identity is not None else _default_file(_env.PILOT_IDENTITY, "identity.key")
        )
        trust = trust if trust is not None else _default_file(_env.PILOT_TRUST, "trust.json")
        if identity is None or trust is None:
            raise CheckpointConfigError(
                "PilotCheckpointSaver needs an identity and a trust store to reach its peer: "
                f"pass identity=/trust= (or transport=), set ${_env.PILOT_IDENTITY} and "
                f"${_env.PILOT_TRUST}, or create them in {_config_dir()} with the "
                "pilot-transport command line"
            )
        try:
            owned = await open_transport(url, identity=identity, trust=trust)
        except TransportUsageError as exc:
            raise CheckpointConfigError(f"cannot open the saver's transport: {exc}") from exc
        except (TransportError, OSError) as exc:
            raise StoreUnavailableError(f"cannot open the saver's transport: {exc}") from exc
        transport = owned
    client = RpcClient(transport, options=ClientOptions(connect_timeout=options.connect_timeout))
    return RemoteBackend(client, peer=peer, port=port, options=options, owned_transport=owned)
