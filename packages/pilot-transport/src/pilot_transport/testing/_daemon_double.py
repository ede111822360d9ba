"""An in-process asyncio double of the Pilot daemon's Unix-socket protocol.

:class:`PilotDaemonDouble` listens on a real Unix socket (mode 0600) and
speaks the daemon's frame protocol as PILOT-DAEMON.md describes it, quirks
included, so the ``pilot://`` carrier can be tested end to end without the Go
daemon. Several doubles joined to one :class:`PilotNetworkDouble` behave like
daemons on different hosts: they dial each other by Pilot address
(``0:0000.0000.0001``, ``0:0000.0000.0002``, ...).

Reproduced
----------

- Frames ``[u32 L][cmd][payload]``; ``L == 0`` is ignored; ``L > 1,048,576``
  drops the whole client connection, with its streams and bound ports.
- No request ids: one client's commands are handled strictly one after another
  and answered in order (so a slow ``Dial`` blocks that client's later
  commands, not other clients').
- ``Send``/``SendTo`` have no success reply; a failure (unknown conn id,
  closed stream, datagram over 65,535 bytes, unknown destination) comes later
  as an ``Error`` frame carrying no id.
- ``Close`` is always answered with ``CloseOK``, even for unknown ids; closing
  an open stream yields a second, unsolicited ``CloseOK`` when it ends; the
  remote end gets an unsolicited ``CloseOK``.
- Unknown commands get ``Error`` and the connection continues.
- ``Bind`` has no ephemeral assignment and no Unbind: a port stays bound until
  the client's connection closes. ``Accept`` pushes carry ``local_port``.
- ``Recv`` segments carry at most 4096 data bytes (``segment_size``; 1.18.0
  sends at most 1152). A segment that begins with
  ``SACK`` plus a byte 1-4 is swallowed and the stream stalls (no later data
  is delivered), as the real daemon does.
- ``RecvFrom`` goes to every client of the receiving daemon, whatever its ports.
- Close is not ordered after the data: stream data reaches the peer on a later
  turn of the event loop, and a ``Close`` (or a client dropping its connection)
  discards what is still in flight, as the real daemon drops the unacknowledged
  tail (``close_drops_unacked=False`` delivers at once instead).
- ``Info``, ``ResolveHostname``, ``SetHostname``, ``SetVisibility``,
  ``SetTags``, ``SetWebhook``, ``SetTaskExec``, ``Deregister`` and the
  ``Handshake`` sub-commands answer JSON shaped like the daemon's.
- Well-known services: port 7 echo, port 1002 event stream (first event is the
  subscription, ``*`` = all topics, publishes fan out to the other
  subscribers, no persistence).
- ``stop()`` then ``start()`` is a daemon restart: every client, stream and
  bound port is gone and conn ids start again.
- Knobs: ``unreachable_dial_delay`` (a dial to a stopped, unknown or
  ``network.unreachable`` node fails after this long; the real daemon takes
  ~30 s), ``hold_accepts`` with ``accept_backlog`` (past 64 pending accepts an
  inbound stream is silently dropped while the dialer believes it is
  connected), ``command_delay`` to make chosen commands slow, ``push_error()``
  to inject a stray Send failure.

Run ``python -m pilot_transport.testing._run_daemon_double --socket A --socket B``
to serve linked doubles from a separate process (it prints ``ready`` plus the
addresses once listening, and runs until killed).

- Nagle with delayed ACK, counted rather than timed: a small ``Send`` (below
  one segment) on a stream end whose previous ``Send`` the peer has not yet
  answered with data of its own, within ``nagle_window`` seconds, is one the
  real daemon holds until its delayed ACK (6-40 ms measured with 1.18.0);
  ``nagle_stalls`` counts them. Data is still delivered at once.

Not reproduced: delayed-ACK latency itself, congestion windows, the
FIN|ACK storm, the ~2 min EOF delay after a remote crash (a stopped double
ends its streams at once), and the wedge caused by a client that stops reading.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pilot_transport._address import Address, SocketAddress
from pilot_transport._carriers import _pilot_ipc as ipc
from pilot_transport._carriers._pilot_ipc import Cmd, HandshakeSub

__all__ = ["PilotDaemonDouble", "PilotNetworkDouble"]

_log = logging.getLogger("pilot_transport.testing.daemon_double")

SEGMENT_SIZE = 4096
ECHO_PORT = 7
EVENT_PORT = 1002
_EPHEMERAL_FIRST = 49152
_MAX_EVENT = 16 * 1024 * 1024
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class PilotNetworkDouble:
    """The "internet" between daemon doubles: addresses, hostnames and trust.

    Attributes:
        unreachable: addresses whose dials fail (after the dialling double's
            ``unreachable_dial_delay``), as if their host were cut off.
    """

    def __init__(self, network_id: int = 0) -> None:
        self.network_id = network_id
        self._daemons: dict[Address, PilotDaemonDouble] = {}
        self._next_node = 1
        self.unreachable: set[Address] = set()

    def _register(self, daemon: PilotDaemonDouble) -> Address:
        address = Address(self.network_id, self._next_node)
        self._next_node += 1
        self._daemons[address] = daemon
        return address

    def lookup(self, address: Address) -> PilotDaemonDouble | None:
        """The running double at ``address``, if reachable."""
        daemon = self._daemons.get(address)
        if daemon is None or not daemon.running or address in self.unreachable:
            return None
        return daemon

    def by_hostname(self, hostname: str) -> PilotDaemonDouble | None:
        """The double registered under ``hostname``, if any (running or not)."""
        for daemon in self._daemons.values():
            if daemon.hostname == hostname and daemon.registered:
                return daemon
        return None

    def by_node(self, node_id: int) -> PilotDaemonDouble | None:
        """The double with node number ``node_id`` on this network, if any (running or not)."""
        return self._daemons.get(Address(self.network_id, node_id))


@dataclass(eq=False)
class _Client:
    writer: asyncio.StreamWriter
    ports: set[int] = field(default_factory=lambda: set())
    conns: set[int] = field(default_factory=lambda: set())
    closed: bool = False

    def push(self, frame: bytes) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(frame)


@dataclass(eq=False)
class _Conn:
    id: int
    daemon: PilotDaemonDouble
    local_port: int
    remote: SocketAddress
    owner: _Client | None = None
    service: _Service | None = None
    peer: _Conn | None = None
    open: bool = True
    stalled: bool = False
    in_flight: list[bytes] = field(default_factory=lambda: [])
    """Data sent towards this end and not yet delivered (not yet acknowledged)."""
    unanswered_since: float | None = None
    """When this end's last Send went out, while the peer has sent nothing since."""

    def arrive(self, data: bytes) -> None:
        """Data sent by the peer: delivered on a later turn of the event loop."""
        if not self.in_flight:
            asyncio.get_running_loop().call_soon(self._flush)
        self.in_flight.append(data)

    def _flush(self) -> None:
        pending, self.in_flight = self.in_flight, []
        for data in pending:
            self.deliver(data)

    def deliver(self, data: bytes) -> None:
        """Data arriving for this end, cut into segments as the daemon does."""
        size = self.daemon.segment_size
        for start in range(0, len(data), size):
            if self.stalled or not self.open:
                return
            segment = data[start : start + size]
            if segment[:4] == b"SACK" and len(segment) > 4 and 1 <= segment[4] <= 4:
                self.stalled = True  # swallowed as a SACK block; the stream never recovers
                return
            if self.owner is not None:
                self.owner.push(ipc.recv(self.id, segment))
            elif self.service is not None:
                self.service.on_data(self, segment)

    def send(self, data: bytes) -> bool:
        peer = self.peer
        if not self.open or peer is None or not peer.open:
            return False
        daemon = self.daemon
        now = time.monotonic()
        since = self.unanswered_since
        if (
            since is not None
            and now - since < daemon.nagle_window
            and len(data) < daemon.segment_size
        ):
            daemon.nagle_stalls += 1
        self.unanswered_since = now
        peer.unanswered_since = None  # our data carries the acknowledgement of theirs
        if self.daemon.close_drops_unacked and peer.service is None:
            peer.arrive(data)  # across the tunnel; a daemon's own service takes it at once
        else:
            peer.deliver(data)
        return True


class _Service:
    def on_data(self, conn: _Conn, data: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_close(self, conn: _Conn) -> None:
        """The stream ended."""


class _EchoService(_Service):
    def on_data(self, conn: _Conn, data: bytes) -> None:
        conn.send(data)


class _EventService(_Service):
    """Port 1002: ``[u16 topic_len][topic][u32 len][payload]`` events."""

    def __init__(self) -> None:
        self._buffers: dict[int, bytearray] = {}
        self._topics: dict[int, str] = {}
        self._conns: dict[int, _Conn] = {}

    def on_data(self, conn: _Conn, data: bytes) -> None:
        buf = self._buffers.setdefault(conn.id, bytearray())
        self._conns[conn.id] = conn
        buf += data
        while True:
            if len(buf) < 2:
                return
            (tlen,) = _U16.unpack_from(buf)
            if len(buf) < 2 + tlen + 4:
                return
            (plen,) = _U32.unpack_from(buf, 2 + tlen)
            if plen > _MAX_EVENT:
                conn.daemon._close_conn(conn, reply_to=None)
                return
            end = 2 + tlen + 4 + plen
            if len(buf) < end:
                return
            event = bytes(buf[:end])
            topic = bytes(buf[2 : 2 + tlen]).decode("utf-8", "replace")
            del buf[:end]
            if conn.id not in self._topics:
                self._topics[conn.id] = topic
                continue
            for cid, subscribed in list(self._topics.items()):
                if cid == conn.id:
                    continue
                if subscribed == topic or (subscribed == "*" and topic != "*"):
                    self._conns[cid].send(event)

    def on_close(self, conn: _Conn) -> None:
        self._buffers.pop(conn.id, None)
        self._topics.pop(conn.id, None)
        self._conns.pop(conn.id, None)


class PilotDaemonDouble:
    """A fake Pilot daemon on a real Unix socket; see the module docstring.

    Args:
        socket_path: where to listen (a stale file there is replaced).
        network: the network linking several doubles (a private one if None).
        hostname: registered hostname (resolvable through any linked double).
        public: whether the node resolves for anyone (else only for nodes it trusts).
        unreachable_dial_delay: seconds before a dial to an unreachable node fails.
        accept_backlog: pending accepts kept per port while ``hold_accepts``.
        async_error_delay: seconds before a failed Send's Error frame.
        close_drops_unacked: a Close discards stream data still in flight.
        segment_size: largest Recv payload (4096 older daemons, 1152 in 1.18.0).

    Use as ``async with PilotDaemonDouble(path) as daemon: ...`` or call
    :meth:`start` / :meth:`stop` (a stop followed by a start is a restart).
    """

    def __init__(
        self,
        socket_path: str,
        *,
        network: PilotNetworkDouble | None = None,
        hostname: str = "",
        public: bool = False,
        unreachable_dial_delay: float = 0.2,
        accept_backlog: int = 64,
        async_error_delay: float = 0.002,
        close_drops_unacked: bool = True,
        segment_size: int = SEGMENT_SIZE,
    ) -> None:
        self.socket_path = socket_path
        self.network = network or PilotNetworkDouble()
        self.address = self.network._register(self)
        self.hostname = hostname
        self.public = public
        self.registered = True
        self.tags: list[str] = []
        self.webhook = ""
        self.task_exec = False
        self.public_key = base64.b64encode(os.urandom(32)).decode("ascii")
        self.unreachable_dial_delay = unreachable_dial_delay
        self.accept_backlog = accept_backlog
        self.async_error_delay = async_error_delay
        self.close_drops_unacked = close_drops_unacked
        self.segment_size = segment_size
        """Largest Recv payload: 4096 as older daemons, 1152 as 1.18.0."""
        """As the real daemon: stream data is delivered a moment after its Send, and a
        Close (a FIN) overtakes it, so the peer never gets what was still in flight."""
        self.nagle_window = 0.04
        """Seconds after a Send within which a small next Send counts as a Nagle stall."""
        self.nagle_stalls = 0
        """Small Sends the real daemon would hold for its delayed ACK (see the module doc)."""
        self.command_delay: dict[int, float] = {}
        """Extra seconds before handling a command byte (a slow daemon), e.g. ``{0x0D: 1.0}``."""
        self.hold_accepts = False
        """While true, inbound streams wait (at most ``accept_backlog`` per port) instead
        of being pushed; past the backlog they are silently dropped."""
        self.dropped_accepts = 0
        self.dropped_clients = 0
        """Clients dropped for announcing a frame above the 1 MiB limit."""
        self._held: dict[int, list[_Conn]] = {}
        self._server: asyncio.Server | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: dict[int, _Conn] = {}
        self._ports: dict[int, _Client] = {}
        self._services: dict[int, _Service] = {}
        self._next_conn = 1
        self._generation = 0
        self._next_ephemeral = _EPHEMERAL_FIRST
        self._started_at = time.monotonic()
        self._pending: dict[int, dict[str, Any]] = {}
        self._trusted: dict[int, dict[str, Any]] = {}

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PilotDaemonDouble {self.address} {self.socket_path!r} {state}>"

    # -- lifetime --------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._server is not None

    @property
    def client_count(self) -> int:
        """IPC clients connected to the socket now."""
        return len(self._clients)

    @property
    def bound_ports(self) -> set[int]:
        """Ports clients have bound (a copy)."""
        return set(self._ports)

    @property
    def stream_count(self) -> int:
        """Open streams that a client of this double holds."""
        return sum(1 for conn in self._conns.values() if conn.owner is not None)

    async def start(self) -> None:
        """Listen on ``socket_path`` (mode 0600). Idempotent."""
        if self._server is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._generation += 1
        generation = self._generation

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(reader, writer, generation)

        self._server = await asyncio.start_unix_server(serve, path=self.socket_path)
        os.chmod(self.socket_path, 0o600)
        self._started_at = time.monotonic()
        self._next_conn = 1
        self._services = {ECHO_PORT: _EchoService(), EVENT_PORT: _EventService()}

    async def stop(self) -> None:
        """Stop like a daemon going down: every client, stream and port is gone. Idempotent."""
        server, self._server = self._server, None
        self._generation += 1  # connections accepted but not yet served die too
        if server is None:
            return
        server.close()
        for client in list(self._clients):
            self._drop_client(client)
        for conn in list(self._conns.values()):
            self._end_conn(conn, notify_self=False)
        self._held.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def restart(self) -> None:
        """``stop()`` then ``start()``."""
        await self.stop()
        await self.start()

    async def aclose(self) -> None:
        """Same as ``stop()``. Idempotent."""
        await self.stop()

    async def __aenter__(self) -> PilotDaemonDouble:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- test hooks ------------------------------------------------------------------
    def push_error(
        self, message: str, *, port: int | None = None, conn_id: int | None = None
    ) -> None:
        """Push an id-less Error, as a failed Send would, to the client that bound
        ``port``, or that owns stream ``conn_id``, or to every client."""
        frame = ipc.error(message)
        if port is not None:
            targets = [self._ports[port]] if port in self._ports else []
        elif conn_id is not None:
            conn = self._conns.get(conn_id)
            targets = [conn.owner] if conn is not None and conn.owner is not None else []
        else:
            targets = list(self._clients)
        for client in targets:
            client.push(frame)

    def release_accepts(self) -> None:
        """Push the accepts held while ``hold_accepts`` was set."""
        self.hold_accepts = False
        held, self._held = self._held, {}
        for port, conns in held.items():
            for conn in conns:
                self._push_accept(port, conn)

    # -- connection handling ---------------------------------------------------------
    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, generation: int
    ) -> None:
        if generation != self._generation:
            writer.close()  # accepted just before a stop: the "daemon" that took it is gone
            return
        client = _Client(writer)
        self._clients.add(client)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # pyright: ignore[reportArgumentType]
        try:
            while not client.closed:
                header = await reader.readexactly(4)
                (length,) = _U32.unpack(header)
                if length == 0:
                    continue
                if length > ipc.MAX_FRAME:
                    self.dropped_clients += 1
                    break
                body = await reader.readexactly(length)
                await self._handle(client, body[0], body[1:])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # stop() cancels a command in progress (a slow dial); the connection
            # task ends normally so asyncio's stream server does not log it.
            pass
        finally:
            self._drop_client(client)
            if task is not None:
                self._tasks.discard(task)  # pyright: ignore[reportArgumentType]

    def _drop_client(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        self._clients.discard(client)
        for conn_id in list(client.conns):
            conn = self._conns.get(conn_id)
            if conn is not None:
                self._end_conn(conn, notify_self=False)
        for port in client.ports:
            if self._ports.get(port) is client:
                del self._ports[port]
                for held in self._held.pop(port, []):
                    self._end_conn(held, notify_self=False)
        client.ports.clear()
        client.writer.close()

    def _later_error(self, client: _Client, message: str) -> None:
        asyncio.get_running_loop().call_later(
            self.async_error_delay, client.push, ipc.error(message)
        )

    async def _handle(self, client: _Client, cmd: int, p: bytes) -> None:
        delay = self.command_delay.get(cmd)
        if delay:
            await asyncio.sleep(delay)
        handler = self._handlers.get(cmd)
        if handler is None:
            client.push(ipc.error(f"unknown command: 0x{cmd:02X}"))
            return
        result = handler(self, client, p)
        if asyncio.iscoroutine(result):
            await result

    # -- commands ----------------------------------------------------------------------
    def _cmd_bind(self, client: _Client, p: bytes) -> None:
        if len(p) < 2:
            client.push(ipc.error("bind: missing port"))
            return
        (port,) = _U16.unpack_from(p)
        if port in self._ports or port in self._services:
            client.push(ipc.error(f"port {port} already bound"))
            return
        self._ports[port] = client
        client.ports.add(port)
        client.push(ipc.bind_ok(port))

    async def _cmd_dial(self, client: _Client, p: bytes) -> None:
        if len(p) < 8:
            client.push(ipc.error("dial: missing address/port"))
            return
        address = Address.from_bytes(p[:6])
        (port,) = _U16.unpack_from(p, 6)
        target = self.network.lookup(address)
        if target is None:
            await asyncio.sleep(self.unreachable_dial_delay)
            client.push(ipc.error(f"dial {address}:{port}: timeout (no response from peer)"))
            return
        listener = target._ports.get(port)
        service = target._services.get(port)
        if listener is None and service is None:
            client.push(ipc.error(f"dial {address}:{port}: connection refused"))
            return
        local_port = self._next_ephemeral
        self._next_ephemeral = _EPHEMERAL_FIRST + (local_port + 1 - _EPHEMERAL_FIRST) % 16000
        mine = self._new_conn(local_port, SocketAddress(address, port))
        mine.owner = client
        client.conns.add(mine.id)
        theirs = target._new_conn(port, SocketAddress(self.address, local_port))
        mine.peer, theirs.peer = theirs, mine
        client.push(ipc.dial_ok(mine.id))
        if service is not None:
            theirs.service = service
        else:
            target._offer_accept(port, theirs)

    def _cmd_send(self, client: _Client, p: bytes) -> None:
        if len(p) < 4:
            self._later_error(client, "send: missing conn_id")
            return
        (conn_id,) = _U32.unpack_from(p)
        conn = self._conns.get(conn_id)
        if conn is None or not conn.send(p[4:]):
            self._later_error(client, f"send: connection {conn_id} not found")

    def _cmd_close(self, client: _Client, p: bytes) -> None:
        if len(p) < 4:
            client.push(ipc.error("close: missing conn_id"))
            return
        (conn_id,) = _U32.unpack_from(p)
        client.push(ipc.close_ok(conn_id))
        conn = self._conns.get(conn_id)
        if conn is not None:
            self._close_conn(conn, reply_to=client)

    def _cmd_send_to(self, client: _Client, p: bytes) -> None:
        if len(p) < 8:
            self._later_error(client, "sendto: missing address/port")
            return
        address = Address.from_bytes(p[:6])
        (port,) = _U16.unpack_from(p, 6)
        data = p[8:]
        if len(data) > ipc.MAX_DATAGRAM:
            self._later_error(client, f"sendto: datagram too large ({len(data)} bytes)")
            return
        target = self.network.lookup(address)
        if target is None:
            self._later_error(client, f"sendto {address}: no route to peer")
            return
        frame = ipc.recv_from(SocketAddress(self.address, 0), port, data)
        for other in list(target._clients):
            other.push(frame)

    def _info(self) -> dict[str, Any]:
        conns = [
            {
                "id": c.id,
                "local_port": c.local_port,
                "remote_addr": str(c.remote.address),
                "remote_port": c.remote.port,
                "state": "ESTABLISHED",
            }
            for c in self._conns.values()
        ]
        peers = sorted(
            {
                str(c.remote.address)
                for c in self._conns.values()
                if c.remote.address != self.address
            }
        )
        return {
            "node_id": self.address.node,
            "address": str(self.address),
            "hostname": self.hostname,
            "public_key": self.public_key,
            "public": self.public,
            "peers": len(peers),
            "peer_list": [
                {"node_id": Address.parse(a).node, "encrypted": True, "authenticated": True}
                for a in peers
            ],
            "conn_list": conns,
            "connections": len(conns),
            "ports": sorted(self._ports),
            "uptime_secs": int(time.monotonic() - self._started_at),
            "tags": self.tags,
        }

    def _cmd_info(self, client: _Client, p: bytes) -> None:
        client.push(ipc.json_reply(Cmd.INFO_OK, self._info()))

    def _cmd_resolve(self, client: _Client, p: bytes) -> None:
        name = p.decode("utf-8", "replace")
        target = self.network.by_hostname(name)
        if target is None:
            client.push(ipc.error(f"resolve {name!r}: hostname not found"))
            return
        if not (target.public or target is self or self.address.node in target._trusted):
            client.push(ipc.error(f"resolve {name!r}: node is private"))
            return
        client.push(
            ipc.json_reply(
                Cmd.RESOLVE_HOSTNAME_OK,
                {
                    "node_id": target.address.node,
                    "address": str(target.address),
                    "hostname": target.hostname,
                    "public": target.public,
                },
            )
        )

    def _cmd_set_hostname(self, client: _Client, p: bytes) -> None:
        name = p.decode("utf-8", "replace")
        other = self.network.by_hostname(name) if name else None
        if other is not None and other is not self:
            client.push(ipc.error(f"hostname {name!r} already taken"))
            return
        self.hostname = name
        client.push(ipc.json_reply(Cmd.SET_HOSTNAME_OK, {"hostname": name}))

    def _cmd_set_visibility(self, client: _Client, p: bytes) -> None:
        self.public = bool(p[:1] == b"\x01")
        client.push(ipc.json_reply(Cmd.SET_VISIBILITY_OK, {"public": self.public}))

    def _cmd_deregister(self, client: _Client, p: bytes) -> None:
        self.registered = False
        client.push(ipc.json_reply(Cmd.DEREGISTER_OK, {"status": "deregistered"}))

    def _cmd_set_tags(self, client: _Client, p: bytes) -> None:
        try:
            tags = json.loads(p.decode("utf-8"))
        except ValueError:
            tags = None
        if (
            not isinstance(tags, list)
            or len(tags) > 3  # pyright: ignore[reportUnknownArgumentType]
            or not all(isinstance(t, str) for t in tags)  # pyright: ignore[reportUnknownVariableType]
        ):
            client.push(ipc.error("set tags: expected a JSON array of at most 3 strings"))
            return
        self.tags = [str(t) for t in tags]  # pyright: ignore[reportUnknownVariableType]
        client.push(ipc.json_reply(Cmd.SET_TAGS_OK, {"tags": self.tags}))

    def _cmd_set_webhook(self, client: _Client, p: bytes) -> None:
        self.webhook = p.decode("utf-8", "replace")
        client.push(ipc.json_reply(Cmd.SET_WEBHOOK_OK, {"webhook": self.webhook}))

    def _cmd_set_task_exec(self, client: _Client, p: bytes) -> None:
        self.task_exec = p[:1] == b"\x01"
        client.push(ipc.json_reply(Cmd.SET_TASK_EXEC_OK, {"task_exec": self.task_exec}))

    def _cmd_handshake(self, client: _Client, p: bytes) -> None:
        if not p:
            client.push(ipc.error("handshake: missing sub-command"))
            return
        sub, rest = p[0], p[1:]
        if sub in (HandshakeSub.PENDING, HandshakeSub.TRUSTED):
            key = "pending" if sub == HandshakeSub.PENDING else "trusted"
            entries = self._pending if sub == HandshakeSub.PENDING else self._trusted
            client.push(ipc.json_reply(Cmd.HANDSHAKE_OK, {key: list(entries.values())}))
            return
        if sub not in set(HandshakeSub) or len(rest) < 4:
            client.push(ipc.error(f"handshake: bad sub-command 0x{sub:02X} or missing node id"))
            return
        (node_id,) = _U32.unpack_from(rest)
        text = rest[4:].decode("utf-8", "replace")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if sub == HandshakeSub.REQUEST:
            target = self.network.by_node(node_id)
            if target is None or not target.running:
                client.push(ipc.error(f"handshake: node {node_id} unreachable"))
                return
            target._pending[self.address.node] = {
                "node_id": self.address.node,
                "public_key": self.public_key,
                "justification": text,
                "received_at": now,
            }
            status = "sent"
        elif sub == HandshakeSub.APPROVE:
            other = self.network.by_node(node_id)
            self._pending.pop(node_id, None)
            mutual = other is not None and self.address.node in other._trusted
            self._trusted[node_id] = {
                "node_id": node_id,
                "public_key": other.public_key if other is not None else "",
                "approved_at": now,
                "mutual": mutual,
                "network": self.network.network_id,
            }
            if other is not None and mutual:
                other._trusted[self.address.node]["mutual"] = True
            status = "approved"
        elif sub == HandshakeSub.REJECT:
            self._pending.pop(node_id, None)
            status = "rejected"
        else:  # REVOKE
            self._trusted.pop(node_id, None)
            status = "revoked"
        client.push(ipc.json_reply(Cmd.HANDSHAKE_OK, {"status": status, "node_id": node_id}))

    _handlers: dict[int, Callable[..., Any]] = {
        Cmd.BIND: _cmd_bind,
        Cmd.DIAL: _cmd_dial,
        Cmd.SEND: _cmd_send,
        Cmd.CLOSE: _cmd_close,
        Cmd.SEND_TO: _cmd_send_to,
        Cmd.INFO: _cmd_info,
        Cmd.HANDSHAKE: _cmd_handshake,
        Cmd.RESOLVE_HOSTNAME: _cmd_resolve,
        Cmd.SET_HOSTNAME: _cmd_set_hostname,
        Cmd.SET_VISIBILITY: _cmd_set_visibility,
        Cmd.DEREGISTER: _cmd_deregister,
        Cmd.SET_TAGS: _cmd_set_tags,
        Cmd.SET_WEBHOOK: _cmd_set_webhook,
        Cmd.SET_TASK_EXEC: _cmd_set_task_exec,
    }

    # -- streams -----------------------------------------------------------------------
    def _new_conn(self, local_port: int, remote: SocketAddress) -> _Conn:
        conn = _Conn(self._next_conn, self, local_port, remote)
        self._next_conn += 1
        self._conns[conn.id] = conn
        return conn

    def _offer_accept(self, port: int, conn: _Conn) -> None:
        if self.hold_accepts:
            held = self._held.setdefault(port, [])
            if len(held) >= self.accept_backlog:
                self.dropped_accepts += 1  # dropped silently; the dialer thinks it is connected
                return
            held.append(conn)
            return
        self._push_accept(port, conn)

    def _push_accept(self, port: int, conn: _Conn) -> None:
        client = self._ports.get(port)
        if client is None or not conn.open:
            self._end_conn(conn, notify_self=False)
            return
        conn.owner = client
        client.conns.add(conn.id)
        client.push(ipc.accept(port, conn.id, conn.remote))

    def _close_conn(self, conn: _Conn, *, reply_to: _Client | None) -> None:
        """A local Close: the stream ends (second CloseOK to its owner) and the peer hears of it."""
        self._end_conn(conn, notify_self=True)

    def _end_conn(self, conn: _Conn, *, notify_self: bool) -> None:
        if not conn.open:
            return
        conn.open = False
        self._conns.pop(conn.id, None)
        if conn.owner is not None:
            conn.owner.conns.discard(conn.id)
            if notify_self:
                owner, frame = conn.owner, ipc.close_ok(conn.id)
                asyncio.get_running_loop().call_soon(owner.push, frame)
        if conn.service is not None:
            conn.service.on_close(conn)
        peer = conn.peer
        if peer is not None and peer.open:
            peer.in_flight.clear()  # the FIN overtakes unacknowledged data: it is dropped
            peer.daemon._end_conn(peer, notify_self=True)
