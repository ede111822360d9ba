"""LangGraph checkpoints kept on another machine.

``PilotCheckpointSaver`` is a complete LangGraph checkpointer whose store runs
in a pilot worker (``pilot-worker --plugin checkpoint-sqlite --checkpoint-db
URL``); the store keeps LangGraph's serialized blobs in SQLite or PostgreSQL
and never deserializes them.
"""

from pilot_checkpoint_sqlite._backend import CheckpointBackend, LocalStoreBackend
from pilot_checkpoint_sqlite._options import (
    RetentionPolicy,
    RetryOptions,
    SaverOptions,
    StoreOptions,
)
from pilot_checkpoint_sqlite._saver import PilotCheckpointSaver
from pilot_checkpoint_sqlite._service import CheckpointService
from pilot_checkpoint_sqlite._store import CheckpointStore, open_store

__all__ = [
    "CheckpointBackend",
    "CheckpointService",
    "CheckpointStore",
    "LocalStoreBackend",
    "PilotCheckpointSaver",
    "RetentionPolicy",
    "RetryOptions",
    "SaverOptions",
    "StoreOptions",
    "open_store",
]
