"""LangChain callback events as wire values, and back.

A callback event is ``(method name, args, kwargs)`` as LangChain passes it to
a handler (``on_chat_model_start``, ``on_llm_new_token`` ...). Most values
cross LangGraph's serializer as they are (messages, documents, UUIDs). A few
need a shape of their own:

- generations (``ChatGenerationChunk``, ``LLMResult``): LangGraph's
  serializer turns the message inside a generation into a plain mapping, so a
  generation travels as ``{"$gen": [kind, message or text, generation_info]}``
  and an ``LLMResult`` as ``{"$llm_result": [generations, llm_output]}``;
- exceptions (``error=``): never sent as values; they travel as
  ``{"$error": [type name, message]}`` and come back as
  :class:`~pilot_langgraph.errors.RemoteCallbackError`;
- anything else that cannot be encoded is replaced by its ``repr`` text (with
  a debug log naming the event and the argument): an event is telemetry, and
  one odd value must not fail the call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    Generation,
    GenerationChunk,
    LLMResult,
)

from pilot_langgraph._codec import ControlMessage, LangGraphCodec
from pilot_langgraph.errors import PilotEncodeError, RemoteCallbackError

__all__ = ["IGNORE_CONDITIONS", "V2_STREAMING", "decode_event", "encode_event", "wants_v2_events"]

try:  # LangChain's marker of handlers fed by on_stream_event (astream_events version="v3")
    from langchain_core.tracers._streaming import (  # pyright: ignore[reportPrivateUsage]
        _V2StreamingCallbackHandler as _V2Marker,  # pyright: ignore[reportPrivateUsage]
    )
except ImportError:  # pragma: no cover - a langchain-core without the v3 protocol
    _V2Marker = None

V2_STREAMING: Final[type | None] = _V2Marker
"""LangChain's marker class of handlers that want ``on_stream_event`` (``None`` if absent)."""


def wants_v2_events(handlers: Sequence[Any]) -> bool:
    """Whether a chat model run under ``handlers`` would emit ``on_stream_event``."""
    marker = V2_STREAMING
    return marker is not None and any(isinstance(h, marker) for h in handlers)


logger = logging.getLogger("pilot_langgraph.events")

#: Forwarded events and the handler attribute that opts out of each (as LangChain's managers use).
IGNORE_CONDITIONS: Final[Mapping[str, str | None]] = {
    "on_llm_start": "ignore_llm",
    "on_chat_model_start": "ignore_chat_model",
    "on_llm_new_token": "ignore_llm",
    "on_llm_end": "ignore_llm",
    "on_llm_error": "ignore_llm",
    "on_chain_start": "ignore_chain",
    "on_chain_end": "ignore_chain",
    "on_chain_error": "ignore_chain",
    "on_tool_start": "ignore_agent",
    "on_tool_end": "ignore_agent",
    "on_tool_error": "ignore_agent",
    "on_agent_action": "ignore_agent",
    "on_agent_finish": "ignore_agent",
    "on_retriever_start": "ignore_retriever",
    "on_retriever_end": "ignore_retriever",
    "on_retriever_error": "ignore_retriever",
    "on_text": None,
    "on_custom_event": "ignore_custom_event",
    "on_stream_event": "ignore_llm",
}

_GEN: Final = "$gen"
_LLM_RESULT: Final = "$llm_result"
_ERROR: Final = "$error"


def _generation_out(gen: Generation) -> dict[str, list[Any]]:
    info = gen.generation_info
    if isinstance(gen, ChatGenerationChunk):
        return {_GEN: ["chat_chunk", gen.message, info]}
    if isinstance(gen, ChatGeneration):
        return {_GEN: ["chat", gen.message, info]}
    if isinstance(gen, GenerationChunk):
        return {_GEN: ["text_chunk", gen.text, info]}
    return {_GEN: ["text", gen.text, info]}


def _generation_in(body: Sequence[Any]) -> Generation:
    kind, value, info = body[0], body[1], body[2]
    if kind == "chat_chunk":
        return ChatGenerationChunk(message=value, generation_info=info)
    if kind == "chat":
        return ChatGeneration(message=value, generation_info=info)
    if kind == "text_chunk":
        return GenerationChunk(text=value, generation_info=info)
    return Generation(text=value, generation_info=info)


def _out(value: Any) -> Any:
    if isinstance(value, BaseException):
        return {_ERROR: [type(value).__qualname__, str(value)]}
    if isinstance(value, Generation):
        return _generation_out(value)
    if isinstance(value, LLMResult):
        gens = [[_generation_out(g) for g in row] for row in value.generations]
        return {_LLM_RESULT: [gens, value.llm_output]}
    return value


def _in(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1:  # pyright: ignore[reportUnknownArgumentType]
        if _GEN in value:
            return _generation_in(value[_GEN])
        if _LLM_RESULT in value:
            gens, llm_output = value[_LLM_RESULT]
            return LLMResult(
                generations=[[_generation_in(g[_GEN]) for g in row] for row in gens],
                llm_output=llm_output,
            )
        if _ERROR in value:
            remote_type, message = value[_ERROR]
            return RemoteCallbackError(str(remote_type), str(message))
    return value


def encode_event(
    codec: LangGraphCodec, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> ControlMessage:
    """The control message carrying one callback event (never raises for odd values)."""
    out_args = [_out(a) for a in args]
    out_kwargs = {k: _out(v) for k, v in kwargs.items()}
    try:
        return codec.control("cb", (name, out_args, out_kwargs))
    except PilotEncodeError:
        pass
    for i, value in enumerate(out_args):
        if not _encodable(codec, value):
            logger.debug("callback event %s: argument %d replaced by its repr", name, i)
            out_args[i] = repr(value)
    for key, value in list(out_kwargs.items()):
        if not _encodable(codec, value):
            logger.debug("callback event %s: %s= replaced by its repr", name, key)
            out_kwargs[key] = repr(value)
    return codec.control("cb", (name, out_args, out_kwargs))


def _encodable(codec: LangGraphCodec, value: Any) -> bool:
    try:
        codec.encode(value)
    except PilotEncodeError:
        return False
    return True


def decode_event(body: Any) -> tuple[str, list[Any], dict[str, Any]] | None:
    """``(name, args, kwargs)`` of a received event, or None if it is not one we replay."""
    if not isinstance(body, (list, tuple)) or len(body) != 3:  # pyright: ignore[reportUnknownArgumentType]
        return None
    name, args, kwargs = body[0], body[1], body[2]
    if name not in IGNORE_CONDITIONS or not isinstance(args, list):
        return None
    if not isinstance(kwargs, dict):
        return None
    return (
        name,
        [_in(a) for a in args],  # pyright: ignore[reportUnknownVariableType]
        {str(k): _in(v) for k, v in kwargs.items()},  # pyright: ignore[reportUnknownVariableType]
    )
