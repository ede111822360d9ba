"""Worker side of a remote node: the handler runs as if it were the caller's node.

:class:`LangGraphMiddleware` (installed by ``pilot-langgraph-worker``) reads
the ``langgraph-config`` header a :class:`~pilot_langgraph.PilotRemoteRunnable`
sends and, while the handler runs:

- makes the caller's serializable ``RunnableConfig`` the current runnable
  config (``langgraph.config.get_config()``; ``ctx.config``);
- forwards every LangChain callback event of the handler's runs (chat model
  start / token / end, LLM, chain, tool, retriever, custom events, errors)
  to the caller, parented under the caller's run of the node;
- gives LangGraph's ``get_stream_writer()`` a writer that feeds the caller's
  ``stream_mode="custom"``;
- makes ``interrupt()`` work: the caller's resume values are the handler's,
  an unanswered interrupt ends the call with the interrupt, and what the
  handler consumed is reported back so the caller's checkpoint records it.

Everything the handler sends besides its result travels as control
messages (progress values of a unary call, items of a streaming call)
through one bounded outbox per call: a producer on the event loop waits for
room, a producer on another thread blocks until there is room, so a slow
caller slows the handler down instead of filling memory.

Theory of the interrupt bookkeeping: LangGraph keeps, per task, the list of
resume values already given and a pending "null" resume (``Command(resume=x)``
without an id). The caller sends both; the worker's scratchpad consumes them
exactly as LangGraph's own does; the caller then replays what was consumed
(the ``RESUME`` write, the null resume taken, the interrupt counter) into its
own scratchpad, so a resume from any process sees the same state as a local
node would have left.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, cast

from langchain_core.callbacks import AsyncCallbackHandler, AsyncCallbackManager
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config
from langgraph._internal._scratchpad import PregelScratchpad
from langgraph.errors import GraphInterrupt
from langgraph.runtime import Runtime
from pilot_rpc import InvalidArgument

from pilot_langgraph._codec import (
    BATCH_KIND,
    ENVELOPE_KEY,
    ControlMessage,
    LangGraphCodec,
    seal_control,
)
from pilot_langgraph._events import V2_STREAMING, encode_event
from pilot_langgraph._headers import CONFIG_HEADER
from pilot_langgraph.errors import StreamOverflowError

if TYPE_CHECKING:
    from pilot_worker import Context, WorkerServer

__all__ = ["DEFAULT_OUTBOX_SIZE", "LangGraphMiddleware"]

logger = logging.getLogger("pilot_langgraph.worker")

DEFAULT_OUTBOX_SIZE: Final = 64
"""Control messages a call may have in flight before a producer waits."""
_HARD_LIMIT_FACTOR: Final = 16
"""A sync ``stream_writer`` call on the event loop cannot wait: it may run
ahead of the caller by this many times the outbox size, then it raises."""

# LangGraph's reserved configurable keys (langgraph._internal._constants).
KEY_SCRATCHPAD: Final = "__pregel_scratchpad"
KEY_SEND: Final = "__pregel_send"
KEY_RUNTIME: Final = "__pregel_runtime"
KEY_CHECKPOINT_NS: Final = "checkpoint_ns"
RESUME: Final = "__resume__"

_END: Final = object()
_BATCH_MAX: Final = 64
"""Control messages sent together at most (as one progress value or stream item)."""


# ----------------------------------------------------------------------------- outbox


class _Outbox:
    """Bounded queue of control messages of one call, drained by one consumer."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        size: int,
        send: Callable[[Any], Any] | None = None,
    ) -> None:
        self.loop = loop
        self._size = size
        self._items: deque[Any] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False
        self._send = send
        self.sender: asyncio.Task[None] | None = None
        self._ended = False

    def _push(self, item: Any) -> None:
        if self.sender is None and self._send is not None:
            # Started on first use: a call that sends nothing costs no task.
            self.sender = self.loop.create_task(self.pump(self._send))
        self._items.append(seal_control(item))
        self._readable.set()
        if len(self._items) >= self._size:
            self._writable.clear()

    async def put(self, item: Any) -> None:
        """Queue ``item``, waiting while the outbox is full (on the event loop)."""
        while len(self._items) >= self._size and not self.closed:
            await self._writable.wait()
        if not self.closed:
            self._push(item)

    def put_nowait(self, item: Any) -> None:
        """Queue ``item`` without waiting (on the event loop); raises past the hard limit."""
        if self.closed:
            return
        if len(self._items) >= self._size * _HARD_LIMIT_FACTOR:
            raise StreamOverflowError(
                f"more than {self._size * _HARD_LIMIT_FACTOR} stream writes are waiting "
                "for the caller"
            )
        self._push(item)

    def put_threadsafe(self, item: Any) -> None:
        """Queue ``item`` from another thread, blocking that thread while full."""
        future = asyncio.run_coroutine_threadsafe(self.put(item), self.loop)
        future.result()

    def put_any(self, item: Any) -> None:
        """Queue from wherever we are: the loop (no wait) or another thread (blocks)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.put_nowait(item)
        else:
            self.put_threadsafe(item)

    def attach(self, send: Callable[[Any], Any]) -> None:
        """Send items with ``send`` from a task started on the first item."""
        self._send = send

    def end(self) -> None:
        """Mark the end for the consumer (always accepted)."""
        self._items.append(_END)
        self._readable.set()

    def close(self) -> None:
        """Drop everything and let waiting producers go (the call is over)."""
        self.closed = True
        self._items.clear()
        self._writable.set()
        self._readable.set()

    def take(self) -> Any:
        """The next item, or ``None`` when empty (never waits)."""
        if not self._items:
            self._readable.clear()
            return None
        item = self._items.popleft()
        if len(self._items) < self._size:
            self._writable.set()
        return item

    async def get(self) -> Any:
        """The next item, waiting for one."""
        while True:
            item = self.take()
            if item is not None:
                return item
            if self.closed:
                return _END
            await self._readable.wait()

    async def pump(self, send: Callable[[Any], Any]) -> None:
        """Send items with ``send`` (awaited: its flow control is ours) until :meth:`end`."""
        try:
            while True:
                item = await self.get()
                if item is _END:
                    return
                batch = self.take_batch(item)
                await send(batch)
                if batch is not item and self._ended:
                    return
        finally:
            self.close()

    def take_batch(self, first: Any) -> Any:
        """``first`` and whatever else is queued now, as one message (one frame)."""
        if not self._items or self._items[0] is _END:
            return first
        parts = [first]
        while len(parts) < _BATCH_MAX and (item := self.take()) is not None:
            if item is _END:
                self._ended = True
                break
            parts.append(item)
        return seal_control(ControlMessage(BATCH_KIND, parts))


# ----------------------------------------------------------------------------- callbacks


class _Forwarder(AsyncCallbackHandler):
    """Sends every callback event of the handler's runs to the caller."""

    run_inline = True

    def __init__(self, outbox: _Outbox, codec: LangGraphCodec) -> None:
        self._outbox = outbox
        self._codec = codec
        self._loop = outbox.loop

    async def _send(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        message = encode_event(self._codec, name, args, kwargs)
        if asyncio.get_running_loop() is self._loop:
            await self._outbox.put(message)
        else:
            # A sync run on a pool thread: LangChain runs our coroutine on a
            # private loop there; hand the message to the worker's loop and wait.
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self._outbox.put(message), self._loop)
            )

    async def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_llm_start", args, kwargs)

    async def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_chat_model_start", args, kwargs)

    async def on_llm_new_token(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_llm_new_token", args, kwargs)

    async def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_llm_end", args, kwargs)

    async def on_llm_error(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_llm_error", args, kwargs)

    async def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_chain_start", args, kwargs)

    async def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_chain_end", args, kwargs)

    async def on_chain_error(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_chain_error", args, kwargs)

    async def on_tool_start(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_tool_start", args, kwargs)

    async def on_tool_end(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_tool_end", args, kwargs)

    async def on_tool_error(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_tool_error", args, kwargs)

    async def on_agent_action(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_agent_action", args, kwargs)

    async def on_agent_finish(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_agent_finish", args, kwargs)

    async def on_retriever_start(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_retriever_start", args, kwargs)

    async def on_retriever_end(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_retriever_end", args, kwargs)

    async def on_retriever_error(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_retriever_error", args, kwargs)

    async def on_text(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_text", args, kwargs)

    async def on_custom_event(self, *args: Any, **kwargs: Any) -> None:
        await self._send("on_custom_event", args, kwargs)


class _StreamingForwarder(_Forwarder):
    """A forwarder that asks chat models to stream (the caller streams tokens).

    LangChain's chat models stream inside ``invoke`` when a handler has
    ``tap_output_aiter``/``tap_output_iter`` (as LangGraph's ``messages`` mode
    and ``astream_events`` do); the caller told us one of its handlers does.
    """

    def tap_output_aiter(self, run_id: Any, output: AsyncIterator[Any]) -> AsyncIterator[Any]:
        del run_id
        return output

    def tap_output_iter(self, run_id: Any, output: Any) -> Any:
        del run_id
        return output


def _v2_forwarder_class() -> type[_Forwarder] | None:
    marker: Any = V2_STREAMING
    if marker is None:  # pragma: no cover - a langchain-core without the v3 protocol
        return None

    class _V2Forwarder(_StreamingForwarder, marker):
        """A forwarder that asks chat models for ``on_stream_event`` (the caller reads v3)."""

        async def on_stream_event(self, *args: Any, **kwargs: Any) -> None:
            await self._send("on_stream_event", args, kwargs)

    return _V2Forwarder


_V2_FORWARDER: Final = _v2_forwarder_class()


# ----------------------------------------------------------------------------- interrupts


class _Scratch:
    """The worker's half of LangGraph's per-task interrupt bookkeeping."""

    def __init__(self, resume: list[Any], null: list[Any]) -> None:
        self.resume = resume
        self._null = null
        self.null_consumed = False
        self.resume_write: list[Any] | None = None
        self._counter = itertools.count()
        self.count = 0
        self._lock = threading.Lock()

    def interrupt_counter(self) -> int:
        with self._lock:
            self.count += 1
            return next(self._counter)

    def get_null_resume(self, consume: bool = False) -> Any:
        with self._lock:
            if not self._null or self.null_consumed:
                return None
            if consume:
                self.null_consumed = True
            return self._null[0]

    def send(self, writes: list[tuple[str, Any]]) -> None:
        for channel, value in writes:
            if channel == RESUME:
                self.resume_write = list(value)
            else:
                logger.debug("a remote handler wrote to %r: not supported, ignored", channel)

    def report(self) -> dict[str, Any] | None:
        if not self.count and not self.null_consumed and self.resume_write is None:
            return None
        return {
            "count": self.count,
            "null_consumed": self.null_consumed,
            "resume": self.resume_write,
        }

    def build(self, step: int, stop: int) -> Any:
        return PregelScratchpad(
            step=step,
            stop=stop,
            call_counter=itertools.count().__next__,
            interrupt_counter=self.interrupt_counter,
            get_null_resume=self.get_null_resume,
            resume=self.resume,
            subgraph_counter=itertools.count().__next__,
        )


def _interrupt_body(exc: GraphInterrupt) -> list[list[Any]]:
    interrupts: Any = exc.args[0] if exc.args else ()
    return [
        [getattr(i, "value", None), getattr(i, "id", ""), getattr(i, "response_schema", None)]
        for i in interrupts
    ]


# ----------------------------------------------------------------------------- the middleware


class _Call:
    """What the middleware set up for one call."""

    __slots__ = ("config", "handler", "outbox", "public", "scratch")

    def __init__(self) -> None:
        self.handler = ""
        self.config: RunnableConfig = {}
        self.public: dict[str, Any] = {}
        self.outbox: _Outbox | None = None
        self.scratch: _Scratch | None = None


class LangGraphMiddleware:
    """pilot-worker middleware that runs handlers as faithful LangGraph nodes.

    ``pilot-langgraph-worker`` installs it; to build a worker yourself::

        worker = WorkerServer(transport, config, codec=LangGraphCodec())
        worker.add_middleware(LangGraphMiddleware(worker))

    Args:
        worker: The worker it is added to (used to look up whether a handler
            streams and whether it declares an ``output_model``).
        codec: The codec control messages are built with (default: the
            worker's codec when it is a :class:`LangGraphCodec`).
        outbox_size: Control messages one call may have waiting for the
            caller before the handler waits (default 64).

    A call without the ``langgraph-config`` header (a caller that is not
    langgraph-pilot) still gets a runnable config, so ``get_config()`` and
    ``get_stream_writer()`` work (the writer then discards what it is given).
    The header is decoded strictly; a malformed one is ``INVALID_ARGUMENT``.

    Raises:
        ValueError: ``outbox_size`` below 1.

    One instance serves every call of its worker concurrently; it keeps no
    state between calls. Cancelling a call cancels the handler and drops the
    control messages still queued for it.
    """

    def __init__(
        self,
        worker: WorkerServer,
        *,
        codec: LangGraphCodec | None = None,
        outbox_size: int = DEFAULT_OUTBOX_SIZE,
    ) -> None:
        if codec is None:
            worker_codec = worker.codec
            codec = worker_codec if isinstance(worker_codec, LangGraphCodec) else LangGraphCodec()
        if outbox_size < 1:
            raise ValueError(f"outbox_size must be >= 1, got {outbox_size!r}")
        self._worker = worker
        self._codec = codec
        self._outbox_size = outbox_size
        self._controls_unchecked = callable(getattr(worker.codec, "is_control", None))
        # Decoded headers of plain calls (a run name and limits, nothing else), by header.
        self._plain_states: dict[str, Mapping[str, Any]] = {}

    # -- set-up -----------------------------------------------------------------------------

    def _state(self, raw: str | None) -> Mapping[str, Any]:
        if raw is None:
            return {}
        plain = self._plain_states.get(raw)
        if plain is not None:
            return plain
        try:
            blob = base64.b64decode(raw)
            state = self._codec.decode({ENVELOPE_KEY: ["msgpack", blob]})
        except Exception as exc:
            raise InvalidArgument(
                f"malformed {CONFIG_HEADER} header: {exc}",
                details={"reason": "invalid_argument", "header": CONFIG_HEADER},
            ) from None
        if not isinstance(state, dict):
            raise InvalidArgument(
                f"malformed {CONFIG_HEADER} header: not a mapping",
                details={"reason": "invalid_argument", "header": CONFIG_HEADER},
            )
        if _is_plain(state):  # pyright: ignore[reportUnknownArgumentType]
            # Only scalars and empty sections, which _setup copies: safe to share.
            if len(self._plain_states) >= _PLAIN_STATES_MAX:
                self._plain_states.clear()
            self._plain_states[raw] = state  # pyright: ignore[reportUnknownArgumentType]
        return state  # pyright: ignore[reportUnknownVariableType]

    def _spec(self, handler: str) -> Any:
        return self._worker.handler_spec(handler)

    def _setup(self, state: Mapping[str, Any], loop: Any, *, streams: bool, checked: bool) -> _Call:
        call = _Call()
        sent: Mapping[str, Any] = state.get("config") or {}
        tags = list(sent.get("tags") or [])
        metadata = dict(sent.get("metadata") or {})
        configurable = dict(sent.get("configurable") or {})
        public: dict[str, Any] = {
            "tags": tags,
            "metadata": metadata,
            "configurable": configurable,
        }
        for key in ("run_name", "run_id", "recursion_limit", "max_concurrency"):
            if sent.get(key) is not None:
                public[key] = sent[key]
        call.public = public

        # A streaming handler's output_model checks every stream item; the worker
        # skips control messages only when its codec tells them apart (is_control).
        controls = not (streams and checked) or self._controls_unchecked
        wants = bool(state.get("events") or state.get("custom") or state.get("lg"))
        outbox = call.outbox = _Outbox(loop, self._outbox_size) if wants and controls else None

        config_configurable: dict[str, Any] = dict(configurable)
        callbacks: Any = None
        if outbox is not None and state.get("events"):
            kind: type[_Forwarder] = _Forwarder
            if state.get("v2") and _V2_FORWARDER is not None:
                kind = _V2_FORWARDER
            elif state.get("streaming"):
                kind = _StreamingForwarder
            forwarder = kind(outbox, self._codec)
            callbacks = AsyncCallbackManager(
                handlers=[forwarder],
                inheritable_handlers=[forwarder],
                parent_run_id=state.get("parent_run_id"),
            )
        writer = _discard
        if outbox is not None and state.get("custom"):
            writer = self._writer(outbox)
        lg: Any = state.get("lg")
        if outbox is not None and isinstance(lg, dict):
            sent_lg = cast("dict[str, Any]", lg)
            scratch = call.scratch = _Scratch(
                list(sent_lg.get("resume") or []), list(sent_lg.get("null") or [])
            )
            config_configurable[KEY_SCRATCHPAD] = scratch.build(
                int(sent_lg.get("step") or 0), int(sent_lg.get("stop") or 0)
            )
            config_configurable[KEY_SEND] = scratch.send
            config_configurable.setdefault(KEY_CHECKPOINT_NS, "")
        config_configurable[KEY_RUNTIME] = Runtime(
            context=state.get("context"), stream_writer=writer
        )
        config: RunnableConfig = {
            "tags": tags,
            "metadata": metadata,
            "configurable": config_configurable,
            "callbacks": callbacks,
        }
        if "recursion_limit" in public:
            config["recursion_limit"] = public["recursion_limit"]
        if "max_concurrency" in public:
            config["max_concurrency"] = public["max_concurrency"]
        call.config = config
        return call

    def _writer(self, outbox: _Outbox) -> Callable[[Any], None]:
        codec = self._codec

        def write(chunk: Any) -> None:
            outbox.put_any(codec.control("custom", chunk))

        return write

    # -- the call ---------------------------------------------------------------------------

    async def __call__(self, payload: Any, ctx: Context, call_next: Any) -> Any:
        """Run ``call_next`` as described in the class docstring."""
        state = self._state(ctx.metadata.get(CONFIG_HEADER))
        loop = asyncio.get_running_loop()
        spec = self._spec(ctx.handler_name)
        streams = spec is not None and _streams(spec)
        checked = spec is not None and spec.output_model is not None
        call = self._setup(state, loop, streams=streams, checked=checked)
        call.handler = ctx.handler_name
        handler_ctx = ctx.with_config(call.public)
        if streams:
            # a streaming call has no progress frames: progress travels between its items
            handler_ctx = handler_ctx.with_progress(self._progress_sender(call))
        token = var_child_runnable_config.set(call.config)
        try:
            if streams:
                run_context = contextvars.copy_context()
                source = await call_next(payload, handler_ctx)
                return self._stream(source, call, run_context)
            return await self._unary(payload, handler_ctx, call_next, call)
        finally:
            var_child_runnable_config.reset(token)

    def _progress_sender(self, call: _Call) -> Callable[[Any], Any]:
        codec = self._codec

        async def send(value: Any) -> None:
            outbox = call.outbox
            if outbox is None:
                return  # the caller listens to neither events nor its custom stream
            await outbox.put(codec.control("progress", value))

        return send

    async def _unary(self, payload: Any, ctx: Context, call_next: Any, call: _Call) -> Any:
        outbox = call.outbox
        if outbox is None:
            return _own(await call_next(payload, ctx), ctx.handler_name)
        outbox.attach(ctx.report_progress)
        try:
            try:
                result: Any = _own(await call_next(payload, ctx), ctx.handler_name)
            except GraphInterrupt as exc:
                result = seal_control(self._codec.control("interrupt", _interrupt_body(exc)))
            except Exception:
                # The events of the failure (on_chain_error ...) go out before the error.
                await _flush(outbox)
                raise
            if call.scratch is not None and (report := call.scratch.report()) is not None:
                await outbox.put(self._codec.control("lg", report))
            sender = outbox.sender
            if sender is not None:
                outbox.end()
                await sender
            return result
        finally:
            outbox.close()
            sender = outbox.sender
            if sender is not None:
                if not sender.done():
                    sender.cancel()
                    await asyncio.wait([sender])
                if not sender.cancelled() and (error := sender.exception()) is not None:
                    logger.debug("sending control messages failed: %r", error)

    async def _stream(
        self, source: Any, call: _Call, run_context: contextvars.Context
    ) -> AsyncIterator[Any]:
        """The handler's items with control messages in between, in the order produced."""
        if not hasattr(source, "__anext__"):
            source = source.__aiter__()
        outbox = call.outbox
        loop = asyncio.get_running_loop()

        async def step() -> Any:
            return await source.__anext__()

        pending: set[asyncio.Future[Any]] = set()
        try:
            while True:
                task = loop.create_task(step(), context=run_context)
                pending.add(task)
                if outbox is not None:
                    while not task.done():
                        getter = loop.create_task(outbox.get())
                        pending.add(getter)
                        await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                        if getter.done():
                            pending.discard(getter)
                            item = getter.result()
                            if item is not _END:
                                yield outbox.take_batch(item)
                        else:
                            getter.cancel()
                            await asyncio.wait([getter])
                            pending.discard(getter)
                            if not getter.cancelled() and (got := getter.result()) is not _END:
                                yield got
                    while (item := outbox.take()) is not None:
                        if item is not _END:
                            yield outbox.take_batch(item)
                try:
                    value = await task
                except StopAsyncIteration:
                    break
                except GraphInterrupt as exc:
                    pending.discard(task)
                    if (report := self._report(call)) is not None:
                        yield report
                    yield seal_control(self._codec.control("interrupt", _interrupt_body(exc)))
                    return
                except Exception:
                    if outbox is not None:
                        while (item := outbox.take()) is not None:
                            if item is not _END:
                                yield item
                    raise
                finally:
                    pending.discard(task)
                yield _own(value, call.handler)
            if (report := self._report(call)) is not None:
                yield report
        finally:
            if outbox is not None:
                outbox.close()
            for fut in pending:
                fut.cancel()
            if pending:
                await asyncio.wait(pending)
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    def _report(self, call: _Call) -> ControlMessage | None:
        if call.scratch is None or (report := call.scratch.report()) is None:
            return None
        return seal_control(self._codec.control("lg", report))


def _own(value: Any, handler: str) -> Any:
    """``value`` as the handler's own output: a ``ControlMessage`` of its own is refused.

    Only this middleware sends control messages (sealed ones); a handler's
    own would bypass its ``output_model`` or fake an event or an interrupt.
    """
    if value.__class__ is ControlMessage:
        from pilot_rpc import Internal

        raise Internal(
            f"{handler!r} produced a ControlMessage itself: only the worker middleware "
            "sends control messages",
            details={"reason": "invalid_output", "type": "ControlMessage"},
        )
    return value


async def _flush(outbox: _Outbox) -> None:
    """Deliver what is queued (best effort: a failure to send is logged, not raised)."""
    sender = outbox.sender
    if sender is None:
        return
    outbox.end()
    await asyncio.wait([sender])
    if not sender.cancelled() and (error := sender.exception()) is not None:
        logger.debug("sending control messages failed: %r", error)


_PLAIN_STATES_MAX: Final = 256
_PLAIN_SCALARS: Final = (str, int, type(None))


def _is_plain(state: Mapping[str, Any]) -> bool:
    """A header state of only scalars besides empty tags/metadata/configurable."""
    if len(state) != 1:
        return False
    part = state.get("config")
    if not isinstance(part, dict):
        return False
    for name, value in cast("dict[str, Any]", part).items():
        if name in ("tags", "metadata", "configurable"):
            if value:
                return False
        elif value.__class__ not in _PLAIN_SCALARS:
            return False
    return True


def _streams(spec: Any) -> bool:
    from pilot_worker import CallStyle

    return spec.style is CallStyle.ASYNC_GENERATOR


def _discard(_chunk: Any) -> None:
    """The stream writer of a call whose caller does not read a custom stream."""
