"""pilot-worker: serve plain Python functions to trusted peers over pilot-rpc.

Public API (everything else lives in private modules)::

    from pilot_worker import pilot_handler, Context, WorkerServer, WorkerConfig

    @pilot_handler("search", allow=None, timeout_secs=30, rate_per_caller=100)
    async def search(payload: dict, ctx: Context) -> dict: ...

See the package README for the command line, plugins, metrics and deployment.
"""

from __future__ import annotations

from pilot_worker._call import IncomingCall, PeerLike
from pilot_worker._codec import IdentityCodec, PayloadCodec
from pilot_worker._config import DefaultPolicy, WorkerConfig
from pilot_worker._context import Context
from pilot_worker._handler import (
    CallStyle,
    HandlerKind,
    HandlerSpec,
    Overflow,
    get_handler_spec,
    pilot_handler,
)
from pilot_worker._logging import CallLogWriter
from pilot_worker._plugins import Plugin, PluginContext, PluginOption, discover_plugins, load_plugin
from pilot_worker._server import Middleware, WorkerServer
from pilot_worker._version import __version__
from pilot_worker.errors import (
    DuplicateHandlerError,
    HandlerDefinitionError,
    HandlerImportError,
    JournalError,
    PluginError,
    PluginNotFoundError,
    WorkerConfigError,
    WorkerError,
    WorkerStateError,
)

__all__ = [
    "CallLogWriter",
    "CallStyle",
    "Context",
    "DefaultPolicy",
    "DuplicateHandlerError",
    "HandlerDefinitionError",
    "HandlerImportError",
    "HandlerKind",
    "HandlerSpec",
    "IdentityCodec",
    "IncomingCall",
    "JournalError",
    "Middleware",
    "Overflow",
    "PayloadCodec",
    "PeerLike",
    "Plugin",
    "PluginContext",
    "PluginError",
    "PluginNotFoundError",
    "PluginOption",
    "WorkerConfig",
    "WorkerConfigError",
    "WorkerError",
    "WorkerServer",
    "WorkerStateError",
    "__version__",
    "discover_plugins",
    "get_handler_spec",
    "load_plugin",
    "pilot_handler",
]
