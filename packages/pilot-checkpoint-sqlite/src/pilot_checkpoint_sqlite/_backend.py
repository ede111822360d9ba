"""The narrow interface between the saver and whatever serves the store.

The saver only ever calls ``await backend.call(method, payload,
idempotency_key=...)``. Two implementations ship:

* :class:`LocalStoreBackend` calls a :class:`CheckpointStore` in the same
  process (unit tests, embedded use, and the reference for the remote one);
* the remote backend (``_remote.py``) sends the same payloads to a worker over
  pilot-rpc, where the ``checkpoint-sqlite`` plugin hands them to a store.

Both go through :class:`CheckpointService`, so scoping and request validation
are identical in and out of process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pilot_checkpoint_sqlite._service import CheckpointService

__all__ = ["CheckpointBackend", "LocalStoreBackend"]


@runtime_checkable
class CheckpointBackend(Protocol):
    """Carries saver requests to a checkpoint store.

    Implementations must be safe to call concurrently from one event loop. A
    backend whose ``loop_agnostic`` attribute is true may be called from any
    loop; the saver then runs async calls on the caller's own loop. Others are
    called only on the saver's private loop.
    """

    async def call(
        self, method: str, payload: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Any:
        """Run one store method and return its reply.

        Args:
            method: One of the store methods (``_wire.METHODS``).
            payload: The request, plain msgpack-able data.
            idempotency_key: Stable key of the logical operation; a retry
                carries the same key.

        Raises:
            CheckpointError: a subclass from ``pilot_checkpoint_sqlite.errors``.
        """
        ...

    async def aclose(self) -> None:
        """Release resources. Idempotent."""
        ...


class LocalStoreBackend:
    """A backend calling a store service in this process, as one caller identity.

    Args:
        service: The service wrapping the store.
        caller_node_id: Identity the requests are scoped to (what a worker
            would take from the authenticated peer).
    """

    loop_agnostic = True
    """Usable from any event loop: the saver calls it on the caller's loop, no hop."""

    def __init__(self, service: CheckpointService, *, caller_node_id: str = "local") -> None:
        self._service = service
        self._caller = caller_node_id

    async def call(
        self, method: str, payload: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Any:
        del idempotency_key  # the store's writes are idempotent by key already
        return await self._service.handle(method, payload, caller_node_id=self._caller)

    async def aclose(self) -> None:
        return None
