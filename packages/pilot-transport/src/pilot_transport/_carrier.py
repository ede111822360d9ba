"""The narrow interface between carriers and the security layer.

A carrier moves bytes between two hosts and knows nothing of trust: it dials a
target on a (virtual) port and accepts inbound streams on ports it has bound.
The security layer (``_tls``) runs TLS 1.3 with mutual authentication over any
:class:`CarrierStream`, so the same identity and trust rules hold on every
carrier. Carriers raise only :mod:`pilot_transport.errors` exceptions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Carrier", "CarrierListener", "CarrierStream", "DialTarget"]


class CarrierStream(ABC):
    """An unauthenticated, ordered, reliable byte stream.

    ``read`` returns ``b""`` once the remote side has sent EOF. Writes wait
    while the carrier applies backpressure; they never buffer without bound.
    """

    remote_hint: str = ""
    """Where the bytes come from, for logs only (``127.0.0.1:5123``, a Pilot address)."""

    @abstractmethod
    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return up to ``max_bytes`` bytes, at least one; ``b""`` at EOF.

        Raises:
            StreamResetError: the connection broke.
            StreamClosedError: the stream was closed locally.
        """

    @abstractmethod
    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``, waiting under backpressure.

        Raises:
            StreamResetError: the connection broke.
            StreamClosedError: the stream was closed locally or after ``write_eof``.
        """

    def write_room(self) -> int:
        """How many bytes :meth:`try_write` would accept right now (0: none).

        Never waits and changes nothing. A carrier without a synchronous write
        path keeps this default (0), and callers use :meth:`write`.
        """
        return 0

    def try_write(self, data: bytes) -> bool:
        """Hand all of ``data`` to the carrier now, without waiting, or nothing.

        Succeeds (True) exactly when ``len(data) <= write_room()``: then the
        whole of ``data`` is queued in order after every earlier write and the
        call never left half of it behind. Otherwise returns False and nothing
        was written. A closed or broken stream has no room (False); the next
        :meth:`write` raises the error. Safe to call from any task; cannot be
        cancelled (it never suspends).
        """
        del data
        return False

    @abstractmethod
    async def write_eof(self) -> None:
        """Half-close: the peer's ``read`` returns ``b""``; we may still read."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close both directions. Idempotent; never raises on a broken stream."""


class CarrierListener(ABC):
    """Inbound carrier streams on one bound (virtual) port."""

    port: int

    @abstractmethod
    async def accept(self) -> CarrierStream:
        """Wait for the next inbound stream. Raises ListenerClosedError once closed."""

    @abstractmethod
    async def aclose(self) -> None:
        """Stop accepting; wakes a pending ``accept`` with ListenerClosedError."""


@dataclass(frozen=True, slots=True)
class DialTarget:
    """Where a carrier should dial: whatever the carrier needs from a peer entry.

    ``endpoint`` is ``host:port`` for tcp, ``address`` a Pilot address text
    (``N:XXXX.XXXX.XXXX``) for pilot, ``node_id`` the key-derived id for memory.
    """

    name: str | None = None
    node_id: str | None = None
    endpoint: str | None = None
    address: str | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: {})


class Carrier(ABC):
    """Moves bytes; chosen by the transport URL's scheme."""

    scheme: str

    @abstractmethod
    async def dial(self, target: DialTarget, port: int) -> CarrierStream:
        """Open a stream to ``target`` on ``port`` (the caller applies the timeout)."""

    @abstractmethod
    async def bind(self, port: int) -> CarrierListener:
        """Start accepting inbound streams on ``port``. Raises PortInUseError."""

    @abstractmethod
    async def info(self) -> dict[str, Any]:
        """Facts about this carrier endpoint (listening endpoint, daemon info, ...)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close every stream and listener of this carrier. Idempotent."""
