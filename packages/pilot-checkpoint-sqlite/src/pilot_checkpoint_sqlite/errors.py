"""Errors raised by pilot-checkpoint-sqlite.

Every exception this distribution raises to its callers derives from
:class:`CheckpointError`. Lower layers (SQLAlchemy, database drivers, pilot-rpc,
pilot-transport) are translated at the boundary and chained with ``from``, so no
``sqlalchemy`` or ``pilot_rpc`` exception reaches a caller of this package.

The tree::

    CheckpointError
    ├── CheckpointUsageError (ValueError)      you called the API wrong
    │   └── CheckpointConfigError              bad option, URL or environment
    ├── CheckpointAccessDenied (PermissionError)  the store refused this caller
    ├── CheckpointTypeRefusedError             stored data names a type not allowed
    ├── ThreadBusyError                        another run holds the thread (reject)
    │   └── ThreadBusyTimeout (TimeoutError)   enqueued run waited too long
    ├── RunLeaseLostError                      a run's thread lease expired under it
    ├── CheckpointStoreError                   the store failed to do what was asked
    │   ├── StoreUnavailableError (ConnectionError)  store/database/peer unreachable
    │   ├── StoreTimeoutError (TimeoutError)   no answer before the deadline
    │   ├── StoreSchemaError                   database schema too new / migration failed
    │   ├── StoreOverloadedError               bounded queue full; retry later
    │   └── StoreClosedError                   the store or saver was closed
    └── CheckpointProtocolError                a malformed request or reply on the wire

Usage errors are never retried. ``StoreUnavailableError``, ``StoreTimeoutError``
and ``StoreOverloadedError`` are transient: writes are idempotent, so the saver
retries them with the same idempotency key and a retry never duplicates.
"""

from __future__ import annotations

__all__ = [
    "CheckpointAccessDenied",
    "CheckpointConfigError",
    "CheckpointError",
    "CheckpointProtocolError",
    "CheckpointStoreError",
    "CheckpointTypeRefusedError",
    "CheckpointUsageError",
    "RunLeaseLostError",
    "StoreClosedError",
    "StoreOverloadedError",
    "StoreSchemaError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "ThreadBusyError",
    "ThreadBusyTimeout",
]


class CheckpointError(Exception):
    """Root of every error raised by pilot-checkpoint-sqlite."""


class CheckpointUsageError(CheckpointError, ValueError):
    """The API was called wrong (missing ``thread_id``, bad argument type...)."""


class CheckpointConfigError(CheckpointUsageError):
    """An option, database URL or environment variable is invalid."""


class CheckpointAccessDenied(CheckpointError, PermissionError):
    """The store refused the caller (ACL on the worker, or a scoping violation)."""


class CheckpointStoreError(CheckpointError):
    """The store could not complete the request."""


class StoreUnavailableError(CheckpointStoreError, ConnectionError):
    """The store, its database or the peer serving it cannot be reached."""


class StoreTimeoutError(CheckpointStoreError, TimeoutError):
    """The request did not complete before its deadline."""


class StoreSchemaError(CheckpointStoreError):
    """The database schema is newer than this code, or a migration failed."""


class StoreOverloadedError(CheckpointStoreError):
    """A bounded queue of the store is full; the request was not accepted."""


class StoreClosedError(CheckpointStoreError):
    """The store or the saver has been closed."""


class CheckpointProtocolError(CheckpointError):
    """A request or reply did not have the expected shape."""


class CheckpointTypeRefusedError(CheckpointError):
    """Stored checkpoint data names a type (or method) the saver does not rebuild.

    Nothing named by the data was imported or called. Allow a type that
    belongs in the graph's state with ``PilotCheckpointSaver(allowed_types=...)``.

    Attributes:
        refused: The refused names, ``module.name`` (``module.name.method``
            for a method), or the refused format (``"pickle"``).
    """

    def __init__(self, message: str, *, refused: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.refused = refused


class ThreadBusyError(CheckpointError):
    """Another run holds the thread (``multitask_strategy="reject"``).

    Attributes:
        thread_id: The thread.
        holder: Who holds it (the other run's lease holder name).
        expires_in: Seconds until that lease expires unless renewed.
    """

    def __init__(self, message: str, *, thread_id: str, holder: str, expires_in: float) -> None:
        super().__init__(message)
        self.thread_id = thread_id
        self.holder = holder
        self.expires_in = expires_in


class ThreadBusyTimeout(ThreadBusyError, TimeoutError):
    """An enqueued run (``multitask_strategy="enqueue"``) did not get the thread in time."""


class RunLeaseLostError(CheckpointError):
    """A run's lease on its thread expired or was taken while it ran.

    Another run may have written to the thread concurrently; the run's own
    checkpoints are stored, but exclusion was not guaranteed for all of it.
    """
