"""A tiny HTTP/1.1 server for ``/metrics``, ``/healthz`` and ``/readyz``.

Deliberately minimal (GET/HEAD, one request per connection, no keep-alive):
it serves probes and scrapes, nothing else. Bounded everywhere: request head
size (8 KiB), the time a connection has to send its request head
(``read_timeout``, default 5 s), and connections held at once
(``max_connections``, default 64).

Idle connections never lock probes out: when the cap is reached, a new
connection makes room by closing the connection that has waited longest for
its request head; only when every held connection is already being answered
is the new one refused. So a handful of idle (or slow) sockets cannot make
``/healthz`` fail, whatever their number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["OpsHttpServer"]

logger = logging.getLogger("pilot_worker.http")

_MAX_HEAD = 8192
_READ_TIMEOUT = 5.0
_MAX_CONNECTIONS = 64


class _Conn:
    """One held connection: its task, when it arrived, whether it is idle."""

    __slots__ = ("arrived", "idle", "task", "writer")

    def __init__(self, task: asyncio.Task[None], writer: asyncio.StreamWriter, now: float) -> None:
        self.task = task
        self.writer = writer
        self.arrived = now
        self.idle = True  # still waiting for its request head


class OpsHttpServer:
    """Serves the worker's operational endpoints on ``host:port``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        registry: CollectorRegistry,
        alive: Callable[[], bool],
        ready: Callable[[], Awaitable[bool]],
        max_connections: int = _MAX_CONNECTIONS,
        read_timeout: float = _READ_TIMEOUT,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if not read_timeout > 0:
            raise ValueError("read_timeout must be > 0")
        self._max_connections = max_connections
        self._read_timeout = read_timeout
        self.shed = 0
        """Idle connections closed to make room for new ones (for tests and metrics)."""
        self.refused = 0
        """Connections refused because every held one was being answered."""
        self._host = host
        self._port = port
        self._registry = registry
        self._alive = alive
        self._ready = ready
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Conn] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the HTTP server is not running")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        return self._host

    async def start(self) -> None:
        """Bind and start serving. Raises ``OSError`` if the port is taken."""
        self._server = await asyncio.start_server(
            self._on_connection, self._host, self._port, limit=_MAX_HEAD
        )

    async def aclose(self) -> None:
        """Stop listening and drop open connections. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = [*self._connections, *self._closing]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always inside a task
            writer.close()
            return
        if len(self._connections) >= self._max_connections and not self._shed_one():
            self.refused += 1
            writer.close()
            return
        conn = _Conn(task, writer, asyncio.get_running_loop().time())
        self._connections[task] = conn
        try:
            await self._serve_one(reader, writer, conn)
        except (
            ConnectionError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        except Exception:
            logger.exception("error serving an HTTP request")
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _shed_one(self) -> bool:
        """Close the connection that has waited longest for its request head."""
        oldest: _Conn | None = None
        for conn in self._connections.values():
            if conn.idle and (oldest is None or conn.arrived < oldest.arrived):
                oldest = conn
        if oldest is None:
            return False
        del self._connections[oldest.task]
        self._closing.add(oldest.task)
        oldest.task.add_done_callback(self._closing.discard)
        oldest.task.cancel()
        oldest.writer.close()
        self.shed += 1
        return True

    async def _serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        async with asyncio.timeout(self._read_timeout):
            head = await reader.readuntil(b"\r\n\r\n")
        conn.idle = False
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._respond(writer, 400, b"bad request\n", head_only=False)
            return
        method, target, _ = parts
        path = target.split("?", 1)[0]
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"method not allowed\n", head_only=False)
            return
        if path == "/metrics":
            body = generate_latest(self._registry)
            await self._respond(writer, 200, body, head_only=head_only, ctype=CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = self._alive()
            await self._respond(
                writer, 200 if ok else 503, b"ok\n" if ok else b"not serving\n", head_only=head_only
            )
        elif path == "/readyz":
            ok = await self._ready()
            await self._respond(
                writer,
                200 if ok else 503,
                b"ready\n" if ok else b"not ready\n",
                head_only=head_only,
            )
        else:
            await self._respond(writer, 404, b"not found\n", head_only=head_only)

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        head_only: bool,
        ctype: str = "text/plain; charset=utf-8",
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}.get(
            status, "Service Unavailable"
        )
        header = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        writer.write(header if head_only else header + body)
        async with asyncio.timeout(_READ_TIMEOUT):
            await writer.drain()
