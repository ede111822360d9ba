"""Errors raised by pilot-rpc.

Every exception a caller of this package sees derives from :class:`RpcError`.
An ``RpcError`` carries a :class:`StatusCode` in the gRPC tradition (the same
numbers, so they can be mapped to and from gRPC and HTTP APIs), a ``message``
and a msgpack-able ``details`` dict. There is one subclass per code, so callers
can ``except`` precisely; a server handler raises the same classes to send a
code to its caller.

Transport failures (``pilot_transport.errors``) are translated at the boundary
and chained with ``from``: a caller never sees a transport, ``ssl`` or
``OSError`` exception unwrapped::

    RpcError                        .code .message .details
    ├── Cancelled                   CANCELLED (1): the call was cancelled
    ├── Unknown                     UNKNOWN (2): an error the peer did not classify
    ├── InvalidArgument             INVALID_ARGUMENT (3): bad request; unencodable payload
    ├── DeadlineExceeded            DEADLINE_EXCEEDED (4); also a TimeoutError
    ├── NotFound                    NOT_FOUND (5): no such method / entity
    ├── AlreadyExists               ALREADY_EXISTS (6)
    ├── PermissionDenied            PERMISSION_DENIED (7)
    ├── ResourceExhausted           RESOURCE_EXHAUSTED (8): limits (message size, concurrency)
    ├── FailedPrecondition          FAILED_PRECONDITION (9)
    ├── Aborted                     ABORTED (10)
    ├── OutOfRange                  OUT_OF_RANGE (11)
    ├── Unimplemented               UNIMPLEMENTED (12): no such method on the server
    ├── Internal                    INTERNAL (13): handler crashed, protocol violation
    ├── Unavailable                 UNAVAILABLE (14): peer unreachable / connection lost;
    │                               also a ConnectionError
    ├── DataLoss                    DATA_LOSS (15)
    └── Unauthenticated             UNAUTHENTICATED (16): TLS identity not trusted

Every ``RpcError`` also carries one structured, machine-readable detail,
:class:`ErrorInfo` (``reason``, ``domain``, ``metadata``; in the spirit of
``google.rpc.ErrorInfo``), which travels on the wire with the status. Match
on ``error.info.reason`` (and ``domain``) rather than on message text or on
ad-hoc ``details`` keys; ``details`` stays for compatibility and free-form
facts.

``Unavailable.retry_safe`` is true when the call is known not to have reached
a handler (never sent, or refused by a server that was going away); the client
retries those on its own when a :class:`~pilot_rpc.RetryPolicy` allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "ErrorInfo",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "RpcError",
    "StatusCode",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
]


class StatusCode(IntEnum):
    """Status codes with gRPC's names and numbers."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


_DOMAIN = "pilot-rpc"
"""The ``ErrorInfo.domain`` of errors pilot-rpc itself produces."""


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a call failed, in a form a program can match on.

    Attributes:
        reason: A short UPPER_SNAKE_CASE constant naming the cause
            (``"CONCURRENCY_LIMIT"``, ``"HANDLER_EXCEPTION"``,
            ``"PERMISSION_DENIED"``...), unique within ``domain``.
        domain: Who defines ``reason``: ``"pilot-rpc"`` for this package's own
            errors, a package or service name for the layers above.
        metadata: String facts about this occurrence (``{"limit": "1024"}``).

    Raises:
        ValueError: ``reason`` or ``domain`` is not a non-empty string of at
            most 256 characters, or ``metadata`` does not map str to str.
    """

    reason: str
    domain: str = _DOMAIN
    metadata: Mapping[str, str] = field(default_factory=dict[str, str])

    def __post_init__(self) -> None:
        for name in ("reason", "domain"):
            value: object = getattr(self, name)
            if not isinstance(value, str) or not 0 < len(value) <= 256:
                raise ValueError(f"ErrorInfo.{name} must be a string of 1-256 chars: {value!r}")
        metadata: Any = self.metadata
        if not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str)
            for k, v in metadata.items()  # pyright: ignore[reportUnknownVariableType]
        ):
            raise ValueError(f"ErrorInfo.metadata must map str to str: {metadata!r}")
        object.__setattr__(self, "metadata", dict(metadata))  # pyright: ignore[reportUnknownArgumentType]

    def to_wire(self) -> list[Any]:
        """The wire form: ``[reason, domain, metadata]`` (PROTOCOL.md, "Errors")."""
        return [self.reason, self.domain, dict(self.metadata)]

    @staticmethod
    def from_wire(value: Any) -> ErrorInfo:
        """Parse the wire form. Raises ValueError if it is malformed."""
        if not isinstance(value, list) or len(value) < 3:  # pyright: ignore[reportUnknownArgumentType]
            raise ValueError("ErrorInfo is not [reason, domain, metadata]")
        reason: Any = value[0]
        domain: Any = value[1]
        metadata: Any = value[2]
        return ErrorInfo(reason, domain, metadata)


class RpcError(Exception):
    """Root of every error raised by pilot-rpc.

    Args:
        message: Human-readable description; sent to the caller as is.
        details: A msgpack-able dict of free-form facts (sent to the caller).
        code: Only for the root class itself; subclasses fix their own code.
        info: The structured reason (sent to the caller). Default: the
            status code's name as ``reason`` in the ``"pilot-rpc"`` domain.

    Handlers raise a subclass (``raise NotFound("no such key", details={"key": k})``)
    to send that code, message and details to the caller.
    """

    code: ClassVar[StatusCode] = StatusCode.UNKNOWN
    _by_code: ClassVar[dict[int, type[RpcError]]] = {}

    def __init__(
        self,
        message: str = "",
        *,
        details: Mapping[str, Any] | None = None,
        code: StatusCode | None = None,
        info: ErrorInfo | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details) if details else {}
        if code is not None and code is not type(self).code:
            if type(self) is not RpcError:
                raise TypeError(f"{type(self).__name__} has the fixed code {type(self).code.name}")
            # The root class may carry any code; the instance attribute shadows the ClassVar.
            self.code = StatusCode(code)  # pyright: ignore[reportAttributeAccessIssue]
        if info is not None and not isinstance(info, ErrorInfo):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"info must be an ErrorInfo, got {info!r}")
        self.info: ErrorInfo = info if info is not None else ErrorInfo(self.code.name)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            RpcError._by_code.setdefault(int(cls.code), cls)

    def __repr__(self) -> str:
        extra = f", details={self.details!r}" if self.details else ""
        if self.info.reason != self.code.name or self.info.domain != _DOMAIN or self.info.metadata:
            extra += f", info={self.info!r}"
        return f"{type(self).__name__}({self.message!r}{extra})"

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    @staticmethod
    def from_code(
        code: int,
        message: str = "",
        details: Mapping[str, Any] | None = None,
        info: ErrorInfo | None = None,
    ) -> RpcError:
        """Build the subclass for ``code`` (``Unknown`` for numbers outside the table)."""
        cls = RpcError._by_code.get(code)
        if cls is None:
            return Unknown(message, details={**(details or {}), "code": code}, info=info)
        return cls(message, details=details, info=info)


class Cancelled(RpcError):
    """The call was cancelled (by the caller, or by a server cutting it on drain)."""

    code = StatusCode.CANCELLED


class Unknown(RpcError):
    """An error the peer did not classify."""

    code = StatusCode.UNKNOWN


class InvalidArgument(RpcError):
    """The request is invalid (also raised locally for a payload msgpack cannot encode)."""

    code = StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(RpcError, TimeoutError):
    """The call's deadline passed before it completed."""

    code = StatusCode.DEADLINE_EXCEEDED


class NotFound(RpcError):
    """The requested entity does not exist."""

    code = StatusCode.NOT_FOUND


class AlreadyExists(RpcError):
    """The entity the call tried to create already exists."""

    code = StatusCode.ALREADY_EXISTS


class PermissionDenied(RpcError):
    """The caller is authenticated but not allowed to do this."""

    code = StatusCode.PERMISSION_DENIED


class ResourceExhausted(RpcError):
    """A limit was hit: message size, concurrent calls, a quota."""

    code = StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RpcError):
    """The system is not in a state in which the call can run."""

    code = StatusCode.FAILED_PRECONDITION


class Aborted(RpcError):
    """The operation was aborted (a conflict, a lost race)."""

    code = StatusCode.ABORTED


class OutOfRange(RpcError):
    """An argument is past the valid range."""

    code = StatusCode.OUT_OF_RANGE


class Unimplemented(RpcError):
    """The server has no such method, or not with that call shape."""

    code = StatusCode.UNIMPLEMENTED


class Internal(RpcError):
    """The handler crashed, or the peer broke the protocol."""

    code = StatusCode.INTERNAL


class Unavailable(RpcError, ConnectionError):
    """The peer could not be reached or the connection was lost.

    ``retry_safe`` is true when the call is known not to have reached a handler.
    """

    code = StatusCode.UNAVAILABLE

    def __init__(
        self,
        message: str = "",
        *,
        details: Mapping[str, Any] | None = None,
        code: StatusCode | None = None,
        info: ErrorInfo | None = None,
        retry_safe: bool = False,
    ) -> None:
        super().__init__(message, details=details, code=code, info=info)
        self.retry_safe = retry_safe


class DataLoss(RpcError):
    """Unrecoverable data loss or corruption."""

    code = StatusCode.DATA_LOSS


class Unauthenticated(RpcError):
    """The peer's identity could not be established or is not trusted."""

    code = StatusCode.UNAUTHENTICATED
