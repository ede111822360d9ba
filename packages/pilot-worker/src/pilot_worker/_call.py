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
    def node_id(self) -> str: ...

    @property
    def name(self) -> str | None: ...

    @property
    def address(self) -> str | None: ...


class IncomingCall(Protocol):
    """What the pipeline reads from a call (``pilot_rpc.CallContext`` satisfies this)."""

    @property
    def peer(self) -> PeerLike: ...

    @property
    def request_id(self) -> str: ...

    @property
    def deadline(self) -> float | None: ...

    @property
    def metadata(self) -> Mapping[str, str]: ...

    @property
    def traceparent(self) -> str | None: ...

    @property
    def idempotency_key(self) -> str | None: ...

    @property
    def cancelled(self) -> bool: ...

    async def send_progress(self, value: Any) -> None: ...
