"""Options: small frozen keyword-only dataclasses, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pilot_rpc.errors import StatusCode

__all__ = ["ClientOptions", "RetryPolicy", "ServerOptions"]

# Protocol floors and ceilings (PROTOCOL.md, "Limits").
MIN_FRAME_SIZE = 16 * 1024
MAX_FRAME_SIZE = 16 * 1024 * 1024
MIN_WINDOW = 64 * 1024
MAX_WINDOW = 2**31 - 1
MIN_MESSAGE_SIZE = 64 * 1024
MAX_MESSAGE_SIZE = 2**31 - 1

DEFAULT_FRAME_SIZE = 256 * 1024
DEFAULT_MESSAGE_SIZE = 64 * 1024 * 1024
DEFAULT_WINDOW = 256 * 1024


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")


def _check_positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be a positive number, got None")
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)  # pyright: ignore[reportUnnecessaryIsInstance]
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """When and how the client retries a failed call on its own.

    A call is retried only when that is safe: it is known not to have reached a
    handler (the connection could not be opened, or the server refused it while
    going away), or the caller marked it ``idempotent=True`` and it failed with
    one of ``idempotent_codes``. Retries stay inside the call's deadline.

    Attributes:
        max_attempts: Total attempts including the first (1 disables retries).
        initial_backoff: Seconds before the first retry.
        max_backoff: Upper bound of the delay between attempts.
        multiplier: Growth of the delay per attempt.
        jitter: Fraction of random spread applied to each delay (0 to 1).
        idempotent_codes: Codes on which an idempotent call is retried.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    idempotent_codes: frozenset[StatusCode] = frozenset({StatusCode.UNAVAILABLE})

    def __post_init__(self) -> None:
        _check_range("max_attempts", self.max_attempts, 1, 100)
        _check_positive("initial_backoff", self.initial_backoff)
        _check_positive("max_backoff", self.max_backoff)
        if self.multiplier < 1 or not math.isfinite(self.multiplier):
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter!r}")
        object.__setattr__(
            self, "idempotent_codes", frozenset(StatusCode(c) for c in self.idempotent_codes)
        )

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """A policy that never retries."""
        return cls(max_attempts=1)

    def backoff(self, retry_number: int) -> float:
        """Delay before retry number ``retry_number`` (1-based), without jitter."""
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry_number - 1))


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerOptions:
    """Limits and behaviour of an :class:`~pilot_rpc.RpcServer`.

    Attributes:
        max_concurrent_calls_per_connection: Calls one connection may run at once;
            announced to the client, which queues beyond it. A call over the
            limit is refused with ``RESOURCE_EXHAUSTED``.
        max_connections: Connections served at once; more are closed on accept.
        include_tracebacks: Send a handler's traceback to the caller in the
            ``Internal`` error's details (``details["traceback"]``). Off by default:
            tracebacks leak implementation details.
        max_frame_size: Largest frame payload we accept (bytes).
        max_message_size: Largest request (or request stream item) we accept.
        initial_window: Per-call flow-control credit we grant for request stream items.
        hello_timeout: Seconds a new connection has to say hello.
        keepalive_interval: Seconds of silence after which we ping the client
            (``None``: never).
        keepalive_timeout: Seconds to wait for the pong before closing the connection.
        max_connections_per_peer: Connections one authenticated peer (by name)
            may hold at once; further ones are closed on accept, so one peer
            cannot take every slot of ``max_connections``.
        max_unfinished_bytes_per_connection: Bytes of partly received messages
            (sent in pieces, not complete yet) one connection may hold; the call
            whose piece would exceed it fails with ``RESOURCE_EXHAUSTED`` and its
            pieces are freed. ``None``: ``max_message_size``, so every message
            the size limit allows can still arrive.
        max_unfinished_bytes: The same for all connections of the server together.
        unfinished_message_timeout: Seconds an unfinished message may wait for
            its next piece; then its call fails with ``DEADLINE_EXCEEDED`` and
            its pieces are freed.
    """

    max_concurrent_calls_per_connection: int = 1024
    max_connections: int = 4096
    max_connections_per_peer: int = 64
    max_unfinished_bytes_per_connection: int | None = None
    max_unfinished_bytes: int = 128 * 1024 * 1024
    unfinished_message_timeout: float = 30.0
    include_tracebacks: bool = False
    max_frame_size: int = DEFAULT_FRAME_SIZE
    max_message_size: int = DEFAULT_MESSAGE_SIZE
    initial_window: int = DEFAULT_WINDOW
    hello_timeout: float = 10.0
    keepalive_interval: float | None = 30.0
    keepalive_timeout: float = 10.0

    def __post_init__(self) -> None:
        _check_range(
            "max_concurrent_calls_per_connection",
            self.max_concurrent_calls_per_connection,
            1,
            1_000_000,
        )
        _check_range("max_connections", self.max_connections, 1, 1_000_000)
        _check_range("max_connections_per_peer", self.max_connections_per_peer, 1, 1_000_000)
        if self.max_unfinished_bytes_per_connection is not None:
            _check_range(
                "max_unfinished_bytes_per_connection",
                self.max_unfinished_bytes_per_connection,
                MIN_FRAME_SIZE,
                2**40,
            )
        _check_range("max_unfinished_bytes", self.max_unfinished_bytes, MIN_FRAME_SIZE, 2**40)
        _check_positive("unfinished_message_timeout", self.unfinished_message_timeout)
        _check_range("max_frame_size", self.max_frame_size, MIN_FRAME_SIZE, MAX_FRAME_SIZE)
        _check_range("max_message_size", self.max_message_size, MIN_MESSAGE_SIZE, MAX_MESSAGE_SIZE)
        _check_range("initial_window", self.initial_window, MIN_WINDOW, MAX_WINDOW)
        _check_positive("hello_timeout", self.hello_timeout)
        _check_positive("keepalive_interval", self.keepalive_interval, allow_none=True)
        _check_positive("keepalive_timeout", self.keepalive_timeout)


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientOptions:
    """Connections, limits and retries of an :class:`~pilot_rpc.RpcClient`.

    Attributes:
        connect_timeout: Seconds to open a connection (dial, TLS, hello).
        default_timeout: Timeout of calls that pass none (``None``: no deadline).
        pool_size: Connections per peer. ``None`` asks the transport
            (``TransportLike.preferred_pool_size``, default 1): ``pilot_transport``
            says 8 over ``pilot://`` (the daemon makes pipelining on one stream
            slow), 1 elsewhere.
            With more than one, a call goes to an idle connection, opening one
            if all are busy and the pool is not full, else to the least loaded.
        max_calls_per_connection: Calls multiplexed on one connection (further
            capped by the server's announced limit); beyond it calls wait.
        keepalive_interval: Seconds of silence after which we ping (``None``: never).
        keepalive_timeout: Seconds without any reply to a ping before the
            connection is declared dead and its calls fail with ``Unavailable``.
        reconnect_backoff: First delay before redialling a peer that failed.
        reconnect_backoff_max: Upper bound of that delay (doubling per failure).
        retry: When calls are retried on their own.
        max_frame_size: Largest frame payload we accept (bytes).
        max_message_size: Largest reply (or stream item) we accept.
        initial_window: Per-call flow-control credit for server stream items.
    """

    connect_timeout: float = 10.0
    default_timeout: float | None = None
    pool_size: int | None = None
    max_calls_per_connection: int = 1024
    keepalive_interval: float | None = 5.0
    keepalive_timeout: float = 5.0
    reconnect_backoff: float = 0.1
    reconnect_backoff_max: float = 2.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_frame_size: int = DEFAULT_FRAME_SIZE
    max_message_size: int = DEFAULT_MESSAGE_SIZE
    initial_window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        _check_positive("connect_timeout", self.connect_timeout)
        _check_positive("default_timeout", self.default_timeout, allow_none=True)
        if self.pool_size is not None:
            _check_range("pool_size", self.pool_size, 1, 1024)
        _check_range("max_calls_per_connection", self.max_calls_per_connection, 1, 1_000_000)
        _check_positive("keepalive_interval", self.keepalive_interval, allow_none=True)
        _check_positive("keepalive_timeout", self.keepalive_timeout)
        _check_positive("reconnect_backoff", self.reconnect_backoff)
        _check_positive("reconnect_backoff_max", self.reconnect_backoff_max)
        if not isinstance(self.retry, RetryPolicy):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"retry must be a RetryPolicy, got {self.retry!r}")
        _check_range("max_frame_size", self.max_frame_size, MIN_FRAME_SIZE, MAX_FRAME_SIZE)
        _check_range("max_message_size", self.max_message_size, MIN_MESSAGE_SIZE, MAX_MESSAGE_SIZE)
        _check_range("initial_window", self.initial_window, MIN_WINDOW, MAX_WINDOW)
