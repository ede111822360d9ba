"""Client of the Pilot registry: the directory of node ids, keys, endpoints and trust.

Wire facts (protocol documentation and observed 1.18.0 traffic): TCP; each message is a
u32 big-endian length and a JSON object with a ``type``; the reply has the same shape
(``<type>_ok`` fields, or ``{"error": text}``). Calls that act for a node carry a base64
Ed25519 ``signature`` of a short challenge string:

=================== =================================================
message             challenge
=================== =================================================
register            ``register:<listen_addr>:<public key b64>``
heartbeat           ``heartbeat:<node>``
resolve             ``resolve:<requester>:<node>``
poll_handshakes     ``poll_handshakes:<node>``
request_handshake   ``handshake:<from>:<to>``
respond_handshake   ``respond:<node>:<peer>``
report_trust        ``report_trust:<node>:<peer>``
revoke_trust        ``revoke_trust:<node>:<peer>``
set_hostname        ``set_hostname:<node>``
set_visibility      ``set_visibility:<node>``
deregister          ``deregister:<node>``
=================== =================================================
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any, cast

from ._identity import NodeIdentity
from .errors import (
    PilotTimeoutError,
    RegistryError,
    RegistryRefusedError,
    RegistryUnavailableError,
)

__all__ = [
    "HandshakeInbox",
    "LookupResult",
    "Registration",
    "RegistryClient",
    "decode_message",
    "encode_message",
    "parse_endpoint",
]

MAX_MESSAGE = 4 * 1024 * 1024
_LEN = struct.Struct(">I")


def encode_message(msg: dict[str, Any]) -> bytes:
    """One length-prefixed JSON registry message.

    Raises:
        RegistryError: the message is too large.
    """
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise RegistryError(f"registry message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return _LEN.pack(len(body)) + body


def decode_message(body: bytes) -> dict[str, Any]:
    """Parse one registry message body (without its length prefix).

    Raises:
        RegistryError: not a JSON object.
    """
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise RegistryError(f"registry sent malformed JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RegistryError("registry sent a JSON value that is not an object")
    return cast(dict[str, Any], doc)


def parse_endpoint(text: str, *, allow_zero: bool = False) -> tuple[str, int] | None:
    """``"host:port"`` (IPv6 in brackets) as a tuple, or None when empty or malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    host = host.strip("[]")
    number = int(port)
    if not (0 if allow_zero else 1) <= number < 65536:
        return None
    return host, number


@dataclass(frozen=True, slots=True)
class Registration:
    """What the registry assigned to us."""

    node_id: int
    address: str
    observed_addr: str
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class LookupResult:
    """A node's public directory entry."""

    node_id: int
    address: str
    public_key: bytes
    public: bool
    hostname: str = ""
    endpoint: tuple[str, int] | None = None
    version: str = ""


@dataclass(frozen=True, slots=True)
class HandshakeInbox:
    """Relayed trust requests addressed to us, and answers to our own requests."""

    requests: tuple[tuple[int, str], ...] = ()
    """(from node id, justification) pairs."""
    responses: tuple[tuple[int, bool], ...] = ()
    """(from node id, accepted) pairs."""


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RegistryClient:
    """An asyncio client of one registry (a single connection, calls strictly in turn).

    Every call has a deadline (``timeout``); a broken connection is reopened once per call.
    """

    def __init__(
        self, host: str, port: int, identity: NodeIdentity, *, timeout: float = 10.0
    ) -> None:
        self.host = host
        self.port = port
        self.identity = identity
        self.timeout = timeout
        self.node_id = 0
        self._conn: _Conn | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def aclose(self) -> None:
        """Close the connection. Safe to repeat."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(conn.writer.wait_closed(), 2.0)

    async def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one message and return the reply.

        Raises:
            RegistryUnavailableError: unreachable, or the connection broke twice.
            RegistryRefusedError: the registry answered with an error.
            PilotTimeoutError: no reply within ``timeout``.

        Cancellation drops the connection (a half-read reply cannot be resumed).
        """
        if self._closed:
            raise RegistryUnavailableError("registry client is closed")
        frame = encode_message(msg)
        async with self._lock:
            last: Exception | None = None
            for _attempt in range(2):
                try:
                    reply = await asyncio.wait_for(self._roundtrip(frame), self.timeout)
                except TimeoutError:
                    await self._drop()
                    raise PilotTimeoutError(
                        f"registry {self.host}:{self.port} did not answer {msg.get('type')!r} "
                        f"within {self.timeout} s"
                    ) from None
                except (OSError, asyncio.IncompleteReadError, RegistryError) as exc:
                    last = exc
                    await self._drop()
                    continue
                except BaseException:
                    await self._drop()
                    raise
                error = reply.get("error")
                if error is not None:
                    raise RegistryRefusedError(str(error))
                return reply
            raise RegistryUnavailableError(
                f"registry {self.host}:{self.port} unreachable: {last}"
            ) from last

    async def _roundtrip(self, frame: bytes) -> dict[str, Any]:
        if self._conn is None:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self._conn = _Conn(reader, writer)
        conn = self._conn
        conn.writer.write(frame)
        await conn.writer.drain()
        (length,) = _LEN.unpack(await conn.reader.readexactly(4))
        if length > MAX_MESSAGE:
            raise RegistryError(f"registry reply of {length} bytes exceeds {MAX_MESSAGE}")
        return decode_message(await conn.reader.readexactly(length))

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.writer.close()

    def _sign(self, challenge: str) -> str:
        return self.identity.sign_b64(challenge)

    # -- calls -----------------------------------------------------------------------------

    async def register(
        self, listen_addr: str, *, hostname: str = "", lan_addrs: list[str] | None = None
    ) -> Registration:
        """Register (or re-register: the same key keeps its node id) and set the hostname.

        Raises:
            RegistryError: as :meth:`call`; also when the reply lacks a node id.
        """
        key = self.identity.public_key_b64
        msg: dict[str, Any] = {
            "type": "register",
            "listen_addr": listen_addr,
            "public_key": key,
            "version": "pilot-node",
            "signature": self._sign(f"register:{listen_addr}:{key}"),
        }
        if hostname:
            msg["hostname"] = hostname
        if lan_addrs:
            msg["lan_addrs"] = lan_addrs
        reply = await self.call(msg)
        node_id = int(reply.get("node_id") or 0)
        if not node_id:
            raise RegistryError(f"register reply carries no node id: {reply}")
        self.node_id = node_id
        got_hostname = str(reply.get("hostname") or "")
        if hostname and got_hostname != hostname:
            await self.set_hostname(hostname)
            got_hostname = hostname
        return Registration(
            node_id,
            str(reply.get("address", "")),
            str(reply.get("observed_addr", "")),
            got_hostname,
        )

    async def heartbeat(self) -> None:
        """Tell the registry we are alive. Raises as :meth:`call`."""
        await self.call(
            {
                "type": "heartbeat",
                "node_id": self.node_id,
                "signature": self._sign(f"heartbeat:{self.node_id}"),
            }
        )

    async def set_hostname(self, hostname: str) -> None:
        """Set (or with ``""`` clear) our hostname. Raises as :meth:`call`."""
        await self.call(
            {
                "type": "set_hostname",
                "node_id": self.node_id,
                "hostname": hostname,
                "signature": self._sign(f"set_hostname:{self.node_id}"),
            }
        )

    async def set_visibility(self, public: bool) -> None:
        """Make our endpoint resolvable by anyone (public) or by trusted peers only."""
        await self.call(
            {
                "type": "set_visibility",
                "node_id": self.node_id,
                "public": public,
                "signature": self._sign(f"set_visibility:{self.node_id}"),
            }
        )

    async def lookup(self, node_id: int) -> LookupResult:
        """A node's directory entry (its key, hostname, and endpoint if public).

        Raises:
            RegistryRefusedError: unknown node. Otherwise as :meth:`call`.
        """
        reply = await self.call({"type": "lookup", "node_id": node_id})
        try:
            key = base64.b64decode(str(reply.get("public_key", "")), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        endpoint = parse_endpoint(str(reply.get("real_addr") or reply.get("endpoint") or ""))
        return LookupResult(
            int(reply.get("node_id") or node_id),
            str(reply.get("address", "")),
            key,
            bool(reply.get("public", False)),
            str(reply.get("hostname") or ""),
            endpoint,
            str(reply.get("version") or ""),
        )

    async def resolve(self, node_id: int) -> tuple[str, int]:
        """The UDP endpoint of ``node_id`` (allowed when it is public or trusts us).

        Raises:
            RegistryRefusedError: unknown, or private and not trusting us.
            RegistryError: the reply carries no usable endpoint.
        """
        reply = await self.call(
            {
                "type": "resolve",
                "node_id": node_id,
                "requester_id": self.node_id,
                "signature": self._sign(f"resolve:{self.node_id}:{node_id}"),
            }
        )
        endpoint = parse_endpoint(str(reply.get("real_addr") or ""))
        if endpoint is None:
            raise RegistryError(f"resolve of node {node_id} returned no endpoint: {reply}")
        return endpoint

    async def resolve_hostname(self, hostname: str) -> int:
        """The node id registered under ``hostname``. Raises as :meth:`call`."""
        reply = await self.call(
            {"type": "resolve_hostname", "hostname": hostname, "requester_id": self.node_id}
        )
        node_id = int(reply.get("node_id") or 0)
        if not node_id:
            raise RegistryError(f"resolve_hostname reply carries no node id: {reply}")
        return node_id

    async def request_handshake(self, peer_id: int, justification: str) -> None:
        """Leave a trust request in ``peer_id``'s registry inbox. Raises as :meth:`call`."""
        await self.call(
            {
                "type": "request_handshake",
                "from_node_id": self.node_id,
                "to_node_id": peer_id,
                "justification": justification,
                "signature": self._sign(f"handshake:{self.node_id}:{peer_id}"),
            }
        )

    async def respond_handshake(self, peer_id: int, accept: bool) -> None:
        """Approve or reject ``peer_id``'s relayed request. Raises as :meth:`call`."""
        await self.call(
            {
                "type": "respond_handshake",
                "node_id": self.node_id,
                "peer_id": peer_id,
                "accept": accept,
                "signature": self._sign(f"respond:{self.node_id}:{peer_id}"),
            }
        )

    async def report_trust(self, peer_id: int) -> None:
        """Record at the registry that we trust ``peer_id``. Raises as :meth:`call`."""
        await self.call(
            {
                "type": "report_trust",
                "node_id": self.node_id,
                "peer_id": peer_id,
                "signature": self._sign(f"report_trust:{self.node_id}:{peer_id}"),
            }
        )

    async def poll_handshakes(self) -> HandshakeInbox:
        """Fetch (and clear) our relayed handshake inbox. Raises as :meth:`call`."""
        reply = await self.call(
            {
                "type": "poll_handshakes",
                "node_id": self.node_id,
                "signature": self._sign(f"poll_handshakes:{self.node_id}"),
            }
        )
        requests: list[tuple[int, str]] = []
        for item in cast(list[Any], reply.get("requests") or []):
            if isinstance(item, dict):
                entry = cast(dict[str, Any], item)
                requests.append(
                    (int(entry.get("from_node_id") or 0), str(entry.get("justification") or ""))
                )
        responses: list[tuple[int, bool]] = []
        for item in cast(list[Any], reply.get("responses") or []):
            if isinstance(item, dict):
                entry = cast(dict[str, Any], item)
                responses.append((int(entry.get("from_node_id") or 0), bool(entry.get("accept"))))
        return HandshakeInbox(tuple(requests), tuple(responses))

    async def deregister(self) -> None:
        """Remove our entry. Raises as :meth:`call`."""
        await self.call(
            {
                "type": "deregister",
                "node_id": self.node_id,
                "signature": self._sign(f"deregister:{self.node_id}"),
            }
        )
