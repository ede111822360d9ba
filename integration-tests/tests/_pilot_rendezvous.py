"""A minimal Pilot registry and beacon for tests on one host (loopback only).

The ``pilotprotocol`` wheel ships the Go ``pilot-daemon`` but no registry or
beacon, and a daemon left to its defaults talks to the public network. This
module is a small stand-in written from the protocol's documented facts, just
enough for daemons on 127.0.0.1 to register, find each other and open tunnels:

Registry (TCP): each message is a 4-byte big-endian length and a JSON object
with a ``type`` field; the reply is one message of the same shape (``<type>_ok``,
or ``{"error": ...}``). A client may instead open with the 4 bytes ``PILT`` and a
version byte, after which frames are ``[u32 length][u8 type][payload]`` (type 0
carries JSON; 1/2/3 are binary heartbeat, lookup and resolve; 0xFF an error).

Beacon (UDP): ``0x01 [u32 node id]`` is answered with
``0x02 [u8 ip length][ip][u16 port]``, the endpoint the packet came from;
``0x05 [u32 source][u32 destination][payload]`` is relayed to the destination's
last discovered endpoint as ``0x06 [u32 source][payload]``;
``0x03 [u32 requester][u32 target]`` (punch request) sends each side
``0x04 [u8 ip length][ip][u16 port]``, the other side's endpoint.

Nodes are public unless they register with ``"public": false`` or call
``set_visibility``. A private node's endpoint is only resolved for a node it
shares a trust pair with, and its lookup carries no endpoint. Trust pairs come
from ``report_trust`` and from an accepted ``respond_handshake``; trust requests
relayed through the registry (``request_handshake``) wait in the target's inbox
until its next ``poll_handshakes``, and the answer waits in the requester's.
``check_trust`` answers true for public pairs as well (a test network of our own
processes, not an authority). Signatures are not verified. Node ids are assigned
per public key and kept for the life of the process, so a daemon restarted with
the same identity file gets the same address back.

With ``PILOT_RENDEZVOUS_TTL=<seconds>`` set, a node not heard from (register or
heartbeat) for that long is forgotten, as a real registry expires silent nodes.
``PILOT_RENDEZVOUS_HOST`` (default ``127.0.0.1``) is the address both listen on; the
NAT tests set it to the "public" address inside a network namespace they created.

The beacon counts what it does; the registry answers ``{"type": "beacon_stats"}`` with
those counters (``discovers``, ``punches``, ``relayed_frames``, ``relayed_bytes``, and
``relayed_by_pair`` keyed ``"<source>-><destination>"``), so a test can tell whether
traffic between two nodes went direct or through the relay.

Run: ``python _pilot_rendezvous.py`` prints ``ready <registry port> <beacon port>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast

_MAGIC = b"PILT"
_MAX_MESSAGE = 16 * 1024 * 1024
_LEN = struct.Struct(">I")


def address_text(node_id: int, network: int = 0) -> str:
    """The text form ``N:XXXX.XXXX.XXXX`` of a Pilot address."""
    digits = f"{node_id:012X}"
    return f"{network}:{digits[0:4]}.{digits[4:8]}.{digits[8:12]}"


@dataclass
class Node:
    node_id: int
    public_key: str
    real_addr: str
    lan_addrs: list[str] = field(default_factory=list[str])
    hostname: str = ""
    tags: list[str] = field(default_factory=list[str])
    version: str = ""
    last_seen: float = 0.0
    public: bool = True


class Registry:
    """Node directory: register, lookup, resolve, heartbeat and the small rest."""

    def __init__(self, ttl: float = 0.0) -> None:
        self.ttl = ttl
        self.nodes: dict[int, Node] = {}
        self.by_key: dict[str, int] = {}
        self.by_hostname: dict[str, int] = {}
        self.next_id = 1
        self.log: list[str] = []
        self.trust_pairs: set[frozenset[int]] = set()
        self.inbox: dict[int, list[dict[str, Any]]] = {}
        self.answers: dict[int, list[dict[str, Any]]] = {}
        self.beacon: Beacon | None = None

    def handle(self, msg: dict[str, Any], peer_host: str) -> dict[str, Any]:
        kind = str(msg.get("type", ""))
        self.log.append(kind)
        handler = getattr(self, f"_on_{kind}", None)
        if handler is None:
            return {"error": f"unknown message type: {kind!r}"}
        try:
            return handler(msg, peer_host)
        except (KeyError, TypeError, ValueError) as exc:
            return {"error": f"{kind}: {exc}"}

    def expire(self) -> None:
        """Forget nodes not heard from within ``ttl`` seconds (their ids stay reserved)."""
        if self.ttl <= 0:
            return
        cutoff = time.time() - self.ttl
        for node_id, node in list(self.nodes.items()):
            if node.last_seen < cutoff:
                del self.nodes[node_id]
                if node.hostname and self.by_hostname.get(node.hostname) == node_id:
                    del self.by_hostname[node.hostname]

    def _node(self, msg: dict[str, Any], key: str = "node_id") -> Node:
        self.expire()
        node = self.nodes.get(int(msg.get(key, 0)))
        if node is None:
            raise KeyError(f"node {msg.get(key)} not found")
        return node

    def _on_register(self, msg: dict[str, Any], peer_host: str) -> dict[str, Any]:
        key = str(msg["public_key"])
        listen = str(msg.get("listen_addr", ""))
        host, _, port = listen.rpartition(":")
        if not host or host in ("0.0.0.0", "::", "[::]"):
            listen = f"{peer_host}:{port}"
        self.expire()
        node_id = self.by_key.get(key)
        if node_id is None:
            node_id = self.next_id
            self.next_id += 1
            self.by_key[key] = node_id
        if node_id not in self.nodes:
            self.nodes[node_id] = Node(node_id, key, listen)
        node = self.nodes[node_id]
        node.real_addr = listen
        node.lan_addrs = [str(a) for a in msg.get("lan_addrs", []) or []]
        node.version = str(msg.get("version", ""))
        node.last_seen = time.time()
        if "public" in msg:
            node.public = bool(msg["public"])
        reply: dict[str, Any] = {
            "type": "register_ok",
            "node_id": node_id,
            "network_id": 0,
            "address": address_text(node_id),
            "public_key": key,
            "observed_addr": listen,
            "protocol_version": 1,
        }
        hostname = str(msg.get("hostname", ""))
        if hostname:
            self._set_hostname(node, hostname)
        if node.hostname:
            reply["hostname"] = node.hostname
        return reply

    def _set_hostname(self, node: Node, hostname: str) -> None:
        owner = self.by_hostname.get(hostname)
        if owner is not None and owner != node.node_id:
            raise ValueError(f"hostname {hostname!r} already in use by node {owner}")
        if node.hostname:
            self.by_hostname.pop(node.hostname, None)
        node.hostname = hostname
        if hostname:
            self.by_hostname[hostname] = node.node_id

    def lookup(self, node: Node) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "type": "lookup_ok",
            "node_id": node.node_id,
            "address": address_text(node.node_id),
            "networks": [0],
            "public_key": node.public_key,
            "public": node.public,
        }
        if node.public:
            reply["real_addr"] = node.real_addr
            reply["endpoint"] = node.real_addr
        if node.hostname:
            reply["hostname"] = node.hostname
        if node.tags:
            reply["tags"] = node.tags
        if node.version:
            reply["version"] = node.version
        return reply

    def _on_lookup(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        return self.lookup(self._node(msg))

    def trusts(self, a: int, b: int) -> bool:
        return frozenset((a, b)) in self.trust_pairs

    def may_resolve(self, node: Node, requester: int) -> bool:
        return node.public or requester == node.node_id or self.trusts(node.node_id, requester)

    def _on_resolve(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        node = self._node(msg)
        if not self.may_resolve(node, int(msg.get("requester_id", 0) or 0)):
            raise ValueError(f"node {node.node_id} is private and does not trust the requester")
        reply: dict[str, Any] = {
            "type": "resolve_ok",
            "node_id": node.node_id,
            "real_addr": node.real_addr,
            "key_age_days": 0,
        }
        if node.lan_addrs:
            reply["lan_addrs"] = node.lan_addrs
        return reply

    def _on_heartbeat(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        self._node(msg).last_seen = time.time()
        return {"type": "heartbeat_ok", "time": int(time.time())}

    def _on_resolve_hostname(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        hostname = str(msg.get("hostname", ""))
        self.expire()
        node_id = self.by_hostname.get(hostname)
        if node_id is None:
            raise KeyError(f"hostname {hostname!r} not found")
        return {
            "type": "resolve_hostname_ok",
            "node_id": node_id,
            "address": address_text(node_id),
            "public": self.nodes[node_id].public,
            "hostname": hostname,
        }

    def _on_set_hostname(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        node = self._node(msg)
        self._set_hostname(node, str(msg.get("hostname", "")))
        return {"type": "set_hostname_ok", "node_id": node.node_id, "hostname": node.hostname}

    def _on_set_tags(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        node = self._node(msg)
        node.tags = [str(t) for t in msg.get("tags", []) or []]
        return {"type": "set_tags_ok", "node_id": node.node_id, "tags": node.tags}

    def _on_set_visibility(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        node = self._node(msg)
        node.public = bool(msg.get("public"))
        visibility = "public" if node.public else "private"
        return {"type": "set_visibility_ok", "node_id": node.node_id, "visibility": visibility}

    def _on_deregister(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        return {"type": "deregister_ok"}

    def _pair(self, msg: dict[str, Any]) -> tuple[Node, Node]:
        return self._node(msg), self._node(msg, "peer_id")

    def _on_report_trust(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        a, b = self._pair(msg)
        self.trust_pairs.add(frozenset((a.node_id, b.node_id)))
        return {"type": "report_trust_ok"}

    def _on_revoke_trust(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        a, b = self._pair(msg)
        self.trust_pairs.discard(frozenset((a.node_id, b.node_id)))
        return {"type": "revoke_trust_ok"}

    def _on_check_trust(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        a, b = self._pair(msg)
        trusted = (a.public and b.public) or self.trusts(a.node_id, b.node_id)
        return {"type": "check_trust_ok", "trusted": trusted}

    def _on_request_handshake(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        sender = self._node(msg, "from_node_id")
        target = self._node(msg, "to_node_id")
        box = self.inbox.setdefault(target.node_id, [])
        if any(int(r["from_node_id"]) == sender.node_id for r in box):
            raise ValueError(f"handshake request already pending from node {sender.node_id}")
        if len(box) >= 256:
            raise ValueError(f"handshake inbox full for node {target.node_id}")
        box.append(
            {
                "from_node_id": sender.node_id,
                "justification": str(msg.get("justification", "")),
                "timestamp": int(time.time()),
            }
        )
        return {"type": "request_handshake_ok", "status": "delivered"}

    def _on_respond_handshake(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        responder, requester = self._pair(msg)
        accept = bool(msg.get("accept"))
        if accept:
            self.trust_pairs.add(frozenset((responder.node_id, requester.node_id)))
        self.answers.setdefault(requester.node_id, []).append(
            {"from_node_id": responder.node_id, "accept": accept, "timestamp": int(time.time())}
        )
        return {"type": "respond_handshake_ok", "accept": accept, "peer_id": requester.node_id}

    def _on_poll_handshakes(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        node = self._node(msg)
        return {
            "type": "poll_handshakes_ok",
            "requests": self.inbox.pop(node.node_id, []),
            "responses": self.answers.pop(node.node_id, []),
        }

    def _on_poll_invites(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        return {"type": "poll_invites_ok", "invites": []}

    def _on_punch(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        return {"type": "punch_ok"}

    def _on_beacon_stats(self, msg: dict[str, Any], _peer: str) -> dict[str, Any]:
        stats = self.beacon.stats() if self.beacon is not None else {}
        return {"type": "beacon_stats_ok", **stats}

    # -- binary frames -------------------------------------------------------

    def binary(self, kind: int, payload: bytes, peer_host: str) -> tuple[int, bytes]:
        try:
            if kind == 0x00:
                reply = self.handle(json.loads(payload), peer_host)
                return 0x00, json.dumps(reply).encode()
            if kind == 0x01:  # heartbeat: node id, signature
                (node_id,) = struct.unpack_from(">I", payload)
                self._node({"node_id": node_id}).last_seen = time.time()
                return 0x81, struct.pack(">qB", int(time.time()), 0)
            if kind == 0x02:  # lookup: node id
                (node_id,) = struct.unpack_from(">I", payload)
                return 0x82, _encode_lookup(self._node({"node_id": node_id}))
            if kind == 0x03:  # resolve: node id, requester id, signature
                node_id, requester = struct.unpack_from(">II", payload)
                node = self._node({"node_id": node_id})
                if not self.may_resolve(node, requester):
                    raise ValueError(f"node {node_id} is private and does not trust the requester")
                return 0x83, _encode_resolve(node)
        except (KeyError, struct.error, ValueError) as exc:
            return 0xFF, _encode_error(str(exc))
        return 0xFF, _encode_error(f"unknown binary message type {kind}")


def _short(text: str) -> bytes:
    raw = text.encode()[:255]
    return bytes([len(raw)]) + raw


def _encode_lookup(node: Node) -> bytes:
    import base64

    key = base64.b64decode(node.public_key)
    out = bytearray(struct.pack(">IBIH", node.node_id, 0x01 if node.public else 0x00, 0, 1))
    out += struct.pack(">H", 0)  # network ids: [0]
    out += bytes([len(key)]) + key
    out += _short(node.hostname)
    out += bytes([len(node.tags)])
    for tag in node.tags:
        out += _short(tag)
    real = node.real_addr.encode() if node.public else b""
    out += struct.pack(">H", len(real)) + real
    out += _short("")  # external id
    return bytes(out)


def _encode_resolve(node: Node) -> bytes:
    real = node.real_addr.encode()
    out = bytearray(struct.pack(">IH", node.node_id, len(real)) + real)
    out += struct.pack(">H", len(node.lan_addrs))
    for lan in node.lan_addrs:
        raw = lan.encode()
        out += struct.pack(">H", len(raw)) + raw
    out += struct.pack(">I", 0)  # key age in days
    return bytes(out)


def _encode_error(message: str) -> bytes:
    raw = message.encode()[:65000]
    return struct.pack(">H", len(raw)) + raw


async def _serve_registry(
    registry: Registry, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    peer = writer.get_extra_info("peername")
    peer_host = str(peer[0]) if peer else "127.0.0.1"
    try:
        head = await reader.readexactly(4)
        if head == _MAGIC:
            await reader.readexactly(1)  # protocol version
            while True:
                (length,) = _LEN.unpack(await reader.readexactly(4))
                if not 1 <= length <= _MAX_MESSAGE:
                    return
                body = await reader.readexactly(length)
                kind, payload = registry.binary(body[0], body[1:], peer_host)
                writer.write(struct.pack(">IB", len(payload) + 1, kind) + payload)
                await writer.drain()
        while True:
            (length,) = _LEN.unpack(head)
            if length > _MAX_MESSAGE:
                return
            msg = json.loads(await reader.readexactly(length))
            reply = json.dumps(registry.handle(msg, peer_host)).encode()
            writer.write(_LEN.pack(len(reply)) + reply)
            await writer.drain()
            head = await reader.readexactly(4)
    except (asyncio.IncompleteReadError, ConnectionError, json.JSONDecodeError):
        pass
    finally:
        writer.close()


class Beacon(asyncio.DatagramProtocol):
    """Discover replies (the observed endpoint) and relays between nodes."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.endpoints: dict[int, tuple[str, int]] = {}
        self.discovers = 0
        self.punches = 0
        self.relayed_frames = 0
        self.relayed_bytes = 0
        self.relayed_by_pair: dict[str, int] = {}

    def stats(self) -> dict[str, Any]:
        return {
            "discovers": self.discovers,
            "punches": self.punches,
            "relayed_frames": self.relayed_frames,
            "relayed_bytes": self.relayed_bytes,
            "relayed_by_pair": dict(self.relayed_by_pair),
            "endpoints": {str(k): f"{h}:{p}" for k, (h, p) in self.endpoints.items()},
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if len(data) < 5 or self.transport is None:
            return
        host, port = str(addr[0]), int(addr[1])
        (node_id,) = struct.unpack_from(">I", data, 1)
        if data[0] == 0x01:
            self.discovers += 1
            self.endpoints[node_id] = (host, port)
            self.transport.sendto(bytes([0x02]) + _endpoint_bytes((host, port)), addr)
        elif data[0] == 0x03 and len(data) >= 9:
            (target,) = struct.unpack_from(">I", data, 5)
            mine, theirs = self.endpoints.get(node_id), self.endpoints.get(target)
            if mine is None or theirs is None:
                return
            self.punches += 1
            self.transport.sendto(bytes([0x04]) + _endpoint_bytes(theirs), mine)
            self.transport.sendto(bytes([0x04]) + _endpoint_bytes(mine), theirs)
        elif data[0] == 0x05 and len(data) >= 9:
            (dest_id,) = struct.unpack_from(">I", data, 5)
            dest = self.endpoints.get(dest_id)
            if dest is None:
                return
            self.relayed_frames += 1
            self.relayed_bytes += len(data) - 9
            pair = f"{node_id}->{dest_id}"
            self.relayed_by_pair[pair] = self.relayed_by_pair.get(pair, 0) + 1
            self.transport.sendto(b"\x06" + struct.pack(">I", node_id) + data[9:], dest)


def _endpoint_bytes(endpoint: tuple[str, int]) -> bytes:
    ip = bytes(int(part) for part in endpoint[0].split("."))
    return bytes([len(ip)]) + ip + struct.pack(">H", endpoint[1])


async def main() -> None:
    registry = Registry(float(os.environ.get("PILOT_RENDEZVOUS_TTL", "0") or 0))
    host = os.environ.get("PILOT_RENDEZVOUS_HOST") or "127.0.0.1"
    server = await asyncio.start_server(
        lambda r, w: _serve_registry(registry, r, w),
        host,
        int(sys.argv[1]) if len(sys.argv) > 1 else 0,
    )
    loop = asyncio.get_running_loop()
    transport, beacon = await loop.create_datagram_endpoint(
        Beacon, local_addr=(host, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    )
    registry.beacon = beacon
    reg_port = server.sockets[0].getsockname()[1]
    beacon_port = transport.get_extra_info("sockname")[1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {reg_port} {beacon_port}", flush=True)
    async with server:
        await stop.wait()
    transport.close()
    with contextlib.suppress(Exception):
        print("requests " + " ".join(sorted(set(registry.log))), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
