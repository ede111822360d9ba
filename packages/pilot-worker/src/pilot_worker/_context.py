"""The :class:`Context` a handler may take as its second argument."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

from pilot_worker._call import IncomingCall, PeerLike
from pilot_worker._steps import run_step

__all__ = ["Context"]


class Context:
    """What a handler knows about the call it is serving.

    Passed as the second positional argument to handlers that declare one (or
    as the only argument when it is annotated ``Context``). Read-only; one per
    call; do not keep it after the handler returns.

    Attributes are properties: ``caller`` (the authenticated ``PeerInfo``),
    ``caller_node_id``, ``caller_name`` (from the worker's trust store),
    ``caller_address``, ``request_id``, ``deadline`` (event-loop time at which
    the call fails: the earlier of the caller's deadline and the handler's
    ``timeout_secs``; ``None`` if neither), ``handler_name``, ``metadata``,
    ``idempotency_key``, ``traceparent``, ``cancelled``, ``config``. :meth:`step`
    runs a step that a shared idempotency journal records and replays.
    """

    __slots__ = (
        "_call",
        "_config",
        "_deadline",
        "_encode",
        "_handler_name",
        "_loop",
        "_progress",
    )

    def __init__(
        self,
        *,
        call: IncomingCall,
        handler_name: str,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
        encode: Callable[[Any], Any] | None = None,
    ) -> None:
        self._call = call
        self._handler_name = handler_name
        self._deadline = deadline
        self._loop = loop
        self._encode = encode
        self._config: Mapping[str, Any] = _EMPTY_CONFIG
        self._progress: Callable[[Any], Awaitable[None]] | None = None

    def with_config(self, config: Mapping[str, Any]) -> Context:
        """A copy of this context whose :attr:`config` is ``config`` (for middleware).

        The copy serves the same call; the original is unchanged.
        """
        twin = Context(
            call=self._call,
            handler_name=self._handler_name,
            deadline=self._deadline,
            loop=self._loop,
            encode=self._encode,
        )
        twin._config = config
        twin._progress = self._progress
        return twin

    def with_progress(self, send: Callable[[Any], Awaitable[None]]) -> Context:
        """A copy whose :meth:`report_progress` awaits ``send(value)`` instead (for middleware).

        ``send`` gets the handler's value as it is (not encoded) and decides
        how it reaches the caller, e.g. between the items of a streaming call,
        where the RPC layer has no progress frames. The original is unchanged.
        """
        twin = self.with_config(self._config)
        twin._progress = send
        return twin

    @property
    def config(self) -> Mapping[str, Any]:
        """Framework configuration of the call, set by a middleware (empty by default).

        langgraph-pilot's worker puts the caller's LangChain ``RunnableConfig``
        here (tags, metadata, configurable, run name ...).
        """
        return self._config

    @property
    def caller(self) -> PeerLike:
        """The authenticated remote peer (``pilot_transport.PeerInfo``)."""
        return self._call.peer

    @property
    def caller_node_id(self) -> str:
        """Node id of the caller, derived from its authenticated public key."""
        return self._call.peer.node_id

    @property
    def caller_name(self) -> str | None:
        """The caller's name in this worker's trust store, if it has one."""
        return self._call.peer.name

    @property
    def caller_address(self) -> str | None:
        """The caller's Pilot address text, when the carrier knows it."""
        return self._call.peer.address

    @property
    def request_id(self) -> str:
        """The call's request id (also in the worker's log line for the call)."""
        return self._call.request_id

    @property
    def deadline(self) -> float | None:
        """Event-loop time (``loop.time()``) at which the call is failed, or ``None``."""
        return self._deadline

    def time_remaining(self) -> float | None:
        """Seconds left before :attr:`deadline` (may be negative), or ``None``."""
        if self._deadline is None:
            return None
        return self._deadline - self._loop.time()

    @property
    def handler_name(self) -> str:
        """Name of the handler being run."""
        return self._handler_name

    @property
    def metadata(self) -> Mapping[str, str]:
        """Caller-supplied metadata headers."""
        return self._call.metadata

    @property
    def idempotency_key(self) -> str | None:
        """The caller's idempotency key, if it sent one."""
        return self._call.idempotency_key

    @property
    def traceparent(self) -> str | None:
        """The caller's W3C ``traceparent`` header, if any."""
        return self._call.traceparent

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled or the deadline passed.

        Sync handlers cannot be interrupted; a long one should poll this.
        """
        if self._call.cancelled:
            return True
        remaining = self.time_remaining()
        return remaining is not None and remaining <= 0

    async def report_progress(self, value: Any) -> None:
        """Send a progress value to the caller (unary calls; ignored if unsupported).

        ``value`` goes through the worker's payload codec. Safe to call many
        times. Cancelling it cancels only the send. A middleware may route it
        elsewhere (:meth:`with_progress`).
        """
        if self._progress is not None:
            await self._progress(value)
            return
        encoded = self._encode(value) if self._encode is not None else value
        await self._call.send_progress(encoded)

    async def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (sync or async, no arguments) as the step ``name`` of this call.

        With a shared idempotency journal (``--idempotency-store``) and an
        ``idempotent=True`` handler called with an idempotency key, the step's
        result is recorded once ``fn`` returns; when the call is retried
        (on any worker of the pool, for example after this worker died), a
        recorded step returns its recorded result without running ``fn``
        again. Only a step that was running at the moment of a crash, or whose
        result was not yet recorded, can run twice. Without a journal, ``fn``
        simply runs. Step names must be unique within a call; results must be
        msgpack-encodable (a tuple is replayed as a list). For async handlers
        (a sync handler cannot await it).

        Raises:
            JournalError: a bad or repeated step name, or a result msgpack
                cannot encode (``fn`` ran but was not recorded).
            Whatever ``fn`` raises (a failed step is not recorded).

        Cancellation: cancelling while ``fn`` runs cancels ``fn``; once ``fn``
        returned, its result is recorded even if the call is cancelled.
        """
        return await run_step(name, fn)

    def report_progress_nowait(self, value: Any) -> None:
        """Thread-safe, fire-and-forget :meth:`report_progress` for sync handlers."""

        def _schedule() -> None:
            task = self._loop.create_task(self.report_progress(value))
            task.add_done_callback(_consume_exception)

        self._loop.call_soon_threadsafe(_schedule)

    def __repr__(self) -> str:
        return (
            f"Context(handler={self._handler_name!r}, caller={self.caller_node_id!r}, "
            f"request_id={self.request_id!r})"
        )


_EMPTY_CONFIG: Mapping[str, Any] = MappingProxyType({})


def _consume_exception(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
