"""LangGraph nodes on other machines, state kept remote, fan-out over trusted links.

Quick start::

    from pilot_langgraph import PilotRemoteRunnable, PilotFanoutRunnable, PilotCheckpointSaver
    graph.add_node("research", PilotFanoutRunnable({
        "broad": PilotRemoteRunnable(node="search", peer="worker-a"),
        "deep":  PilotRemoteRunnable(node="search", peer="worker-b"),
    }))
    app = graph.compile(checkpointer=PilotCheckpointSaver(peer="state-worker"))

Names are loaded on first use, so a worker process that only needs the codec
does not pay for importing LangChain's runnables.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pilot_langgraph.errors import (
    PilotCodecError,
    PilotDecodeError,
    PilotEncodeError,
    PilotLangGraphError,
    PilotRemoteError,
    PilotUsageError,
)

if TYPE_CHECKING:
    from pilot_channels import PilotChannel, PilotPublisher, publish_once
    from pilot_checkpoint_sqlite import PilotCheckpointSaver
    from pilot_worker import Context, pilot_handler

    from pilot_langgraph._codec import LangGraphCodec
    from pilot_langgraph._discover import HandlerInfo, describe_graphs, describe_handlers
    from pilot_langgraph._echo import PilotEchoRunnable
    from pilot_langgraph._event_source import PilotEventSource
    from pilot_langgraph._fanout import PilotFanoutRunnable
    from pilot_langgraph._remote import PilotRemoteRunnable, RemoteCallOptions
    from pilot_langgraph._remote_graph import PilotRemoteGraph, RunRejectedError
    from pilot_langgraph._runtime import (
        DefaultTransportSettings,
        aclose_default_transport,
        configure_default_transport,
    )
    from pilot_langgraph._served import LangGraphMiddleware
    from pilot_langgraph._trust import PeerSpec, ensure_trust

__all__ = [
    "Context",
    "DefaultTransportSettings",
    "HandlerInfo",
    "LangGraphCodec",
    "LangGraphMiddleware",
    "PeerSpec",
    "PilotChannel",
    "PilotCheckpointSaver",
    "PilotCodecError",
    "PilotDecodeError",
    "PilotEchoRunnable",
    "PilotEncodeError",
    "PilotEventSource",
    "PilotFanoutRunnable",
    "PilotLangGraphError",
    "PilotPublisher",
    "PilotRemoteError",
    "PilotRemoteGraph",
    "PilotRemoteRunnable",
    "PilotUsageError",
    "RemoteCallOptions",
    "RunRejectedError",
    "aclose_default_transport",
    "configure_default_transport",
    "describe_graphs",
    "describe_handlers",
    "ensure_trust",
    "pilot_handler",
    "publish_once",
]

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "Context": "pilot_worker",
    "pilot_handler": "pilot_worker",
    "PilotChannel": "pilot_channels",
    "PilotPublisher": "pilot_channels",
    "publish_once": "pilot_channels",
    "PilotCheckpointSaver": "pilot_checkpoint_sqlite",
    "LangGraphCodec": "pilot_langgraph._codec",
    "HandlerInfo": "pilot_langgraph._discover",
    "describe_graphs": "pilot_langgraph._discover",
    "describe_handlers": "pilot_langgraph._discover",
    "PilotEchoRunnable": "pilot_langgraph._echo",
    "PilotEventSource": "pilot_langgraph._event_source",
    "PilotFanoutRunnable": "pilot_langgraph._fanout",
    "LangGraphMiddleware": "pilot_langgraph._served",
    "PilotRemoteRunnable": "pilot_langgraph._remote",
    "RemoteCallOptions": "pilot_langgraph._remote",
    "PilotRemoteGraph": "pilot_langgraph._remote_graph",
    "RunRejectedError": "pilot_langgraph._remote_graph",
    "DefaultTransportSettings": "pilot_langgraph._runtime",
    "aclose_default_transport": "pilot_langgraph._runtime",
    "configure_default_transport": "pilot_langgraph._runtime",
    "PeerSpec": "pilot_langgraph._trust",
    "ensure_trust": "pilot_langgraph._trust",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pilot_langgraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
