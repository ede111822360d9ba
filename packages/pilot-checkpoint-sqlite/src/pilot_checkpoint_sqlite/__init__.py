"""LangGraph checkpoints kept on another machine.

``PilotCheckpointSaver`` is a complete LangGraph checkpointer whose store runs
in a pilot worker (``pilot-worker --plugin checkpoint-sqlite --checkpoint-db
URL``); the store keeps LangGraph's serialized blobs in SQLite or PostgreSQL
and never deserializes them.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from pilot_checkpoint_sqlite._backend import CheckpointBackend, LocalStoreBackend
from pilot_checkpoint_sqlite._lease import (
    ExclusiveRuns,
    MultitaskStrategy,
    ThreadLease,
    exclusive_runs,
)
from pilot_checkpoint_sqlite._options import (
    RetentionPolicy,
    SaverOptions,
    StoreOptions,
)
from pilot_checkpoint_sqlite._saver import PilotCheckpointSaver
from pilot_checkpoint_sqlite._serde import AllowlistSerializer

if _TYPE_CHECKING:
    from pilot_checkpoint_sqlite._plugin import register_store_handlers
    from pilot_checkpoint_sqlite._service import CheckpointService
    from pilot_checkpoint_sqlite._store import CheckpointStore, open_store

__all__ = [
    "AllowlistSerializer",
    "CheckpointBackend",
    "CheckpointService",
    "CheckpointStore",
    "ExclusiveRuns",
    "LocalStoreBackend",
    "MultitaskStrategy",
    "PilotCheckpointSaver",
    "RetentionPolicy",
    "SaverOptions",
    "StoreOptions",
    "ThreadLease",
    "exclusive_runs",
    "open_store",
    "register_store_handlers",
]


def __getattr__(name: str) -> object:
    # The store side (SQLAlchemy) and the worker-side helper (pilot-worker) load
    # only when asked: a process that only runs graphs with the saver does not
    # pay for them, in start-up time nor in objects the garbage collector scans.
    if name in ("CheckpointStore", "open_store"):
        from pilot_checkpoint_sqlite import _store

        value: object = getattr(_store, name)
    elif name == "CheckpointService":
        from pilot_checkpoint_sqlite._service import CheckpointService

        value = CheckpointService
    elif name == "register_store_handlers":
        from pilot_checkpoint_sqlite._plugin import register_store_handlers

        value = register_store_handlers
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
