"""Errors raised by pilot-worker.

Every exception this package raises *to the code that builds or runs a worker*
derives from :class:`WorkerError`. They are all "you configured it wrong"
errors, raised at definition, registration or start-up time; retrying does not
help::

    WorkerError
    ├── HandlerDefinitionError (TypeError)   bad @pilot_handler arguments or signature
    ├── DuplicateHandlerError (ValueError)   two handlers with the same name
    ├── HandlerImportError (ImportError)     a --handlers module cannot be imported
    ├── PluginError                          a plugin is missing, malformed or failed setup
    │   └── PluginNotFoundError (LookupError)
    ├── WorkerConfigError (ValueError)       invalid WorkerConfig / CLI option value
    ├── WorkerStateError (RuntimeError)      e.g. serve() twice, register() after close
    └── JournalError                         the idempotency journal cannot be opened or
                                             used (bad URL, missing extra, bad step)

Failures of a *call* (access denied, rate limited, deadline exceeded, invalid
payload, ...) are not raised here: they reach the caller as the matching
``pilot_rpc.RpcError`` subclass (``PermissionDenied``, ``ResourceExhausted``,
``DeadlineExceeded``, ``InvalidArgument``, ``Internal``, ``Unavailable``) with a
``details`` dict whose ``"reason"`` key says which worker rule fired. A handler
may raise any ``pilot_rpc.RpcError`` subclass itself to choose the status code.
"""

from __future__ import annotations

__all__ = [
    "DuplicateHandlerError",
    "HandlerDefinitionError",
    "HandlerImportError",
    "JournalError",
    "PluginError",
    "PluginNotFoundError",
    "WorkerConfigError",
    "WorkerError",
    "WorkerStateError",
]


class WorkerError(Exception):
    """Root of every error pilot-worker raises to the code that builds a worker."""


class HandlerDefinitionError(WorkerError, TypeError):
    """A handler function or its ``@pilot_handler`` arguments are invalid.

    The message names the handler and what is wrong (an unsupported signature,
    a sync generator, a negative limit, a model that is not a pydantic type...).
    """


class DuplicateHandlerError(WorkerError, ValueError):
    """Two different handlers were registered under the same name.

    The message names both definitions (``module:qualname``).
    """


class HandlerImportError(WorkerError, ImportError):
    """A handler module named on the command line could not be imported."""


class PluginError(WorkerError):
    """A plugin entry point is malformed, is missing an option, or its setup failed."""


class PluginNotFoundError(PluginError, LookupError):
    """No installed plugin has the requested name (``--list-plugins`` shows them)."""


class WorkerConfigError(WorkerError, ValueError):
    """A :class:`~pilot_worker.WorkerConfig` field or CLI option has an invalid value."""


class WorkerStateError(WorkerError, RuntimeError):
    """The worker was used in a state that does not allow it (closed, already serving)."""


class JournalError(WorkerError):
    """The shared idempotency journal cannot be opened or used as asked.

    Raised by :class:`~pilot_worker.journal.IdempotencyJournal` for a bad URL,
    a missing ``pilot-worker[journal]`` extra or an unreachable database at
    start-up, and by ``Context.step`` for a bad step name, a step name used
    twice in one call, or a step result msgpack cannot encode.
    """
