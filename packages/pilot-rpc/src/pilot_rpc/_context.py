"""The server-side view of one call: who, what, until when, and a cancel signal."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from pilot_rpc._types import IDEMPOTENCY_KEY, REQUEST_ID, TRACEPARENT

if TYPE_CHECKING:
    from pilot_rpc.errors import RpcError

__all__ = ["CallContext"]


class _CallControl(Protocol):
    """What the context needs from the server driver's call record."""

    @property
    def cancel_event(self) -> asyncio.Event: ...

    def is_cancelled(self) -> bool: ...

    def expire_at(self, deadline: float, error: Callable[[], RpcError] | None) -> None: ...

    async def send_progress(self, value: Any) -> None: ...


class CallContext:
    """Everything a handler may know about its call.

    Attributes:
        peer: The authenticated caller (``PeerInfo`` from the transport).
        method: The method name the caller asked for.
        call_id: The call's number on its connection (unique per connection).
        deadline: Event-loop time (``loop.time()``) at which the call expires,
            or ``None`` when the caller set no deadline. The server cancels the
            handler at that time and answers ``DEADLINE_EXCEEDED``.
        metadata: The caller's headers, including the reserved keys
            ``traceparent``, ``idempotency-key`` and ``request-id`` when set.
    """

    __slots__ = ("_control", "_loop", "_tag", "call_id", "deadline", "metadata", "method", "peer")

    def __init__(
        self,
        *,
        peer: Any,
        method: str,
        call_id: int,
        deadline: float | None,
        metadata: Mapping[str, str],
        control: _CallControl,
        loop: asyncio.AbstractEventLoop,
        connection_tag: str = "",
    ) -> None:
        self.peer = peer
        self.method = method
        self.call_id = call_id
        self.deadline = deadline
        self.metadata = metadata
        self._control = control
        self._loop = loop
        self._tag = connection_tag

    @property
    def request_id(self) -> str:
        """The caller's ``request-id`` header, else an id unique to this call on this server."""
        return self.metadata.get(REQUEST_ID) or f"{self._tag}-{self.call_id}"

    @property
    def traceparent(self) -> str | None:
        """The caller's W3C ``traceparent``, if it sent one."""
        return self.metadata.get(TRACEPARENT)

    @property
    def idempotency_key(self) -> str | None:
        """The caller's idempotency key, if it sent one."""
        return self.metadata.get(IDEMPOTENCY_KEY)

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled, the deadline passed or the connection died."""
        return self._control.is_cancelled()

    def time_remaining(self) -> float | None:
        """Seconds until the deadline (never negative), or ``None`` without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self._loop.time())

    def shorten_deadline(
        self, deadline: float, error: Callable[[], RpcError] | None = None
    ) -> bool:
        """Bring the call's deadline forward to ``deadline`` (event-loop time).

        At the new deadline the server does what it does at the caller's: it
        cancels the handler and answers at once, even if the handler catches
        its cancellation. The answer is ``error()`` when given (called then),
        else ``DEADLINE_EXCEEDED``. For a server that bounds a handler more
        tightly than its caller did, without a timer task of its own.

        Returns:
            True if the deadline moved; False (nothing changes) when
            ``deadline`` is not earlier than the current one or the call is
            already cancelled. Safe to repeat.
        """
        if (self.deadline is not None and deadline >= self.deadline) or self.cancelled:
            return False
        self.deadline = deadline
        self._control.expire_at(deadline, error)
        return True

    async def wait_cancelled(self) -> None:
        """Wait until the call is cancelled (by the caller, its deadline or a lost connection).

        The handler task itself is cancelled at that moment too; this is for
        helper tasks the handler started and wants to stop with the call.
        """
        await self._control.cancel_event.wait()

    async def send_progress(self, value: Any) -> None:
        """Send a progress update to the caller of a unary call (its ``on_progress``).

        Updates are flow-controlled: when the caller consumes them slowly, this
        waits. Safe to call any number of times before the handler returns.

        Raises:
            InvalidArgument: ``value`` is not msgpack-encodable.
            FailedPrecondition: the method is streaming (yield items instead).
            Cancelled: the call is over (cancelled, expired or disconnected).
        """
        await self._control.send_progress(value)

    def __repr__(self) -> str:
        return f"<CallContext method={self.method!r} call_id={self.call_id}>"
