"""Caller side of a remote node: what is sent with the call and what comes back.

One :class:`CallerLink` per call of a :class:`~pilot_langgraph.PilotRemoteRunnable`:

- :attr:`CallerLink.header` is the ``langgraph-config`` header: the caller's
  serializable ``RunnableConfig`` (values that cannot be encoded are dropped,
  with a debug log naming them), whether to forward callback events (only
  when a callback handler would see them), the parent run id, and inside a
  LangGraph task the interrupt state (resume values given so far);
- :meth:`CallerLink.on_control` acts on a control message from the worker:
  callback events are replayed into the caller's handlers (awaited, so the
  RPC layer's flow control holds the worker back while a slow handler works),
  custom writes go to the graph's stream writer, interrupt bookkeeping goes to
  the task's scratchpad;
- :meth:`CallerLink.on_progress` turns ``ctx.report_progress(value)`` of a
  unary handler into ``{"progress": value, "handler": <name>}`` on the
  graph's custom stream;
- :meth:`CallerLink.result` raises LangGraph's ``GraphInterrupt`` for an
  interrupt reply.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any, Final

from langchain_core.callbacks import BaseCallbackManager
from langchain_core.callbacks.manager import ahandle_event
from langchain_core.runnables import RunnableConfig

from pilot_langgraph._codec import BATCH_KIND, ENVELOPE_KEY, ControlMessage, LangGraphCodec
from pilot_langgraph._events import IGNORE_CONDITIONS, decode_event, wants_v2_events
from pilot_langgraph.errors import PilotDecodeError, PilotEncodeError

__all__ = ["CallerLink", "progress_item"]

logger = logging.getLogger("pilot_langgraph.remote")

KEY_SCRATCHPAD: Final = "__pregel_scratchpad"
KEY_SEND: Final = "__pregel_send"
KEY_RUNTIME: Final = "__pregel_runtime"
RESUME: Final = "__resume__"
_INTERNAL_PREFIXES: Final = ("__pregel_", "__pilot_")


def progress_item(handler: str, value: Any) -> dict[str, Any]:
    """The custom-stream item for ``ctx.report_progress(value)`` of a unary handler."""
    return {"progress": value, "handler": handler}


class CallerLink:
    """The caller's half of one remote call (see the module docstring)."""

    __slots__ = (
        "_codec",
        "_handler",
        "_handlers",
        "_heartbeat",
        "_runtime",
        "_scratch",
        "_send",
        "_writer",
        "header",
        "resume_count",
    )

    def __init__(
        self,
        codec: LangGraphCodec,
        handler: str,
        config: RunnableConfig,
        *,
        run_name: str | None,
        run_id: Any,
    ) -> None:
        self._codec = codec
        self._handler = handler
        configurable: Mapping[str, Any] = config.get("configurable") or {}
        runtime = configurable.get(KEY_RUNTIME)
        self._runtime = runtime
        self._writer = getattr(runtime, "stream_writer", None)
        self._heartbeat = getattr(runtime, "heartbeat", None)
        callbacks = config.get("callbacks")
        manager = callbacks if isinstance(callbacks, BaseCallbackManager) else None
        self._handlers = list(manager.handlers) if manager is not None else []
        self._scratch = configurable.get(KEY_SCRATCHPAD)
        self._send = configurable.get(KEY_SEND)
        self.resume_count = 0

        state: dict[str, Any] = {"config": _config_part(config, run_name, run_id)}
        if self._handlers:
            state["events"] = True
            state["parent_run_id"] = manager.parent_run_id if manager is not None else None
            state["streaming"] = any(hasattr(h, "tap_output_aiter") for h in self._handlers)
            if wants_v2_events(self._handlers):
                state["v2"] = True
        if self._writer is not None:
            state["custom"] = True
        context = getattr(runtime, "context", None)
        if context is not None:
            state["context"] = context
        scratch = self._scratch
        if scratch is not None:
            resume = list(getattr(scratch, "resume", ()) or ())
            null = scratch.get_null_resume(False)
            state["lg"] = {
                "resume": resume,
                "null": [] if null is None else [null],
                "step": getattr(scratch, "step", 0),
                "stop": getattr(scratch, "stop", 0),
            }
            self.resume_count = len(resume) + (0 if null is None else 1)
        self.header = self._encode_state(state)

    # -- what is sent -------------------------------------------------------------------------

    def _encode_state(self, state: dict[str, Any]) -> str:
        codec = self._codec
        try:
            blob = codec.encode(state, root="config")[ENVELOPE_KEY][1]
        except PilotEncodeError:
            _drop_unsendable(codec, state)
            blob = codec.encode(state, root="config")[ENVELOPE_KEY][1]
        return base64.b64encode(blob).decode("ascii")

    # -- what comes back ----------------------------------------------------------------------

    def heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat()

    async def on_progress(self, raw: Any) -> None:
        """Progress callback of a unary call (awaited by pilot-rpc before crediting)."""
        self.heartbeat()
        value = self._codec.decode_reply(raw)
        if isinstance(value, ControlMessage):
            await self.on_control(value)
        elif self._writer is not None:
            self._writer(progress_item(self._handler, value))

    async def on_control(self, message: ControlMessage) -> None:
        """Act on one control message that is not the call's result."""
        kind = message.kind
        if kind == BATCH_KIND:
            for part in message.body:
                if isinstance(part, ControlMessage):
                    await self.on_control(part)
        elif kind == "cb":
            event = decode_event(message.body)
            if event is None:
                logger.debug("ignoring an unknown callback event from %s", self._handler)
                return
            name, args, kwargs = event
            if self._handlers:
                await ahandle_event(self._handlers, name, IGNORE_CONDITIONS[name], *args, **kwargs)
        elif kind == "custom":
            if self._writer is not None:
                self._writer(message.body)
        elif kind == "progress":  # ctx.report_progress of a streaming handler
            self.heartbeat()
            if self._writer is not None:
                self._writer(progress_item(self._handler, message.body))
        elif kind == "lg":
            self._apply_interrupt_state(message.body)
        elif kind == "interrupt":
            self.raise_interrupt(message.body)
        else:
            logger.debug("ignoring control message %r from %s", kind, self._handler)

    def result(self, value: Any) -> Any:
        """The call's result; an interrupt reply raises ``GraphInterrupt``."""
        if isinstance(value, ControlMessage):
            if value.kind == "interrupt":
                self.raise_interrupt(value.body)
            raise PilotDecodeError(f"unexpected control message {value.kind!r} as a result")
        return value

    def raise_interrupt(self, body: Any) -> None:
        from langgraph.errors import GraphInterrupt
        from langgraph.types import Interrupt

        if not isinstance(body, list):
            raise PilotDecodeError("malformed interrupt from the worker")
        interrupts: list[Interrupt] = []
        for item in body:  # pyright: ignore[reportUnknownVariableType]
            if not isinstance(item, list) or len(item) != 3:  # pyright: ignore[reportUnknownArgumentType]
                raise PilotDecodeError("malformed interrupt from the worker")
            value, interrupt_id, schema = item  # pyright: ignore[reportUnknownVariableType]
            interrupts.append(Interrupt(value=value, id=str(interrupt_id), response_schema=schema))  # pyright: ignore[reportUnknownArgumentType]
        raise GraphInterrupt(interrupts)

    def _apply_interrupt_state(self, body: Any) -> None:
        scratch = self._scratch
        if scratch is None or not isinstance(body, dict):
            return
        if body.get("null_consumed"):
            value = scratch.get_null_resume(True)
            if value is not None:
                scratch.resume.append(value)
        resume = body.get("resume")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if isinstance(resume, list) and self._send is not None:
            self._send([(RESUME, resume)])
        for _ in range(int(body.get("count") or 0)):  # pyright: ignore[reportUnknownArgumentType, reportUnknownMemberType]
            scratch.interrupt_counter()


def _config_part(config: RunnableConfig, run_name: str | None, run_id: Any) -> dict[str, Any]:
    configurable: Mapping[str, Any] = config.get("configurable") or {}
    part: dict[str, Any] = {
        "tags": list(config.get("tags") or ()),
        "metadata": dict(config.get("metadata") or {}),
        "configurable": {
            k: v for k, v in configurable.items() if not k.startswith(_INTERNAL_PREFIXES)
        },
    }
    if run_name is not None:
        part["run_name"] = run_name
    if run_id is not None:
        part["run_id"] = run_id
    for key in ("recursion_limit", "max_concurrency"):
        value = config.get(key)
        if value is not None:
            part[key] = value
    return part


def _encodable(codec: LangGraphCodec, value: Any) -> bool:
    try:
        codec.encode(value)
    except PilotEncodeError:
        return False
    return True


def _drop_unsendable(codec: LangGraphCodec, state: dict[str, Any]) -> None:
    """Remove what cannot be encoded from ``state``, logging each name at debug."""
    part: dict[str, Any] = state["config"]
    for section in ("metadata", "configurable"):
        values: dict[str, Any] = part[section]
        for key in [k for k, v in values.items() if not _encodable(codec, v)]:
            logger.debug("not sent to the worker: config[%r][%r] cannot be encoded", section, key)
            del values[key]
    for key in [k for k in ("tags", "run_name", "run_id") if k in part]:
        if not _encodable(codec, part[key]):
            logger.debug("not sent to the worker: config[%r] cannot be encoded", key)
            del part[key]
    if "context" in state and not _encodable(codec, state["context"]):
        logger.debug("not sent to the worker: the runtime context cannot be encoded")
        del state["context"]
    lg = state.get("lg")
    if lg is not None and not _encodable(codec, lg):
        # A resume value that cannot cross the wire: the handler cannot get it.
        raise PilotEncodeError(
            "a resume value of this task cannot be sent to the worker",
            path="resume",
            type_name="resume",
        )
