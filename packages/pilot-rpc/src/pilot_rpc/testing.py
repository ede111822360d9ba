"""Test helpers: an in-memory client/server pair, no sockets, no TLS, no identities.

>>> server = RpcServer()
>>> @server.unary("echo")
... async def echo(request, ctx):
...     return request
>>> async with connect_in_memory(server) as pair:
...     assert await pair.call("echo", 1) == 1
...     async with pair.stream("count", 3) as items: ...

The server sees ``ctx.peer`` as a ``PeerInfo`` named ``client_name``. Use
``pair.break_connections()`` to simulate the network failing under the calls.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from pilot_transport import PeerInfo

from pilot_rpc._client import ResponseStream, RpcClient
from pilot_rpc._driver import ServerConnection
from pilot_rpc._memory import MemoryStream, memory_stream_pair
from pilot_rpc._options import ClientOptions
from pilot_rpc._server import RpcServer

__all__ = ["InMemoryTransport", "RpcTestPair", "connect_in_memory", "fake_peer"]


def fake_peer(name: str) -> PeerInfo:
    """A ``PeerInfo`` for tests, with a key derived from ``name`` (not a real identity)."""
    key = hashlib.sha256(name.encode()).digest()
    return PeerInfo.from_public_key(key, name=name)


class InMemoryTransport:
    """A stand-in for ``pilot_transport.Transport`` whose ``connect`` reaches ``server``."""

    url = "memory-rpc://"
    preferred_pool_size = 1
    """Connections per peer an RpcClient keeps (``TransportLike.preferred_pool_size``)."""

    def __init__(self, server: RpcServer, *, client_name: str, server_name: str) -> None:
        self.server = server
        self.client_peer = fake_peer(client_name)
        self.server_peer = fake_peer(server_name)
        self.server_name = server_name
        self.streams: list[MemoryStream] = []
        self.server_connections: list[ServerConnection] = []
        self.refuse: BaseException | None = None
        """Set to an exception to make the next connects fail with it."""

    async def connect(self, peer: str, port: int, *, timeout: float | None = None) -> MemoryStream:  # noqa: ASYNC109
        """A new in-memory connection to the server (``port`` and ``timeout`` are ignored).

        While ``refuse`` is set, raises that exception instead.

        Raises:
            UnknownPeerError: ``peer`` is not the server's name.
            PeerUnreachableError: the server is draining.
        """
        from pilot_transport.errors import PeerUnreachableError, UnknownPeerError

        if self.refuse is not None:
            raise self.refuse
        if peer != self.server_name:
            raise UnknownPeerError(f"no peer named {peer!r} in the in-memory network")
        if self.server._draining:  # pyright: ignore[reportPrivateUsage]
            raise PeerUnreachableError(f"{peer} is not serving")
        client_end, server_end = memory_stream_pair(self.client_peer, self.server_peer)
        self.streams.append(client_end)
        conn = self.server._start_connection(server_end)  # pyright: ignore[reportPrivateUsage]
        self.server_connections.append(conn)
        return client_end

    async def aclose(self) -> None:
        """Close the server ends of every connection made (the server itself stays usable)."""
        conns = self.server_connections
        self.server_connections = []
        for conn in conns:
            conn.cancel_all()
        await asyncio.gather(*(conn.wait_calls(1.0) for conn in conns))
        await asyncio.gather(*(conn.aclose() for conn in conns), return_exceptions=True)

    def break_connections(self) -> None:
        """Break every connection made so far, as a lost network link would."""
        for stream in self.streams:
            stream.break_connection()
        self.streams.clear()


class RpcTestPair:
    """A client connected in memory to a server; ``call``/``stream`` need no peer or port."""

    def __init__(self, client: RpcClient, server: RpcServer, transport: InMemoryTransport) -> None:
        self.client = client
        self.server = server
        self.transport = transport
        self.peer = transport.server_name
        self.port = 1

    async def call(self, method: str, request: Any = None, **kwargs: Any) -> Any:
        """``client.call(peer, port, method, request, **kwargs)``."""
        return await self.client.call(self.peer, self.port, method, request, **kwargs)

    def stream(
        self, method: str, request: Any = None, **kwargs: Any
    ) -> AbstractAsyncContextManager[ResponseStream]:
        """``client.stream(peer, port, method, request, **kwargs)``."""
        return self.client.stream(self.peer, self.port, method, request, **kwargs)

    def break_connections(self) -> None:
        """Make every open connection fail as if the network broke."""
        self.transport.break_connections()


@asynccontextmanager
async def connect_in_memory(
    server: RpcServer,
    *,
    client_options: ClientOptions | None = None,
    client_name: str = "client",
    server_name: str = "server",
) -> AsyncGenerator[RpcTestPair]:
    """A client whose connections reach ``server`` in memory; all are closed on exit.

    The server is not closed: the same server may back several pairs.
    """
    transport = InMemoryTransport(server, client_name=client_name, server_name=server_name)
    client = RpcClient(transport, options=client_options)
    try:
        yield RpcTestPair(client, server, transport)
    finally:
        await client.aclose()
        await transport.aclose()
