"""asyncio-style streams over a running :class:`~pilot_node.Node`.

``open_connection`` and ``start_server`` mirror :func:`asyncio.open_connection` and
:func:`asyncio.start_server`, with Pilot addresses and virtual ports instead of hosts
and TCP ports. The reader and writer are thin views of one :class:`PilotStream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from ._aio import cancel_and_wait
from ._packet import Address
from ._streams import (
    PilotListener,
    PilotStream,
    StreamClosedError,
    StreamError,
    StreamLayer,
)
from .errors import NodeClosedError, PilotTimeoutError

if TYPE_CHECKING:
    from ._node import Node

__all__ = [
    "ECHO_PORT",
    "PilotServer",
    "PilotStreamReader",
    "PilotStreamWriter",
    "open_connection",
    "open_stream",
    "serve_echo",
    "start_server",
]

_log = logging.getLogger("pilot_node.api")

ECHO_PORT = 7


class _NodeLike(Protocol):
    stream_layer: object

    async def resolve_node(self, target: str | int | Address) -> int: ...

    async def connect(
        self,
        target: str | int | Address,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the Node's signature
    ) -> None: ...


def _layer(node: Node | _NodeLike) -> StreamLayer:
    layer = node.stream_layer
    if not isinstance(layer, StreamLayer):
        raise NodeClosedError("the node is not running (no stream layer)")
    return layer


class PilotStreamReader:
    """The reading half (``read``, ``readexactly``, ``at_eof``)."""

    def __init__(self, stream: PilotStream) -> None:
        self.stream = stream
        self._eof = False

    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the peer's end.

        Raises:
            StreamClosedError, StreamResetError, StreamTruncatedError: see :meth:`PilotStream.read`.
        """
        data = await self.stream.read(n)
        if not data:
            self._eof = True
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes.

        Raises:
            StreamTruncatedError: the stream ended first.
        """
        return await self.stream.readexactly(n)

    def at_eof(self) -> bool:
        """Whether a read returned the peer's end."""
        return self._eof


class PilotStreamWriter:
    """The writing half: ``write`` then ``await drain()``, ``write_eof``, ``close``.

    ``write`` queues at most ``max_backlog`` bytes ahead of ``drain``; past that it
    raises :class:`StreamError` (call ``drain`` between writes).
    """

    def __init__(self, stream: PilotStream, *, max_backlog: int = 16 * 1024 * 1024) -> None:
        self.stream = stream
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        self._max_backlog = max_backlog
        self._closing: asyncio.Task[None] | None = None
        self._close_error: StreamError | None = None

    def get_extra_info(self, name: str, default: object = None) -> object:
        """``peername`` gives ``(address text, port)``; ``sockname`` our port."""
        if name == "peername":
            return (str(self.stream.remote_address), self.stream.remote_port)
        if name == "sockname":
            return self.stream.local_port
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; ``drain`` sends it.

        Raises:
            StreamError: more than ``max_backlog`` bytes queued without ``drain``.
            StreamClosedError: the writer was closed.
        """
        if self._closing is not None:
            raise StreamClosedError("write after close")
        if not data:
            return
        if self._backlog_bytes + len(data) > self._max_backlog:
            raise StreamError(f"more than {self._max_backlog} bytes written without drain()")
        self._backlog.append(bytes(data))
        self._backlog_bytes += len(data)

    async def drain(self) -> None:
        """Hand the queued bytes to the stream, waiting under backpressure.

        Raises:
            StreamClosedError, StreamResetError: the stream is closed or broke.
        """
        while self._backlog:
            chunk = self._backlog[0]
            await self.stream.write(chunk)
            self._backlog.pop(0)
            self._backlog_bytes -= len(chunk)

    async def write_eof(self) -> None:
        """Send what is queued, then end our side (the peer reads ``b""``)."""
        await self.drain()
        await self.stream.write_eof()

    def can_write_eof(self) -> bool:
        """Always true: Pilot streams half-close."""
        return True

    def close(self) -> None:
        """Start closing (queued bytes are sent first); ``wait_closed`` waits for it."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        try:
            await self.drain()
        except StreamError:
            self.stream.abort()
            return
        try:
            await self.stream.aclose()
        except StreamError as exc:
            self._close_error = exc

    def is_closing(self) -> bool:
        """Whether ``close`` was called."""
        return self._closing is not None

    async def wait_closed(self) -> None:
        """Wait until the close finished (every byte acknowledged, or the linger ran out).

        Raises:
            StreamTruncatedError: bytes we wrote were never acknowledged.
        """
        if self._closing is None:
            self.close()
        assert self._closing is not None
        await asyncio.shield(self._closing)
        if self._close_error is not None:
            raise self._close_error

    async def aclose(self) -> None:
        """``close`` and ``wait_closed``."""
        self.close()
        await self.wait_closed()


async def open_stream(
    node: Node | _NodeLike,
    target: str | int | Address,
    port: int,
    *,
    timeout: float | None = 30.0,  # noqa: ASYNC109 - a dial deadline, documented
) -> PilotStream:
    """Open a reliable stream to ``target`` (address text, hostname, node id or
    :class:`Address`) on virtual ``port``.

    Raises:
        PilotTimeoutError: no tunnel or no answer within ``timeout``.
        StreamRefusedError: nothing listens on that port.
        PeerUnreachableError, IncompatiblePeerError: no tunnel to the node.
        NodeClosedError: the node is not running.

    Cancellation abandons the dial.
    """
    layer = _layer(node)
    address = target if isinstance(target, Address) else Address(0, await node.resolve_node(target))
    try:
        async with asyncio.timeout(timeout):
            await node.connect(address.node, timeout=timeout)
            return await layer.connect(address, port)
    except TimeoutError as exc:
        if isinstance(exc, PilotTimeoutError):
            raise
        raise PilotTimeoutError(f"no stream to {address}:{port} within {timeout} s") from exc


async def open_connection(
    node: Node | _NodeLike,
    target: str | int | Address,
    port: int,
    *,
    timeout: float | None = 30.0,  # noqa: ASYNC109 - a dial deadline, documented
) -> tuple[PilotStreamReader, PilotStreamWriter]:
    """Like :func:`asyncio.open_connection`: ``(reader, writer)`` for a new stream.

    Raises: as :func:`open_stream`.
    """
    stream = await open_stream(node, target, port, timeout=timeout)
    return PilotStreamReader(stream), PilotStreamWriter(stream)


ConnectionCallback = Callable[[PilotStreamReader, PilotStreamWriter], Awaitable[None]]


class PilotServer:
    """Accepts streams on one port and runs a callback per stream (each in its own task).

    At most ``max_handlers`` callbacks run at once; further streams wait in the
    listener's backlog (and past it are refused with RST).
    """

    def __init__(
        self, listener: PilotListener, callback: ConnectionCallback, *, max_handlers: int = 256
    ) -> None:
        self.port = listener.port
        self._listener = listener
        self._callback = callback
        self._slots = asyncio.Semaphore(max_handlers)
        self._handlers: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                stream = await self._listener.accept()
            except StreamClosedError:
                self._slots.release()
                return
            task = asyncio.get_running_loop().create_task(self._handle(stream))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, stream: PilotStream) -> None:
        writer = PilotStreamWriter(stream)
        try:
            await self._callback(PilotStreamReader(stream), writer)
        except StreamError as exc:
            _log.debug("stream handler on port %d: %s", self.port, exc)
        except Exception:
            _log.exception("stream handler on port %d failed", self.port)
        finally:
            self._slots.release()
            with contextlib.suppress(StreamError):
                await writer.aclose()

    async def aclose(self) -> None:
        """Stop accepting and cancel running handlers. Idempotent."""
        await self._listener.aclose()
        self._accepting.cancel()
        await cancel_and_wait([self._accepting, *self._handlers], "stream server")

    async def __aenter__(self) -> PilotServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def start_server(
    node: Node | _NodeLike,
    callback: ConnectionCallback,
    port: int,
    *,
    backlog: int | None = None,
    max_handlers: int = 256,
) -> PilotServer:
    """Like :func:`asyncio.start_server`: run ``callback(reader, writer)`` for every
    stream that arrives on virtual ``port``. The writer is closed when the callback returns.

    Raises:
        StreamError: the port already has a listener.
        NodeClosedError: the node is not running.
    """
    listener = _layer(node).listen(port, backlog=backlog)
    return PilotServer(listener, callback, max_handlers=max_handlers)


async def _echo(reader: PilotStreamReader, writer: PilotStreamWriter) -> None:
    while data := await reader.read(65536):
        await writer.stream.write(data)


async def serve_echo(node: Node | _NodeLike, port: int = ECHO_PORT) -> PilotServer:
    """The echo service (port 7 unless given): every byte is written back; the end too.

    Raises: as :func:`start_server`.
    """
    return await start_server(node, _echo, port)
