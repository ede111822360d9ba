"""The call pipeline: one path from a call's arrival to its answer.

Every call, unary or streaming, sync or async, with or without middleware,
runs the same steps::

    arrival
      -> draining?            UNAVAILABLE         reason "draining" (retry-safe: nothing ran)
      -> ACL                  PERMISSION_DENIED   reason "acl"
      -> rate_per_caller      RESOURCE_EXHAUSTED  reason "rate_limit" (+ retry_after_secs)
      -> codec.decode         INVALID_ARGUMENT    reason "invalid_argument"
      -> idempotency cache    stored result replayed / wait for the running twin
      -> max_concurrent gate  RESOURCE_EXHAUSTED  reason "concurrency_limit" | "queue_full"
      -> deadline = min(caller deadline, arrival + timeout_secs)
      -> middleware, outer first, then the innermost step (:meth:`CallPipeline._invoke`):
           input_model        INVALID_ARGUMENT    reason "invalid_argument" (+ errors)
           handler            (sync: pool thread; async: loop; async gen: stream)
           output_model       INTERNAL            reason "invalid_output" (+ errors)
      -> codec.encode         INTERNAL            reason "encode_failed"
    deadline passed anywhere after arrival: DEADLINE_EXCEEDED reason "timeout"
    handler raised a non-RpcError: INTERNAL reason "handler_error" (+ type)

Validation happens once, in ``_invoke``, whatever the codec built: a payload
that is a pydantic model instance (a typed codec may build one without
validating it) is validated from its field values like a plain mapping.

The output check validates against ``output_model`` but hands the handler's
own object to the codec, which decides the encoding (the default codec dumps
pydantic models to JSON-shaped data; the LangGraph codec keeps the type).

Deadlines hold whatever the handler does. When pilot-rpc enforces the
caller's deadline the handler runs inline on the call's task; when the
handler's own ``timeout_secs`` is the earlier bound (or offline) it runs in a
child task and the call is answered ``DEADLINE_EXCEEDED`` at the deadline even
if the handler catches its cancellation. On the inline path the caller's
client fails the call at its own deadline; pilot-rpc never sends ``OK`` for a
cancelled call, and the worker records it as ``DEADLINE_EXCEEDED`` (or
``CANCELLED``), not ``OK``, when the handler returns anyway. A handler that keeps running after
its call was answered (async code that swallows cancellation, a sync function
on its thread) keeps its concurrency slot until it really returns; it is
logged and counted in ``pilot_worker_deadline_overruns_total``, and its
result is discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import traceback
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import CoroutineType
from typing import Any

from opentelemetry import trace
from pilot_rpc import (
    CallContext,
    DeadlineExceeded,
    ErrorInfo,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    RpcError,
    Unavailable,
)
from pilot_transport import PeerInfo
from pydantic import BaseModel, ValidationError

from pilot_worker._call import IncomingCall
from pilot_worker._codec import IdentityCodec, PayloadCodec
from pilot_worker._context import Context
from pilot_worker._handler import CallStyle, HandlerKind
from pilot_worker._limits import ConcurrencyGate, GateFull
from pilot_worker._pool import SyncPool
from pilot_worker._recording import NO_SPAN, CallRecorder
from pilot_worker._registry import HandlerEntry, HandlerRegistry
from pilot_worker._slots import Running, release_when_done
from pilot_worker._steps import IdempotencyStore

__all__ = ["CallNext", "CallPipeline", "Middleware"]

CallNext = Callable[[Any, Context], Awaitable[Any]]
"""``await call_next(payload, ctx)`` runs the rest of the chain (for a streaming
handler it returns the async iterator of items)."""

Middleware = Callable[[Any, Context, CallNext], Any]
"""``(payload, ctx, call_next) -> result``, sync or async. Sync middleware runs
on the event loop (keep it quick) and may return ``call_next(...)`` unawaited."""

handler_logger = logging.getLogger("pilot_worker.handlers")

_WIRE_TYPES = frozenset({dict, list, str, int, float, bool, bytes, type(None), tuple})
_NO_SPAN: trace.Span = trace.INVALID_SPAN


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors as wire-safe mappings: ``loc`` (list of str), ``msg``, ``type``."""
    return [
        {"loc": [str(part) for part in err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False)
    ]


class CallPipeline:
    """Runs calls for the entries of a :class:`HandlerRegistry`.

    Args:
        registry: Where handlers and their limiters live.
        codec: The payload codec.
        pool: Threads for sync handlers.
        idempotency: Stored results of idempotent handlers.
        recorder: Spans, metrics and the call log.
        include_tracebacks: Put handler tracebacks in ``INTERNAL`` details.
    """

    def __init__(
        self,
        registry: HandlerRegistry,
        *,
        codec: PayloadCodec,
        pool: SyncPool,
        idempotency: IdempotencyStore,
        recorder: CallRecorder,
        include_tracebacks: bool,
    ) -> None:
        self._registry = registry
        self._codec = codec
        # The default codec is inlined (no call per value); a subclass is not.
        self._identity_codec = type(codec) is IdentityCodec
        # A codec's own control messages (PayloadCodec.is_control) skip output_model.
        is_control: Any = getattr(codec, "is_control", None)
        self._is_control: Callable[[Any], Any] | None = is_control if callable(is_control) else None
        self._pool = pool
        self._idempotency = idempotency
        self._recorder = recorder
        self.accepting = True
        """False once the worker drains: new calls get ``UNAVAILABLE``."""
        self._include_tracebacks = include_tracebacks
        self.middleware: tuple[Middleware, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._detached: set[asyncio.Future[Any]] = set()

    # ------------------------------------------------------------- the binding

    def method_for(self, entry: HandlerEntry) -> Callable[..., Any]:
        """The pilot-rpc method that serves ``entry``."""
        if entry.spec.kind is HandlerKind.SERVER_STREAMING:

            async def streaming(request: Any, call: IncomingCall) -> AsyncIterator[Any]:
                async for item in self.stream(entry, request, call):
                    yield item

            return streaming
        # A partial, not a closure: one coroutine frame less per call.
        return functools.partial(self.unary, entry)

    @property
    def overrunning(self) -> int:
        """Handlers still running after their call was answered (async child tasks)."""
        return sum(1 for fut in self._detached if not fut.done())

    async def wait_overrunning(self) -> None:
        """Wait until every handler still running after its answer has returned."""
        while self._detached:
            await asyncio.wait(set(self._detached))

    def cancel_overrunning(self) -> None:
        """Cancel (again) every async handler still running after its answer."""
        for fut in self._detached:
            fut.cancel()

    # ------------------------------------------------------------------ unary

    async def unary(self, entry: HandlerEntry, request: Any, call: IncomingCall) -> Any:
        """Run one unary call through the pipeline; return the encoded result.

        Raises:
            pilot_rpc.RpcError: The subclass the caller receives.
        """
        spec = entry.spec
        recorder = self._recorder
        start = self._loop_time()
        node_id = call.peer.node_id
        code = "OK"
        reason: str | None = None
        message: str | None = None
        span, token = recorder.start_span(spec.name, call, node_id, start)
        end: float | None = None
        try:
            self._admit(entry, node_id, start)
            payload = request if self._identity_codec else self._decode(entry, request)
            deadline = call.deadline
            if spec.timeout_secs is not None:
                own = start + spec.timeout_secs
                if deadline is None or own < deadline:
                    deadline = own
            if spec.idempotent and call.idempotency_key:
                result, replayed = await self._idempotency.run(
                    (spec.name, node_id, call.idempotency_key),
                    # Own timer kept: a twin waiting on this run gets its timeout error
                    # (a cancelled run would hand the work over to the twin instead).
                    lambda: self._run_unary(entry, payload, call, deadline, shorten=False),
                    deadline=deadline,
                )
                if replayed:
                    entry.stats.replays += 1
            else:
                result = await self._run_unary(entry, payload, call, deadline)
            if call.cancelled:
                # pilot-rpc cancelled this task (the caller's deadline, or the caller
                # gave up) and the handler caught that and returned anyway.
                raise self._swallowed(entry, call, deadline)
            end = self._loop_time()
            return result
        except RpcError as exc:
            code, message = exc.code.name, exc.message
            reason = _attach_info(exc)
            raise
        except asyncio.CancelledError:
            code = self._cancel_code(call)
            if code == "DEADLINE_EXCEEDED":
                reason = "timeout"
            raise
        except Exception as exc:
            err = self._internal(entry, exc)
            code, message, reason = "INTERNAL", err.message, "handler_error"
            raise err from exc
        finally:
            if end is None:
                end = self._loop_time()
            recorder.record(entry, call, code, reason, message, end - start, span, token)

    async def _run_unary(
        self,
        entry: HandlerEntry,
        payload: Any,
        call: IncomingCall,
        deadline: float | None,
        *,
        shorten: bool = True,
    ) -> Any:
        gate = entry.gate
        if gate is not None and not gate.try_acquire():
            await self._wait_for_slot(entry, gate, call, deadline)
        entry.stats.in_flight += 1
        # Only a sync thread or a child task can outlive the call.
        running = Running() if entry.spec.style is CallStyle.SYNC else None
        try:
            ctx = self._context(entry, call, deadline)
            timer = self._timer_deadline(call, deadline)
            shortened = (
                shorten
                and timer is not None
                and isinstance(call, CallContext)
                and call.shorten_deadline(timer, self._timeout_error(entry, call, timer))
            )
            if shortened:
                # pilot-rpc now answers at the handler's own deadline too, and cancels
                # this task then: no timer task of ours.
                timer = None
            if timer is None:
                # pilot-rpc cancels this task at the call's deadline.
                try:
                    if self.middleware:
                        result = await self._run_chain(entry, payload, ctx, running)
                    else:
                        result = await self._invoke(entry, payload, ctx, running)
                except Exception:
                    if shortened and running is None and call.cancelled:
                        raise self._overran(entry, call, deadline) from None
                    raise
                if shortened and running is None and call.cancelled:
                    raise self._overran(entry, call, deadline)
            else:
                if running is None:
                    running = Running()
                result = await self._run_detachable(entry, payload, ctx, running, call, deadline)
            if (
                self._identity_codec
                and entry.output_adapter is None
                and result.__class__ in _WIRE_TYPES
            ):
                return result  # the common case, without a call
            return self._encode(entry, result)
        except (RpcError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self._internal(entry, exc) from exc
        finally:
            if running is None:
                entry.stats.in_flight -= 1
                if gate is not None:
                    gate.release()
            else:
                self._release_slot(entry, running, deadline)

    async def _run_detachable(
        self,
        entry: HandlerEntry,
        payload: Any,
        ctx: Context,
        running: Running,
        call: IncomingCall,
        deadline: float | None,
    ) -> Any:
        """Run the chain in a child task and answer at ``deadline`` whatever it does."""
        task = asyncio.ensure_future(self._run_chain(entry, payload, ctx, running))
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(task)
        except TimeoutError:
            if task.done() and not task.cancelled():
                # Finished in the same loop step as the timer: that outcome stands.
                return task.result()
            task.cancel()
            raise self._deadline_error(entry, call, deadline, "while running") from None
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            if not task.done():
                # Still running: it keeps the call's slot until it really ends.
                running.task = task
                self._detached.add(task)
                task.add_done_callback(self._detached.discard)

    def _overran(self, entry: HandlerEntry, call: IncomingCall, deadline: float | None) -> RpcError:
        """An async handler ended (returned or raised) after its call was answered.

        Logged and counted as the worker's own deadline enforcement always
        has (``pilot_worker_deadline_overruns_total``); its outcome is discarded.
        """
        now = self._loop_time()
        timed_out = deadline is not None and now >= deadline
        entry.stats.overruns += 1
        handler_logger.warning(
            "handler %r kept running %.3fs after its call was answered %s; its result is discarded",
            entry.spec.name,
            now - deadline if deadline is not None and timed_out else 0.0,
            "DEADLINE_EXCEEDED (past its deadline)" if timed_out else "CANCELLED",
        )
        if timed_out:
            return self._deadline_error(entry, call, deadline, "while running", by_caller=False)
        from pilot_rpc import Cancelled

        return Cancelled("the call was cancelled", details={"reason": "cancelled"})

    def _timeout_error(
        self, entry: HandlerEntry, call: IncomingCall, deadline: float
    ) -> Callable[[], RpcError]:
        """What pilot-rpc answers at the handler's own deadline (built only then)."""

        def make() -> RpcError:
            err = self._deadline_error(entry, call, deadline, "while running", by_caller=False)
            _attach_info(err)
            return err

        return make

    def _swallowed(
        self, entry: HandlerEntry, call: IncomingCall, deadline: float | None
    ) -> RpcError:
        """The handler returned on a call that was cancelled: it caught its cancellation.

        Counted as an overrun whatever ended the call (its deadline, or the
        caller giving up, typically at its own deadline): the handler ran on
        after its answer. Never an ``OK``.
        """
        entry.stats.overruns += 1
        handler_logger.warning(
            "handler %r ignored its cancellation and returned after its call had ended; "
            "its result is discarded",
            entry.spec.name,
        )
        if deadline is not None and self._loop_time() >= deadline:
            return self._deadline_error(entry, call, deadline, "after the deadline")
        from pilot_rpc import Cancelled

        return Cancelled("the call was cancelled", details={"reason": "cancelled"})

    # --------------------------------------------------------------- streaming

    async def stream(
        self, entry: HandlerEntry, request: Any, call: IncomingCall
    ) -> AsyncGenerator[Any, None]:
        """Run a server-streaming call through the pipeline, yielding encoded items.

        ``timeout_secs`` bounds the whole stream. Closing the iterator early
        closes the handler's generator.

        Raises:
            pilot_rpc.RpcError: The subclass the caller receives.
        """
        spec = entry.spec
        recorder = self._recorder
        start = now = self._loop_time()
        node_id = call.peer.node_id
        code = "OK"
        reason: str | None = None
        message: str | None = None
        span, token = recorder.start_span(spec.name, call, node_id, start)
        # The span must not stay attached across yields (the consumer may close
        # this generator from another context): detach now, re-enter per step.
        end_token: object | None = token
        traced = span is not _NO_SPAN
        acquired = False
        deadline: float | None = None
        source: Any = None
        try:
            self._admit(entry, node_id, now)
            payload = self._decode(entry, request)
            deadline = self._deadline(entry, call, now)
            await self._acquire_slot(entry, call, deadline)
            acquired = True
            ctx = self._context(entry, call, deadline)
            timer = self._timer_deadline(call, deadline)
            timeout = asyncio.timeout_at(timer)
            try:
                async with timeout:
                    source = await self._run_chain(entry, payload, ctx, None)
            except TimeoutError:
                if timeout.expired():
                    raise self._deadline_error(entry, call, deadline, "while starting") from None
                raise
            if not hasattr(source, "__anext__"):
                if hasattr(source, "__aiter__"):
                    source = source.__aiter__()
                else:
                    raise Internal(
                        f"{spec.name!r}: the middleware chain returned "
                        f"{type(source).__name__}, not an async iterator",
                        details={"reason": "handler_error"},
                    )
            recorder.detach(end_token)
            end_token = None
            while True:
                step = asyncio.timeout_at(timer)
                try:
                    if traced:
                        with trace.use_span(span, end_on_exit=False):
                            async with step:
                                item = await source.__anext__()
                    else:
                        async with step:
                            item = await source.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if step.expired():
                        raise self._deadline_error(
                            entry, call, deadline, "while streaming"
                        ) from None
                    raise
                if step.expired() or call.cancelled:
                    # The generator caught its cancellation and produced an item anyway.
                    raise self._swallowed(entry, call, deadline)
                if entry.output_adapter is not None and not (
                    self._is_control is not None and self._is_control(item)
                ):
                    item = self._check_output(entry, item)
                yield self._encode(entry, item)
        except RpcError as exc:
            code, message = exc.code.name, exc.message
            reason = _attach_info(exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = self._cancel_code(call)
            raise
        except Exception as exc:
            err = self._internal(entry, exc)
            code, message, reason = "INTERNAL", err.message, "handler_error"
            raise err from exc
        finally:
            if source is not None and hasattr(source, "aclose"):
                with contextlib.suppress(Exception):
                    await source.aclose()
            if acquired:
                self._release_slot(entry, None, deadline)
            recorder.record(
                entry, call, code, reason, message, self._loop_time() - start, span, end_token
            )

    # ------------------------------------------------------------- the steps

    def authorize(self, method: str, peer: PeerInfo) -> None:
        """pilot-rpc's first-piece hook: refuse a call the peer's ACL does not allow.

        Runs before pilot-rpc buffers any of the request, so a peer cannot pin
        memory with calls it may not make. The refusal is counted and logged
        like any other call (status ``PERMISSION_DENIED``, reason ``acl``).
        An unknown method is left to pilot-rpc (it answers ``NOT_FOUND``).

        Raises:
            pilot_rpc.PermissionDenied: ``peer`` may not call ``method``.
        """
        entry = self._registry.entries.get(method)
        if entry is None or self._registry.allows(entry, peer.node_id):
            return
        entry.stats.reject("acl")
        err = PermissionDenied(
            f"node {peer.node_id} is not allowed to call {method!r}",
            details={"reason": "acl", "handler": method},
            info=ErrorInfo("ACL_DENIED", "pilot-worker", {"handler": method}),
        )
        refused = _RefusedCall(peer, f"refused-{next(_refused_ids)}")
        self._recorder.record(entry, refused, "PERMISSION_DENIED", "acl", err.message, 0.0,
                              NO_SPAN, None)  # fmt: skip
        raise err

    def _admit(self, entry: HandlerEntry, node_id: str, now: float) -> None:
        spec = entry.spec
        if not self.accepting:
            entry.stats.reject("draining")
            raise Unavailable(
                "the worker is draining and accepts no new calls",
                details={"reason": "draining"},
                retry_safe=True,
            )
        allowed = entry.allow_set
        if (node_id not in allowed) if allowed is not None else not entry.open_to_all:
            entry.stats.reject("acl")
            raise PermissionDenied(
                f"node {node_id} is not allowed to call {spec.name!r}",
                details={"reason": "acl", "handler": spec.name},
            )
        if entry.rate is not None:
            retry_after = entry.rate.try_acquire(node_id, now)
            if retry_after is not None:
                entry.stats.reject("rate_limit")
                raise ResourceExhausted(
                    f"rate limit of {spec.rate_per_caller} calls per {spec.rate_window_secs:g}s "
                    f"for {spec.name!r} reached",
                    details={
                        "reason": "rate_limit",
                        "handler": spec.name,
                        "limit": spec.rate_per_caller,
                        "window_secs": spec.rate_window_secs,
                        "retry_after_secs": round(retry_after, 3),
                    },
                )

    def _decode(self, entry: HandlerEntry, request: Any) -> Any:
        if self._identity_codec:
            return request
        try:
            return self._codec.decode_request(request)
        except RpcError:
            raise
        except Exception as exc:
            entry.stats.reject("invalid_argument")
            raise InvalidArgument(
                f"cannot decode the request for {entry.spec.name!r}: {exc}",
                details={"reason": "invalid_argument", "type": type(exc).__name__},
            ) from exc

    def _validate_input(self, entry: HandlerEntry, payload: Any) -> Any:
        adapter = entry.input_adapter
        if adapter is None:
            return payload
        try:
            if isinstance(payload, BaseModel):
                # A codec may build a model without validating it (model_construct):
                # validate its field values, as if they had come as a mapping.
                fields = payload.model_dump(round_trip=True, warnings=False)
                return adapter.validate_python(fields)
            return adapter.validate_python(payload)
        except ValidationError as exc:
            entry.stats.reject("invalid_argument")
            raise InvalidArgument(
                f"invalid payload for {entry.spec.name!r}: {exc.error_count()} validation error(s)",
                details={"reason": "invalid_argument", "errors": validation_details(exc)},
            ) from None

    def _check_output(self, entry: HandlerEntry, result: Any) -> Any:
        """Validate ``result`` against ``output_model``; return what the codec gets.

        A custom codec gets the handler's own object; the default codec gets
        the validated value (it dumps it with the declared type).
        """
        adapter = entry.output_adapter
        if adapter is None:
            return result
        try:
            validated = adapter.validate_python(result)
        except ValidationError as exc:
            raise Internal(
                f"{entry.spec.name!r} returned a value that does not match its output_model: "
                f"{exc.error_count()} validation error(s)",
                details={"reason": "invalid_output", "errors": validation_details(exc)},
            ) from None
        return validated if self._identity_codec else result

    def _encode(self, entry: HandlerEntry, value: Any) -> Any:
        try:
            if self._identity_codec:
                adapter = entry.output_adapter
                if adapter is None:
                    if value.__class__ in _WIRE_TYPES:  # the common case, no call
                        return value
                    return self._codec.encode_response(value)
                return adapter.dump_python(value, mode="json", warnings=False)
            return self._codec.encode_response(value)
        except RpcError:
            raise
        except Exception as exc:
            raise Internal(
                f"cannot encode the result of {entry.spec.name!r}: {exc}",
                details={"reason": "encode_failed", "type": type(exc).__name__},
            ) from exc

    async def _invoke(
        self, entry: HandlerEntry, payload: Any, ctx: Context, running: Running | None
    ) -> Any:
        """Innermost step: validate input, run the function, check the output."""
        spec = entry.spec
        if entry.input_adapter is not None:
            payload = self._validate_input(entry, payload)
        args: tuple[Any, ...]
        if spec.takes_payload:
            args = (payload, ctx) if spec.takes_context else (payload,)
        else:
            args = (ctx,) if spec.takes_context else ()
        style = spec.style
        if style is CallStyle.ASYNC:
            result = await spec.fn(*args)
        elif style is CallStyle.SYNC:
            await self._pool.acquire()
            future = self._pool.start(spec.fn, *args)
            if running is not None:
                running.thread = future
            result = await asyncio.shield(future)
        else:
            return spec.fn(*args)
        if entry.output_adapter is None:
            return result
        return self._check_output(entry, result)

    async def _run_chain(
        self, entry: HandlerEntry, payload: Any, ctx: Context, running: Running | None
    ) -> Any:
        middleware = self.middleware
        if not middleware:
            return await self._invoke(entry, payload, ctx, running)

        async def innermost(p: Any, c: Context) -> Any:
            return await self._invoke(entry, p, c, running)

        call_next: CallNext = innermost
        for mw in reversed(middleware):
            call_next = _link(mw, call_next)
        return await call_next(payload, ctx)

    # -------------------------------------------------------------- deadlines

    def _deadline(self, entry: HandlerEntry, call: IncomingCall, now: float) -> float | None:
        deadline = call.deadline
        timeout = entry.spec.timeout_secs
        if timeout is not None:
            own = now + timeout
            deadline = own if deadline is None else min(deadline, own)
        return deadline

    @staticmethod
    def _timer_deadline(call: IncomingCall, deadline: float | None) -> float | None:
        """The deadline our own timer must enforce (``None``: no timer needed).

        pilot-rpc already cancels a call at the caller's deadline, so a timer
        is only needed when the handler's own timeout comes first (or offline,
        where nobody else enforces anything).
        """
        if (
            deadline is not None
            and isinstance(call, CallContext)
            and call.deadline is not None
            and call.deadline <= deadline
        ):
            return None
        return deadline

    def _deadline_error(
        self,
        entry: HandlerEntry,
        call: IncomingCall,
        deadline: float | None,
        stage: str,
        *,
        by_caller: bool | None = None,
    ) -> RpcError:
        spec = entry.spec
        if by_caller is None:
            by_caller = call.deadline is not None and call.deadline == deadline
        who = (
            "the caller's deadline"
            if by_caller or spec.timeout_secs is None
            else f"its {spec.timeout_secs:g}s timeout"
        )
        return DeadlineExceeded(
            f"{spec.name!r} exceeded {who} ({stage})",
            details={"reason": "timeout", "handler": spec.name, "timeout_secs": spec.timeout_secs},
        )

    def _cancel_code(self, call: IncomingCall) -> str:
        deadline = call.deadline
        if deadline is not None and self._loop_time() >= deadline:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"

    def _loop_time(self) -> float:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.time()

    # ------------------------------------------------------------------ slots

    async def _acquire_slot(
        self, entry: HandlerEntry, call: IncomingCall, deadline: float | None
    ) -> None:
        gate = entry.gate
        if gate is not None and not gate.try_acquire():
            await self._wait_for_slot(entry, gate, call, deadline)
        entry.stats.in_flight += 1

    async def _wait_for_slot(
        self,
        entry: HandlerEntry,
        gate: ConcurrencyGate,
        call: IncomingCall,
        deadline: float | None,
    ) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await gate.acquire()
        except GateFull as exc:
            entry.stats.reject(exc.reason)
            raise ResourceExhausted(
                f"{entry.spec.name!r} is at its limit of {gate.limit} concurrent calls"
                + (" and its queue is full" if exc.reason == "queue_full" else ""),
                details={
                    "reason": exc.reason,
                    "handler": entry.spec.name,
                    "max_concurrent": gate.limit,
                },
            ) from None
        except TimeoutError:
            raise self._deadline_error(entry, call, deadline, "while queued") from None

    def _release_slot(
        self, entry: HandlerEntry, running: Running | None, deadline: float | None
    ) -> None:
        release_when_done(entry, running, deadline, self._loop_time)

    # ----------------------------------------------------------------- helpers

    def _context(self, entry: HandlerEntry, call: IncomingCall, deadline: float | None) -> Context:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return Context(
            call=call,
            handler_name=entry.spec.name,
            deadline=deadline,
            loop=loop,
            encode=None if self._identity_codec else self._codec.encode_response,
        )

    def _internal(self, entry: HandlerEntry, exc: Exception) -> Internal:
        handler_logger.error(
            "handler %r raised %s: %s",
            entry.spec.name,
            type(exc).__name__,
            exc,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        details: dict[str, Any] = {"reason": "handler_error", "type": type(exc).__name__}
        if self._include_tracebacks:
            details["traceback"] = "".join(traceback.format_exception(exc))
        return Internal(f"{type(exc).__name__}: {exc}", details=details)


def _link(mw: Middleware, call_next: CallNext) -> CallNext:
    async def step(payload: Any, ctx: Context) -> Any:
        result = mw(payload, ctx, call_next)
        # A coroutine (the usual async middleware) is checked first: cheaper than the ABC.
        while result.__class__ is CoroutineType or inspect.isawaitable(result):
            result = await result
        return result

    return step


_refused_ids = itertools.count(1)


class _RefusedCall:
    """What the call log needs of a call refused before it was set up."""

    __slots__ = ("peer", "request_id")

    def __init__(self, peer: PeerInfo, request_id: str) -> None:
        self.peer = peer
        self.request_id = request_id


def _attach_info(exc: RpcError) -> str | None:
    """Give a worker error its structured ``ErrorInfo``; return its reason.

    The worker's own refusals name their cause in ``details["reason"]``
    (``acl``, ``rate_limit``, ``timeout`` ...); they leave with
    ``ErrorInfo(REASON, "pilot-worker", {scalar details as text})`` so a caller
    matches on one structured field. An error that already carries an
    ``ErrorInfo`` of its own (a handler's, pilot-rpc's) keeps it.
    """
    reason = exc.details.get("reason")
    if not isinstance(reason, str) or not reason:
        return None
    info = exc.info
    if info.domain == "pilot-rpc" and info.reason == exc.code.name and not info.metadata:
        metadata = {
            key: str(value)
            for key, value in exc.details.items()
            if key != "reason" and isinstance(value, str | int | float | bool)
        }
        exc.info = ErrorInfo(reason.upper()[:256], WORKER_ERROR_DOMAIN, metadata)
    return reason


WORKER_ERROR_DOMAIN = "pilot-worker"
"""``ErrorInfo.domain`` of the worker's own refusals."""
