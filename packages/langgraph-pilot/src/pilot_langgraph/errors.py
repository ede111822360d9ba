"""Errors raised by pilot_langgraph.

Every exception raised by this package derives from :class:`PilotLangGraphError`.
Errors of the layers below (``pilot_rpc``, ``pilot_transport``) are translated at
the boundary, so callers only ever need to catch the classes listed here::

    PilotLangGraphError
    ├── PilotUsageError (ValueError)            the API was called wrongly (bad option,
    │                                           unknown label, missing configuration)
    ├── PilotCodecError                         a value could not cross the wire
    │   ├── PilotEncodeError (TypeError)        a value in the input or output cannot be
    │   │                                       serialized; ``.path`` names where it is
    │   └── PilotDecodeError                    bytes from a peer could not be decoded, or
    │                                           named a type this process does not allow
    └── PilotRemoteError                        the call reached the network and failed;
        │                                       ``.peer``, ``.node``, ``.code``, ``.details``
        ├── RemoteCancelledError                the remote side cancelled the call
        ├── RemoteUnknownError
        ├── RemoteInvalidArgumentError (ValueError)   the handler rejected the input
        ├── RemoteDeadlineExceededError (TimeoutError)
        ├── RemoteNotFoundError                 the handler reported a missing entity
        ├── RemoteAlreadyExistsError
        ├── RemotePermissionDeniedError (PermissionError)  ACL refused this caller
        ├── RemoteResourceExhaustedError        rate limit or concurrency limit hit
        ├── RemoteFailedPreconditionError
        ├── RemoteAbortedError
        ├── RemoteOutOfRangeError
        ├── RemoteUnimplementedError            no handler of that name on the peer
        ├── RemoteInternalError                 the handler raised; ``.remote_type`` names
        │                                       the exception type it raised
        ├── RemoteUnavailableError (ConnectionError)  no peer could be reached
        ├── RemoteDataLossError
        └── RemoteUnauthenticatedError (PermissionError)  the peer is not trusted

Two more, seen where remote work is mirrored rather than called:

    PilotLangGraphError
    ├── RemoteCallbackError                 the ``error`` of a forwarded ``on_*_error``
    │                                       callback event; ``.remote_type``
    └── StreamOverflowError (RuntimeError)  raised on a worker by the custom stream
                                            writer when the caller is far behind
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "PilotCodecError",
    "PilotDecodeError",
    "PilotEncodeError",
    "PilotLangGraphError",
    "PilotRemoteError",
    "PilotUsageError",
    "RemoteAbortedError",
    "RemoteAlreadyExistsError",
    "RemoteCallbackError",
    "RemoteCancelledError",
    "RemoteDataLossError",
    "RemoteDeadlineExceededError",
    "RemoteFailedPreconditionError",
    "RemoteInternalError",
    "RemoteInvalidArgumentError",
    "RemoteNotFoundError",
    "RemoteOutOfRangeError",
    "RemotePermissionDeniedError",
    "RemoteResourceExhaustedError",
    "RemoteUnauthenticatedError",
    "RemoteUnavailableError",
    "RemoteUnimplementedError",
    "RemoteUnknownError",
    "StreamOverflowError",
]


class PilotLangGraphError(Exception):
    """Root of every error raised by pilot_langgraph."""


class PilotUsageError(PilotLangGraphError, ValueError):
    """The API was called wrongly: a bad option, an unknown label, missing setup."""


class PilotCodecError(PilotLangGraphError):
    """A value could not be serialized or deserialized for the wire."""


class PilotEncodeError(PilotCodecError, TypeError):
    """A value cannot be sent.

    Attributes:
        path: Where the value sits in the input or output, e.g. ``state["docs"][2].meta``.
        type_name: The qualified type name of the offending value.
    """

    def __init__(self, message: str, *, path: str, type_name: str) -> None:
        super().__init__(message)
        self.path = path
        self.type_name = type_name


class PilotDecodeError(PilotCodecError):
    """Bytes received from a peer could not be turned back into a value."""


class PilotRemoteError(PilotLangGraphError):
    """A remote call failed.

    Attributes:
        peer: The peer the last attempt went to (trust-store name or node id).
        node: The remote handler name.
        code: The status code name, e.g. ``"NOT_FOUND"``.
        details: Structured details sent by the peer (may be empty).
    """

    code: str = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        peer: str | None = None,
        node: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.peer = peer
        self.node = node
        self.details: Mapping[str, Any] = dict(details or {})

    def __str__(self) -> str:
        where = f"{self.node or '?'}@{self.peer or '?'}"
        return f"{self.code} from {where}: {self.message}"


class RemoteCancelledError(PilotRemoteError):
    """The remote side cancelled the call."""

    code = "CANCELLED"


class RemoteUnknownError(PilotRemoteError):
    """The peer failed with an unknown status."""

    code = "UNKNOWN"


class RemoteInvalidArgumentError(PilotRemoteError, ValueError):
    """The handler rejected its input (e.g. input_model validation)."""

    code = "INVALID_ARGUMENT"


class RemoteDeadlineExceededError(PilotRemoteError, TimeoutError):
    """The call did not finish within its deadline."""

    code = "DEADLINE_EXCEEDED"


class RemoteNotFoundError(PilotRemoteError):
    """The handler reported that something it needs does not exist."""

    code = "NOT_FOUND"


class RemoteAlreadyExistsError(PilotRemoteError):
    """The peer reported that the target already exists."""

    code = "ALREADY_EXISTS"


class RemotePermissionDeniedError(PilotRemoteError, PermissionError):
    """The handler's ACL does not allow this caller."""

    code = "PERMISSION_DENIED"


class RemoteResourceExhaustedError(PilotRemoteError):
    """A rate limit, concurrency limit or size limit was hit on the peer."""

    code = "RESOURCE_EXHAUSTED"


class RemoteFailedPreconditionError(PilotRemoteError):
    """The peer is not in a state to run the call."""

    code = "FAILED_PRECONDITION"


class RemoteAbortedError(PilotRemoteError):
    """The peer aborted the call (e.g. a conflict)."""

    code = "ABORTED"


class RemoteOutOfRangeError(PilotRemoteError):
    """A value was outside the range the peer accepts."""

    code = "OUT_OF_RANGE"


class RemoteUnimplementedError(PilotRemoteError):
    """The peer has no handler of that name (or not of that kind)."""

    code = "UNIMPLEMENTED"


class RemoteInternalError(PilotRemoteError):
    """The remote handler raised an exception.

    Attributes:
        remote_type: Name of the exception type raised on the peer, if sent.
    """

    code = "INTERNAL"

    @property
    def remote_type(self) -> str | None:
        value = self.details.get("type") or self.details.get("exception_type")
        return value if isinstance(value, str) else None


class RemoteUnavailableError(PilotRemoteError, ConnectionError):
    """No peer could be reached (after every retry and failover)."""

    code = "UNAVAILABLE"


class RemoteDataLossError(PilotRemoteError):
    """The peer reported unrecoverable data loss."""

    code = "DATA_LOSS"


class RemoteUnauthenticatedError(PilotRemoteError, PermissionError):
    """The peer could not be authenticated or does not trust us."""

    code = "UNAUTHENTICATED"


class RemoteCallbackError(PilotLangGraphError):
    """The exception a remote run reported through a callback event (``on_*_error``).

    Replayed callback handlers receive this in place of the worker's exception
    (exceptions are never sent as values). ``remote_type`` names the type the
    worker raised.
    """

    def __init__(self, remote_type: str, message: str) -> None:
        super().__init__(f"{remote_type}: {message}" if message else remote_type)
        self.remote_type = remote_type


class StreamOverflowError(PilotLangGraphError, RuntimeError):
    """On a worker: a handler wrote to the custom stream from the event loop far
    faster than the caller reads.

    ``get_stream_writer()``'s writer cannot wait when called on the event loop,
    so it may run ahead of the caller by a bounded number of items (16 times the
    outbox size, 1024 by default) and then raises this. Called from a sync
    handler (a pool thread) the writer waits instead.
    """


_ERRORS_BY_CODE: dict[str, type[PilotRemoteError]] = {
    cls.code: cls
    for cls in (
        RemoteCancelledError,
        RemoteUnknownError,
        RemoteInvalidArgumentError,
        RemoteDeadlineExceededError,
        RemoteNotFoundError,
        RemoteAlreadyExistsError,
        RemotePermissionDeniedError,
        RemoteResourceExhaustedError,
        RemoteFailedPreconditionError,
        RemoteAbortedError,
        RemoteOutOfRangeError,
        RemoteUnimplementedError,
        RemoteInternalError,
        RemoteUnavailableError,
        RemoteDataLossError,
        RemoteUnauthenticatedError,
    )
}
