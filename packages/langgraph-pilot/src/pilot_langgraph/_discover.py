"""Remote discovery: what a worker serves, from its built-in ``_handlers``."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pilot_langgraph import _rpc, _runtime
from pilot_langgraph._env import DEFAULT_PORT
from pilot_langgraph.errors import PilotDecodeError

if TYPE_CHECKING:
    from pilot_rpc import PilotClient, TransportLike

__all__ = ["GRAPH_SCHEMAS_HANDLER", "HandlerInfo", "describe_graphs", "describe_handlers"]


@dataclass(frozen=True, kw_only=True)
class HandlerInfo:
    """One handler as described by a worker's ``_handlers``.

    Attributes:
        name: Handler name (the ``node`` of a PilotRemoteRunnable).
        kind: ``"unary"`` or ``"server_streaming"``.
        description: First line of the handler's docstring, or its description.
        allow: Node ids allowed to call it (``None``: the worker's default policy).
        timeout_secs: The handler's own timeout, if any.
        input_schema: JSON Schema of the input model, if any.
        output_schema: JSON Schema of the output model, if any.
        latency_ms: Recent latency figures reported by the worker (p50/p99...).
        raw: Everything the worker sent about the handler.
        rtt_ms: Round-trip time of the ``_handlers`` call itself.
    """

    name: str
    kind: str = "unary"
    description: str = ""
    allow: Sequence[str] | None = None
    timeout_secs: float | None = None
    input_schema: Mapping[str, Any] | None = None
    output_schema: Mapping[str, Any] | None = None
    latency_ms: Mapping[str, Any] = field(default_factory=dict[str, Any])
    raw: Mapping[str, Any] = field(default_factory=dict[str, Any])
    rtt_ms: float = 0.0

    @property
    def streaming(self) -> bool:
        return "stream" in self.kind


def _entries(reply: Any) -> list[Mapping[str, Any]]:
    if isinstance(reply, Mapping) and "handlers" in reply:
        reply = reply["handlers"]
    if isinstance(reply, Mapping):
        out: list[Mapping[str, Any]] = []
        for name, info in reply.items():  # pyright: ignore[reportUnknownVariableType]
            entry = dict(info) if isinstance(info, Mapping) else {}  # pyright: ignore[reportUnknownArgumentType]
            entry.setdefault("name", name)
            out.append(entry)  # pyright: ignore[reportUnknownArgumentType]
        return out
    if isinstance(reply, list):
        return [e for e in reply if isinstance(e, Mapping)]  # pyright: ignore[reportUnknownVariableType]
    raise PilotDecodeError(f"unexpected _handlers reply: {type(reply).__name__}")


def _to_info(entry: Mapping[str, Any], rtt_ms: float) -> HandlerInfo:
    kind = str(entry.get("kind") or ("server_streaming" if entry.get("streaming") else "unary"))
    allow = entry.get("allow")
    timeout = entry.get("timeout_secs")
    latency = entry.get("latency_ms") or entry.get("latency") or {}
    return HandlerInfo(
        name=str(entry.get("name")),
        kind=kind,
        description=str(entry.get("description") or ""),
        allow=[str(a) for a in allow] if isinstance(allow, list) else None,  # pyright: ignore[reportUnknownVariableType]
        timeout_secs=float(timeout) if isinstance(timeout, (int, float)) else None,
        input_schema=entry.get("input_schema"),
        output_schema=entry.get("output_schema"),
        latency_ms=dict(latency) if isinstance(latency, Mapping) else {},  # pyright: ignore[reportUnknownArgumentType]
        raw=dict(entry),
        rtt_ms=rtt_ms,
    )


async def describe_handlers(
    peer: str,
    *,
    port: int = DEFAULT_PORT,
    transport: TransportLike | None = None,
    timeout_secs: float = 10.0,
    client: PilotClient | None = None,
) -> list[HandlerInfo]:
    """Ask the worker at ``peer`` which handlers it serves.

    Raises:
        PilotRemoteError: the worker could not be reached or refused the call.
        PilotDecodeError: the reply was not a handler table.
    """
    rpc = await _runtime.get_client(_runtime.client_for(client, transport))
    started = time.perf_counter()
    reply = await _rpc.call_unary(
        rpc,
        peer=peer,
        port=port,
        node="_handlers",
        payload=None,
        timeout=timeout_secs,
        metadata={},
        idempotency_key=None,
        traceparent=None,
        on_progress=None,
    )
    rtt_ms = (time.perf_counter() - started) * 1000.0
    return [_to_info(e, rtt_ms) for e in _entries(reply)]


GRAPH_SCHEMAS_HANDLER = "lg.graph.schemas"


async def describe_graphs(
    peer: str,
    *,
    port: int = DEFAULT_PORT,
    transport: TransportLike | None = None,
    timeout_secs: float = 10.0,
    client: PilotClient | None = None,
) -> dict[str, dict[str, Any]]:
    """The graphs a ``pilot-langgraph-worker --graph`` serves, with their JSON Schemas.

    Returns ``{name: {"input_schema", "output_schema", "context_schema"}}`` (a
    schema LangGraph cannot express is ``None``). Safe to repeat.

    Raises:
        PilotRemoteError: the worker could not be reached or serves no graphs
            (``RemoteNotFoundError``).
        PilotDecodeError: the reply was not a table of schemas.
    """
    rpc = await _runtime.get_client(_runtime.client_for(client, transport))
    reply = await _rpc.call_unary(
        rpc,
        peer=peer,
        port=port,
        node=GRAPH_SCHEMAS_HANDLER,
        payload=None,
        timeout=timeout_secs,
        metadata={},
        idempotency_key=None,
        traceparent=None,
        on_progress=None,
    )
    if not isinstance(reply, Mapping):
        raise PilotDecodeError(f"unexpected {GRAPH_SCHEMAS_HANDLER} reply: {type(reply).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for name, schemas in reply.items():  # pyright: ignore[reportUnknownVariableType]
        if not isinstance(name, str) or not isinstance(schemas, Mapping):
            raise PilotDecodeError(f"unexpected {GRAPH_SCHEMAS_HANDLER} reply entry: {name!r}")
        out[name] = dict(schemas)  # pyright: ignore[reportUnknownArgumentType]
    return out
