"""The narrow view of an incoming call that the worker's pipeline needs.

``pilot_rpc.CallContext`` satisfies :class:`IncomingCall`; so does the offline
call that :mod:`pilot_worker.testing` builds. Keeping the pipeline behind this
interface is what lets a handler be driven in a unit test without a network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["IncomingCall", "PeerLike"]


class PeerLike(Protocol):
    """The authenticated remote peer (``pilot_transport.PeerInfo`` satisfies this)."""

    @property
    def node_id(self) -> str:
        """The node id proven by the handshake (what ``allow=`` lists match)."""
        ...

    @property
    def name(self) -> str | None:
        """The peer's name in our trust store, if it has one."""
        ...

    @property
    def address(self) -> str | None:
        """The peer's Pilot address, if known."""
        ...


class IncomingCall(Protocol):
    """What the pipeline reads from a call (``pilot_rpc.CallContext`` satisfies this)."""

    @property
    def peer(self) -> PeerLike:
        """The authenticated caller."""
        ...

    @property
    def request_id(self) -> str:
        """The caller's request id, or one unique to this call."""
        ...

    @property
    def deadline(self) -> float | None:
        """Event-loop time (``loop.time()``) at which the call expires, or ``None``."""
        ...

    @property
    def metadata(self) -> Mapping[str, str]:
        """The caller's headers."""
        ...

    @property
    def traceparent(self) -> str | None:
        """The caller's W3C ``traceparent``, if it sent one."""
        ...

    @property
    def idempotency_key(self) -> str | None:
        """The caller's idempotency key, if it sent one."""
        ...

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled, the deadline passed or the connection died."""
        ...

    async def send_progress(self, value: Any) -> None:
        """Send a progress value to the caller of a unary call.

        Raises:
            pilot_rpc.RpcError: as ``pilot_rpc.CallContext.send_progress``:
                ``InvalidArgument`` (not encodable), ``FailedPrecondition`` (a
                streaming call) or ``Cancelled`` (the call is over).
        """
        ...
