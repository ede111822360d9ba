"""Per-thread run exclusion: a lease in the checkpoint store held around each run.

Theory of operation
-------------------
A checkpointer sees checkpoints, not runs: it cannot tell where a run ends. So
exclusion wraps the compiled graph: :func:`exclusive_runs` returns an object
whose ``invoke``/``ainvoke``/``stream``/``astream`` first take the thread's
lease from the store, keep it alive while the run goes on, and release it when
the run ends (returns, raises, is cancelled, or the stream is closed).

The lease is one row per thread in the store's database (``pilot_run_leases``),
so it holds across processes and machines using the same store. It names a
holder (host, pid and a random run token) and expires ``lease_ttl`` seconds
after its last renewal; a live run renews it every ``lease_ttl / 3`` seconds,
so only a holder that died (kill -9, lost machine, lost network) lets it
expire, and the next run then takes it over. The expiry time is measured on
the database's clock (PostgreSQL) or the store worker's (SQLite).

Policies, named as in LangGraph Server's ``multitask_strategy``:

* ``"reject"``: a run on a thread that is busy raises :class:`ThreadBusyError`
  at once, naming the holder; nothing is written.
* ``"enqueue"``: the run waits until the thread is free (polling the store
  with a capped backoff), at most ``enqueue_timeout`` seconds, then raises
  :class:`ThreadBusyTimeout`. Waiting runs are not served in arrival order.

The lease also records the run id (``config["run_id"]``). A call made with
``resume=True`` continues that run (LangGraph continues a run from the last
checkpoint stamped with its id) and may take over a *live* lease recorded for
the same, non-empty run id: the run's earlier attempt, typically on a worker
that was killed, whose lease would otherwise block the thread until it
expires. The holder name is unique per attempt and is the fencing token:
renewals go by it, so the displaced attempt, if it is in fact alive, is
refused at its next renewal. A lease of another run id (or of none) is never
taken while live.

If renewal finds the lease taken by another holder (this run stalled longer
than the TTL, or a resume of it took over), the run is no longer exclusive:
``ainvoke``/``astream``/``astream_events`` cancel the run at once (the
graph's running node sees ``CancelledError``) and raise
:class:`RunLeaseLostError`; the sync ``stream`` stops at its next item and
``invoke`` raises when the run returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from pilot_checkpoint_sqlite.errors import (
    CheckpointConfigError,
    CheckpointError,
    CheckpointProtocolError,
    CheckpointUsageError,
    RunLeaseLostError,
    ThreadBusyError,
    ThreadBusyTimeout,
)

if TYPE_CHECKING:
    from pilot_checkpoint_sqlite._saver import PilotCheckpointSaver

__all__ = ["ExclusiveRuns", "MultitaskStrategy", "ThreadLease", "exclusive_runs"]

logger = logging.getLogger("pilot_checkpoint_sqlite.lease")

MultitaskStrategy = Literal["reject", "enqueue"]
STRATEGIES: tuple[MultitaskStrategy, ...] = ("reject", "enqueue")

DEFAULT_LEASE_TTL = 30.0
DEFAULT_ENQUEUE_TIMEOUT = 300.0
MAX_LEASE_TTL = 3600.0
_POLL_FIRST = 0.05
_POLL_MAX = 1.0


@dataclass(frozen=True, slots=True)
class ThreadLease:
    """The state of a thread's run lease after an acquire or renew.

    Attributes:
        granted: The caller holds the lease now.
        holder: Who holds it (the caller when granted; else the other run).
        expires_in: Seconds until it expires unless renewed.
        run_id: The run id the lease was acquired for (``""``: none given,
            or a store of the previous release).
        took_over: On a granted resume, the live holder it displaced
            (``""`` when the lease was free, expired or already ours).
    """

    granted: bool
    holder: str
    expires_in: float
    run_id: str = ""
    took_over: str = ""


def lease_from_reply(reply: object, flag: str) -> ThreadLease:
    """Decode a ``lease_acquire``/``lease_renew`` reply (``flag``: its boolean key)."""
    if not isinstance(reply, dict):
        raise CheckpointProtocolError("a lease reply must be a mapping")
    r = cast(dict[str, Any], reply)
    granted, holder, expires_in = r.get(flag), r.get("holder"), r.get("expires_in")
    if (
        not isinstance(granted, bool)
        or not isinstance(holder, str)
        or isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
    ):
        raise CheckpointProtocolError(f"a lease reply is {{{flag}, holder, expires_in}}")
    run_id, took_over = r.get("run_id", ""), r.get("took_over", "")
    if not isinstance(run_id, str) or not isinstance(took_over, str):
        raise CheckpointProtocolError("a lease reply's run_id and took_over are strings")
    return ThreadLease(
        granted=granted,
        holder=holder,
        expires_in=float(expires_in),
        run_id=run_id,
        took_over=took_over,
    )


def _run_of(config: object) -> str | None:
    run_id = config.get("run_id") if isinstance(config, Mapping) else None
    return str(cast(object, run_id)) if run_id is not None and run_id != "" else None


def _holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:16]}"


def _thread_of(config: object) -> str:
    configurable = config.get("configurable") if isinstance(config, Mapping) else None
    thread_id = (
        cast(Mapping[str, Any], configurable).get("thread_id")
        if isinstance(configurable, Mapping)
        else None
    )
    if thread_id is None or thread_id == "":
        raise CheckpointUsageError(
            "an exclusive run needs config['configurable']['thread_id'] (the thread to lock)"
        )
    return str(thread_id)


def _busy(thread_id: str, lease: ThreadLease) -> ThreadBusyError:
    return ThreadBusyError(
        f"thread {thread_id!r} is busy: a run held by {lease.holder!r} is in progress "
        f"(its lease expires in {lease.expires_in:.1f}s unless renewed); "
        "multitask_strategy='reject' refuses a second concurrent run "
        "(use 'enqueue' to wait for it)",
        thread_id=thread_id,
        holder=lease.holder,
        expires_in=lease.expires_in,
    )


def _timed_out(thread_id: str, lease: ThreadLease, waited: float) -> ThreadBusyTimeout:
    return ThreadBusyTimeout(
        f"thread {thread_id!r} stayed busy for {waited:.1f}s (held by {lease.holder!r}); "
        "the enqueued run gave up (enqueue_timeout)",
        thread_id=thread_id,
        holder=lease.holder,
        expires_in=lease.expires_in,
    )


def _next_poll(delay: float, lease: ThreadLease, remaining: float) -> tuple[float, float]:
    # Jittered capped backoff, never past the deadline; no sooner than needed
    # when the holder's lease is about to run out.
    wait = min(delay * (0.5 + random.random() / 2), max(lease.expires_in, _POLL_FIRST))
    return max(0.0, min(wait, remaining)), min(delay * 2, _POLL_MAX)


def _lost(thread_id: str, holder: str) -> RunLeaseLostError:
    return RunLeaseLostError(
        f"the run on thread {thread_id!r} lost its lease (it went unrenewed past its TTL "
        f"and another run took it; this run was {holder!r}): the run was not exclusive "
        "for all of its duration"
    )


class _SyncHeartbeat:
    """Renews a lease from a thread of its own while a sync run goes on."""

    def __init__(
        self, saver: PilotCheckpointSaver, thread_id: str, holder: str, ttl: float
    ) -> None:
        self.lost = False
        self._saver, self._thread_id, self._holder, self._ttl = saver, thread_id, holder, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pilot-run-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                lease = self._saver.renew_thread_lease(self._thread_id, self._holder, self._ttl)
            except CheckpointError as exc:
                logger.warning("renewing the run lease of %r failed: %s", self._thread_id, exc)
                continue
            if not lease.granted:
                self.lost = True
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def _async_heartbeat(
    saver: PilotCheckpointSaver, thread_id: str, holder: str, ttl: float, lost: asyncio.Event
) -> None:
    while True:
        await asyncio.sleep(ttl / 3)
        try:
            lease = await saver.arenew_thread_lease(thread_id, holder, ttl)
        except CheckpointError as exc:
            logger.warning("renewing the run lease of %r failed: %s", thread_id, exc)
            continue
        if not lease.granted:
            lost.set()
            return


class ExclusiveRuns:
    """A compiled graph whose runs hold their thread's lease (see :func:`exclusive_runs`).

    ``invoke``, ``ainvoke``, ``stream``, ``astream`` and ``astream_events``
    take the same arguments as the graph's, plus an optional
    ``multitask_strategy=`` that overrides the default for one call. Every
    other attribute (``get_state``, ``update_state``, ``get_state_history``...)
    is the graph's own; ``batch``/``abatch`` pass through without a lease.
    """

    def __init__(
        self,
        app: Any,
        saver: PilotCheckpointSaver,
        *,
        multitask_strategy: MultitaskStrategy,
        lease_ttl: float,
        enqueue_timeout: float,
    ) -> None:
        self.app = app
        self.saver = saver
        self.multitask_strategy = _strategy(multitask_strategy)
        self.lease_ttl = lease_ttl
        self.enqueue_timeout = enqueue_timeout
        self.takeovers = 0
        """Live leases this wrapper's resumed runs took over (see ``resume=``)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    # ------------------------------------------------------------ acquire

    def _acquire(
        self,
        thread_id: str,
        strategy: MultitaskStrategy | None,
        run_id: str | None = None,
        resume: bool = False,
    ) -> str:
        policy = _strategy(strategy) if strategy is not None else self.multitask_strategy
        holder = _holder_name()
        started = time.monotonic()
        delay = _POLL_FIRST
        while True:
            lease = self.saver.acquire_thread_lease(
                thread_id, holder, self.lease_ttl, run_id=run_id, resume=resume
            )
            if lease.granted:
                _log_takeover(thread_id, run_id, lease)
                self.takeovers += bool(lease.took_over)
                return holder
            if policy == "reject":
                raise _busy(thread_id, lease)
            waited = time.monotonic() - started
            remaining = self.enqueue_timeout - waited
            if remaining <= 0:
                raise _timed_out(thread_id, lease, waited)
            pause, delay = _next_poll(delay, lease, remaining)
            time.sleep(pause)

    async def _aacquire(
        self,
        thread_id: str,
        strategy: MultitaskStrategy | None,
        run_id: str | None = None,
        resume: bool = False,
    ) -> str:
        policy = _strategy(strategy) if strategy is not None else self.multitask_strategy
        holder = _holder_name()
        started = time.monotonic()
        delay = _POLL_FIRST
        while True:
            lease = await self.saver.aacquire_thread_lease(
                thread_id, holder, self.lease_ttl, run_id=run_id, resume=resume
            )
            if lease.granted:
                _log_takeover(thread_id, run_id, lease)
                self.takeovers += bool(lease.took_over)
                return holder
            if policy == "reject":
                raise _busy(thread_id, lease)
            waited = time.monotonic() - started
            remaining = self.enqueue_timeout - waited
            if remaining <= 0:
                raise _timed_out(thread_id, lease, waited)
            pause, delay = _next_poll(delay, lease, remaining)
            await asyncio.sleep(pause)

    def _release(self, thread_id: str, holder: str) -> None:
        try:
            self.saver.release_thread_lease(thread_id, holder)
        except CheckpointError as exc:  # it expires on its own after the TTL
            logger.warning("releasing the run lease of %r failed: %s", thread_id, exc)

    async def _arelease(self, thread_id: str, holder: str) -> None:
        try:
            await self.saver.arelease_thread_lease(thread_id, holder)
        except CheckpointError as exc:
            logger.warning("releasing the run lease of %r failed: %s", thread_id, exc)

    # ------------------------------------------------------------ runs

    def invoke(
        self,
        input: Any,
        config: Any = None,
        *,
        multitask_strategy: MultitaskStrategy | None = None,
        resume: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run the graph with the thread's lease held (``app.invoke``).

        The lease records the run id (``config["run_id"]``). With
        ``resume=True`` the call resumes that run: a live lease held for the
        same run id (its earlier attempt) is taken over at once instead of
        waited for; the earlier attempt's next renewal fails and it stops
        (:class:`RunLeaseLostError`). A lease held for another run id is
        never taken while it is live.

        Raises:
            ThreadBusyError: ``reject`` and another run holds the thread.
            ThreadBusyTimeout: ``enqueue`` and the thread stayed busy too long.
            RunLeaseLostError: the lease was taken over while the run went on.
            CheckpointUsageError: no ``thread_id`` in ``config``.
        """
        thread_id = _thread_of(config)
        holder = self._acquire(thread_id, multitask_strategy, _run_of(config), resume)
        beat = _SyncHeartbeat(self.saver, thread_id, holder, self.lease_ttl)
        try:
            result = self.app.invoke(input, config, **kwargs)
        finally:
            beat.stop()
            self._release(thread_id, holder)
        if beat.lost:
            raise _lost(thread_id, holder)
        return result

    async def ainvoke(
        self,
        input: Any,
        config: Any = None,
        *,
        multitask_strategy: MultitaskStrategy | None = None,
        resume: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Async twin of :meth:`invoke`. Cancelling it cancels the run and releases the lease.

        A lost lease cancels the run at once (not only when it returns) and
        raises :class:`RunLeaseLostError`.
        """
        thread_id = _thread_of(config)
        holder = await self._aacquire(thread_id, multitask_strategy, _run_of(config), resume)
        lost = asyncio.Event()
        beat = asyncio.create_task(
            _async_heartbeat(self.saver, thread_id, holder, self.lease_ttl, lost)
        )
        try:
            result = await _unless_lost(_call(self.app.ainvoke, input, config, kwargs), lost)
        except _LeaseLost:
            raise _lost(thread_id, holder) from None
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            await self._arelease(thread_id, holder)
        if lost.is_set():
            raise _lost(thread_id, holder)
        return result

    def stream(
        self,
        input: Any,
        config: Any = None,
        *,
        multitask_strategy: MultitaskStrategy | None = None,
        resume: bool = False,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """``app.stream`` with the lease held until the stream ends or is closed.

        The lease is taken when iteration starts. Raises as :meth:`invoke`;
        a lost lease stops the stream at its next item.
        """
        thread_id = _thread_of(config)
        holder = self._acquire(thread_id, multitask_strategy, _run_of(config), resume)
        beat = _SyncHeartbeat(self.saver, thread_id, holder, self.lease_ttl)
        try:
            for item in self.app.stream(input, config, **kwargs):
                if beat.lost:
                    raise _lost(thread_id, holder)
                yield item
        finally:
            beat.stop()
            self._release(thread_id, holder)
        if beat.lost:
            raise _lost(thread_id, holder)

    def astream(
        self,
        input: Any,
        config: Any = None,
        *,
        multitask_strategy: MultitaskStrategy | None = None,
        resume: bool = False,
        **kwargs: Any,
    ) -> AsyncGenerator[Any]:
        """Async twin of :meth:`stream` (``aclose()`` ends the run and frees the thread).

        A lost lease stops the run at once, even in the middle of a step: the
        pending item is cancelled (so is the graph's running node) and the
        stream raises :class:`RunLeaseLostError`.
        """
        return self._alocked(
            _thread_of(config),
            multitask_strategy,
            self.app.astream(input, config, **kwargs),
            _run_of(config),
            resume,
        )

    def astream_events(
        self,
        input: Any,
        config: Any = None,
        *,
        multitask_strategy: MultitaskStrategy | None = None,
        resume: bool = False,
        **kwargs: Any,
    ) -> AsyncGenerator[Any]:
        """``app.astream_events`` with the lease held, as :meth:`astream`."""
        return self._alocked(
            _thread_of(config),
            multitask_strategy,
            self.app.astream_events(input, config, **kwargs),
            _run_of(config),
            resume,
        )

    async def _alocked(
        self,
        thread_id: str,
        strategy: MultitaskStrategy | None,
        items: AsyncIterator[Any],
        run_id: str | None,
        resume: bool,
    ) -> AsyncGenerator[Any]:
        holder = await self._aacquire(thread_id, strategy, run_id, resume)
        lost = asyncio.Event()
        beat = asyncio.create_task(
            _async_heartbeat(self.saver, thread_id, holder, self.lease_ttl, lost)
        )
        try:
            run_context = contextvars.copy_context()
            while True:
                try:
                    item = await _unless_lost(_next_item(items), lost, run_context)
                except StopAsyncIteration:
                    break
                except _LeaseLost:
                    raise _lost(thread_id, holder) from None
                yield item
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()
            await self._arelease(thread_id, holder)
        if lost.is_set():
            raise _lost(thread_id, holder)


async def _call(fn: Any, input: Any, config: Any, kwargs: dict[str, Any]) -> Any:
    return await fn(input, config, **kwargs)


async def _next_item(items: AsyncIterator[Any]) -> Any:
    return await items.__anext__()


class _LeaseLost(Exception):
    """Internal: the heartbeat found the lease taken while the run was waited for."""


async def _unless_lost(
    step: Coroutine[Any, Any, Any],
    lost: asyncio.Event,
    context: contextvars.Context | None = None,
) -> Any:
    """Await ``step``; if the lease is lost first, cancel it and raise :class:`_LeaseLost`.

    ``step`` runs as a task (in ``context`` when given, so the steps of one
    async generator share their context variables). It is always finished
    before this returns or raises, also when the caller is cancelled.
    """
    task = asyncio.get_running_loop().create_task(step, context=context)
    watcher = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if not task.cancelled():
        return task.result()
    if lost.is_set():
        raise _LeaseLost
    return task.result()  # cancelled by someone else: re-raises CancelledError


def _log_takeover(thread_id: str, run_id: str | None, lease: ThreadLease) -> None:
    if lease.took_over:
        logger.warning(
            "run %s took over the lease of thread %r from %r (a resume of the same run; "
            "that holder's next renewal fails and it stops)",
            run_id,
            thread_id,
            lease.took_over,
        )


def _strategy(value: object) -> MultitaskStrategy:
    if value == "reject":
        return "reject"
    if value == "enqueue":
        return "enqueue"
    raise CheckpointConfigError(
        f"multitask_strategy must be one of {STRATEGIES}, got {value!r} "
        "(LangGraph Server's 'interrupt' and 'rollback' are not supported)"
    )


def exclusive_runs(
    app: Any,
    saver: PilotCheckpointSaver,
    *,
    multitask_strategy: MultitaskStrategy = "reject",
    lease_ttl: float = DEFAULT_LEASE_TTL,
    enqueue_timeout: float = DEFAULT_ENQUEUE_TIMEOUT,
) -> ExclusiveRuns:
    """Wrap a compiled graph so at most one run per thread goes on at a time.

    Every run takes the thread's lease in the checkpoint store first, so the
    exclusion holds across processes and machines sharing the store (with a
    store scoped per caller, across the processes of one identity; use
    ``--checkpoint-shared true`` for several identities). Example::

        saver = PilotCheckpointSaver(peer="state-worker")
        app = exclusive_runs(graph.compile(checkpointer=saver), saver)
        app.invoke(inputs, {"configurable": {"thread_id": "t1"}})

    Args:
        app: The compiled graph (anything with LangGraph's run methods).
        saver: The saver whose store keeps the leases (normally the graph's
            checkpointer).
        multitask_strategy: ``"reject"`` (default) or ``"enqueue"``, as in
            LangGraph Server.
        lease_ttl: Seconds a lease outlives its holder's last renewal (default
            30; renewed every third of it). A crashed holder blocks its
            thread for at most this long.
        enqueue_timeout: Most seconds an enqueued run waits (default 300).

    Raises:
        CheckpointConfigError: an unknown strategy or a bad number.
    """
    for name, value, top in (
        ("lease_ttl", lease_ttl, MAX_LEASE_TTL),
        ("enqueue_timeout", enqueue_timeout, math.inf),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)  # pyright: ignore[reportUnnecessaryIsInstance]
            or not 0 < value <= top
        ):
            raise CheckpointConfigError(f"{name} must be a positive number (at most {top})")
    return ExclusiveRuns(
        app,
        saver,
        multitask_strategy=multitask_strategy,
        lease_ttl=float(lease_ttl),
        enqueue_timeout=float(enqueue_timeout),
    )
