"""Our Pilot node behind real NATs: discovery, hole punching and relay fallback.

Each test builds its own small internet out of network namespaces (names
``pn<tag>...``, unique per test run; the root namespace is never touched):

* a "public" namespace ``pn<tag>p`` with the address 198.18.0.1 on its loopback,
  where the registry and beacon stand-in (``_pilot_rendezvous.py``) listens;
* per side X, a router namespace ``pn<tag>rX`` joined to the public one by a veth
  pair (198.18.N.1 on the public side, 198.18.N.2 on the router: the router's
  public address) and to a LAN namespace ``pn<tag>lX`` by another (10.0.0.1 on the
  router, 10.0.0.2 in the LAN: both LANs use the same private subnet, as two
  home networks would). The router forwards and masquerades everything leaving
  towards the public side (``iptables -t nat -A POSTROUTING -o <wan> -j
  MASQUERADE``): Linux keeps the source port when it can and admits only answers
  from where a LAN host sent to, so it behaves as a port-restricted cone NAT. With
  ``--random-fully`` every new destination gets a random port instead, which
  defeats hole punching (a symmetric NAT).

Our nodes run as real processes inside the LAN (or public) namespaces
(``ip netns exec NS python _pilot_nat_node.py CONFIG``) and are driven over their
stdin/stdout. The public namespace has no route to 10.0.0.0/24: nothing but the
routers' public addresses can be reached across it. The stand-in's beacon counts
what it relays, so a test can tell whether a stream went direct or through it.

Cleanup (even when a test fails): each process the test started is ended by its
PID, then the namespaces it created are deleted, which removes their veth pairs
and their iptables rules with them. The tests need Linux, root, ``ip netns`` and
``iptables`` (``scripts/_iptables.sh`` installs it on CI); elsewhere they are
skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _netns import nat_unavailable_reason
from _pilot_daemons import RealDaemon, daemon_argv, daemon_env, ipc_json, pilot_binaries
from _pilot_node_fixtures import node_config_for, wait_for
from pilot_transport._carriers import _pilot_ipc as ipc

_HERE = Path(__file__).resolve().parent
_RENDEZVOUS = str(_HERE / "_pilot_rendezvous.py")
_NODE = str(_HERE / "_pilot_nat_node.py")
_CMD_TIMEOUT = 30.0
_REPLY_TIMEOUT = 120.0
_PUBLIC = "198.18.0.1"
_counter = itertools.count()


_REASON = nat_unavailable_reason()
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
    pytest.mark.timeout(300),
]


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def pattern_sha(size: int) -> str:
    """SHA-256 of the seeded pattern ``_pilot_nat_node.py`` echoes."""
    return hashlib.sha256(random.Random(size).randbytes(size)).hexdigest()


class NodeProcess:
    """One of our nodes running in a namespace, answering JSON requests."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, ready: dict[str, Any]):
        self.name = name
        self.proc = proc
        self.ready = ready
        self.node_id = int(ready["node_id"])
        self._lock = asyncio.Lock()

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
            await self.proc.stdin.drain()
            async with asyncio.timeout(_REPLY_TIMEOUT):
                line = await self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"node {self.name} exited (status {self.proc.returncode})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"node {self.name}: {op} failed: {answer['error']}")
        return answer

    async def peer(self, other: NodeProcess) -> dict[str, Any]:
        return await self.request("peer", node_id=other.node_id)

    async def echo(self, other: NodeProcess, size: int) -> None:
        answer = await self.request("echo", node_id=other.node_id, size=size)
        assert answer["size"] == size
        assert answer["received"] == answer["sent"] == pattern_sha(size)

    async def beacon_stats(self) -> dict[str, Any]:
        return await self.request("registry", msg={"type": "beacon_stats"})


def relayed_between(stats: dict[str, Any], a: NodeProcess, b: NodeProcess) -> int:
    pairs: dict[str, int] = stats["relayed_by_pair"]
    return pairs.get(f"{a.node_id}->{b.node_id}", 0) + pairs.get(f"{b.node_id}->{a.node_id}", 0)


class NatLab:
    """The namespaces, links, NAT rules and processes of one test (see the module doc)."""

    def __init__(self, directory: Path) -> None:
        self.tag = f"{os.getpid() % 100000}{next(_counter)}"
        self.directory = directory
        self.namespaces: list[str] = []  # only those this lab created
        self.procs: list[asyncio.subprocess.Process] = []
        self.sock_dir = ""
        self.public = ""
        self._sides = 0
        self.registry = ""
        self.beacon = ""

    async def start(self) -> None:
        """The public namespace and the registry and beacon stand-in inside it."""
        # Unix socket paths are limited to ~107 bytes: daemon sockets live in a short dir.
        self.sock_dir = tempfile.mkdtemp(prefix="pnat-", dir="/tmp")
        self.public = self._namespace("p")
        _run("ip", "-n", self.public, "addr", "add", f"{_PUBLIC}/32", "dev", "lo")
        self._forwarding(self.public)
        await self._start_rendezvous()

    def _namespace(self, role: str) -> str:
        name = f"pn{self.tag}{role}"
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    @staticmethod
    def _forwarding(namespace: str) -> None:
        _run("ip", "netns", "exec", namespace, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def _link(self, ns1: str, if1: str, addr1: str, ns2: str, if2: str, addr2: str) -> None:
        # Created straight inside the two namespaces: nothing appears in the root one.
        _run("ip", "-n", ns1, "link", "add", if1, "type", "veth", "peer", "name", if2, "netns", ns2)
        _run("ip", "-n", ns1, "addr", "add", addr1, "dev", if1)
        _run("ip", "-n", ns2, "addr", "add", addr2, "dev", if2)
        _run("ip", "-n", ns1, "link", "set", if1, "up")
        _run("ip", "-n", ns2, "link", "set", if2, "up")

    def private_lan(self, *, random_ports: bool = False) -> tuple[str, str]:
        """A LAN behind a masquerading router: ``(LAN namespace, router's public address)``."""
        self._sides += 1
        n = self._sides
        router = self._namespace(f"r{n}")
        lan = self._namespace(f"l{n}")
        wan_if, lan_if = f"pn{self.tag}w{n}", f"pn{self.tag}g{n}"
        router_public = f"198.18.{n}.2"
        self._link(
            self.public,
            f"pn{self.tag}p{n}",
            f"198.18.{n}.1/24",
            router,
            wan_if,
            f"{router_public}/24",
        )
        self._link(router, lan_if, "10.0.0.1/24", lan, f"pn{self.tag}h{n}", "10.0.0.2/24")
        _run("ip", "-n", router, "route", "add", "default", "via", f"198.18.{n}.1")
        _run("ip", "-n", lan, "route", "add", "default", "via", "10.0.0.1")
        self._forwarding(router)
        rule = ["-t", "nat", "-A", "POSTROUTING", "-o", wan_if, "-j", "MASQUERADE"]
        if random_ports:
            rule.append("--random-fully")
        _run("ip", "netns", "exec", router, "iptables", *rule)
        # A home router's firewall: unsolicited packets from outside are dropped before
        # the kernel tracks them. (Without it, each such packet leaves a tracked entry
        # that makes the router give the LAN host's next packet to that sender another
        # source port, so punching would depend on which side sent first.)
        drop_new = ["-A", "INPUT", "-i", wan_if, "-m", "conntrack", "--ctstate", "NEW"]
        _run("ip", "netns", "exec", router, "iptables", *drop_new, "-j", "DROP")
        return lan, router_public

    async def _spawn(
        self, namespace: str, name: str, *argv: str, env: dict[str, str]
    ) -> asyncio.subprocess.Process:
        with (self.directory / f"{name}.log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *("ip", "netns", "exec", namespace, sys.executable, *argv),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
            )
        # `ip netns exec` execs in place: this PID is the Python process itself.
        self.procs.append(proc)
        return proc

    async def _start_rendezvous(self) -> None:
        env = {**os.environ, "PILOT_RENDEZVOUS_HOST": _PUBLIC}
        proc = await self._spawn(self.public, "rendezvous", _RENDEZVOUS, env=env)
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            line = (await proc.stdout.readline()).decode()
        words = line.split()
        if words[:1] != ["ready"]:
            raise RuntimeError(f"the rendezvous did not start: {line!r}")
        self.registry = f"{_PUBLIC}:{words[1]}"
        self.beacon = f"{_PUBLIC}:{words[2]}"

    async def start_daemon(self, name: str, namespace: str, listen: str) -> RealDaemon:
        """A Go daemon from the ``pilotprotocol`` wheel inside ``namespace``, registered."""
        found = pilot_binaries()
        assert found is not None
        directory = self.directory / name
        directory.mkdir(mode=0o700)
        daemon = RealDaemon(len(self.procs), directory, f"{self.sock_dir}/{name}.sock")
        daemon.log = self.directory / f"{name}.log"
        argv = daemon_argv(
            found[0],
            registry=self.registry,
            beacon=self.beacon,
            socket_path=daemon.socket,
            directory=directory,
            listen=listen,
        )
        with daemon.log.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *("ip", "netns", "exec", namespace, *argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=daemon_env(directory),
                cwd=str(directory),
            )
        self.procs.append(proc)

        async def registered() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"daemon {name} exited:\n{daemon.log_tail()}")
            try:
                info = await asyncio.to_thread(daemon.info)
            except (OSError, ConnectionError, RuntimeError, ValueError):
                return False
            daemon.node_id = int(info.get("node_id") or 0)
            daemon.address = str(info.get("address") or "")
            return daemon.node_id != 0

        await wait_for(registered, 60.0, f"daemon {name} to register", 0.1)
        return daemon

    async def start_node(self, name: str, namespace: str, listen: str) -> NodeProcess:
        config = node_config_for(
            self.registry,
            self.beacon,
            listen=listen,
            hostname=f"nat-{name}-{self.tag}",
            heartbeat_interval=5.0,
            key_exchange_timeout=15.0,
            auto_approve=True,
        )
        fields = {
            key: getattr(config, key)
            for key in (
                "registry",
                "beacon",
                "listen",
                "hostname",
                "poll_interval",
                "heartbeat_interval",
                "key_exchange_timeout",
                "auto_approve",
            )
        }
        proc = await self._spawn(namespace, name, _NODE, json.dumps(fields), env=dict(os.environ))
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node {name} did not start (status {await proc.wait()})")
        return NodeProcess(name, proc, json.loads(line))

    async def aclose(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    async with asyncio.timeout(15):
                        await proc.wait()
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        for namespace in reversed(self.namespaces):
            subprocess.run(
                ["ip", "netns", "del", namespace], capture_output=True, timeout=_CMD_TIMEOUT
            )
        if self.sock_dir:
            shutil.rmtree(self.sock_dir, ignore_errors=True)


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[NatLab]:
    made = NatLab(tmp_path)
    try:
        await made.start()
        yield made
    finally:
        await made.aclose()


def host_of(endpoint: str) -> str:
    return endpoint.rpartition(":")[0]


async def wait_direct(*views: tuple[NodeProcess, NodeProcess], timeout: float = 60.0) -> None:
    """Wait until each ``(node, peer)`` node sends to its peer straight, not relayed."""

    async def direct() -> bool:
        states = [(await node.peer(peer)).get("via_relay") for node, peer in views]
        return all(state is False for state in states)

    names = ", ".join(f"{node.name}->{peer.name}" for node, peer in views)
    await wait_for(direct, timeout, f"direct paths {names}", 0.1)


# -- (a) cone NAT on both sides: discovery, a punched direct tunnel ---------------------------


async def test_cone_nats_both_sides_punch_a_direct_tunnel(lab: NatLab) -> None:
    lan_a, public_a = lab.private_lan()
    lan_b, public_b = lab.private_lan()
    a = await lab.start_node("a", lan_a, "10.0.0.2:0")
    b = await lab.start_node("b", lan_b, "10.0.0.2:0")

    # Discovery: each node learned the router's public address, not its own LAN one.
    assert host_of(a.ready["observed"]) == public_a
    assert host_of(b.ready["observed"]) == public_b
    assert host_of(a.ready["endpoint"]) == host_of(b.ready["endpoint"]) == "10.0.0.2"

    await a.echo(b, 1)
    await wait_direct((a, b), (b, a))
    # Each side aims at the other's public (router) endpoint, the one the beacon saw.
    assert (await a.peer(b))["endpoint"] == b.ready["observed"]
    assert host_of((await b.peer(a))["endpoint"]) == public_a
    assert (await a.request("info"))["stats"].get("punch_requests", 0) >= 1

    before = relayed_between(await a.beacon_stats(), a, b)
    size = 1 << 20
    await a.echo(b, size)
    await b.echo(a, size)
    relayed = relayed_between(await a.beacon_stats(), a, b) - before
    # Four MiB crossed between the two nodes; not one frame of it through the beacon.
    assert relayed == 0, f"{relayed} frames went through the relay after the punch"


# -- (b) NATs that defeat punching: relay fallback --------------------------------------------


async def test_symmetric_nats_fall_back_to_the_relay(lab: NatLab) -> None:
    lan_a, public_a = lab.private_lan(random_ports=True)
    lan_b, public_b = lab.private_lan(random_ports=True)
    a = await lab.start_node("a", lan_a, "10.0.0.2:0")
    b = await lab.start_node("b", lan_b, "10.0.0.2:0")
    assert host_of(a.ready["observed"]) == public_a
    assert host_of(b.ready["observed"]) == public_b

    await a.echo(b, 1)
    before = await a.beacon_stats()
    size = 1 << 20
    await a.echo(b, size)
    after = await a.beacon_stats()
    # The whole MiB went out and came back through the beacon (plus headers and acks).
    assert after["relayed_bytes"] - before["relayed_bytes"] >= 2 * size
    assert relayed_between(after, a, b) > relayed_between(before, a, b)
    # The punch was tried (and the direct path never opened).
    stats = (await a.request("info"))["stats"]
    assert stats.get("punch_requests", 0) >= 1
    assert stats.get("direct_paths_confirmed", 0) == 0
    assert (await a.peer(b))["via_relay"] is True
    assert (await b.peer(a))["via_relay"] is True
    await b.echo(a, size)


# -- (c) one node public, one behind a NAT ----------------------------------------------------


async def test_a_public_node_reaches_one_behind_a_nat(lab: NatLab) -> None:
    lan, public_router = lab.private_lan()
    private = await lab.start_node("private", lan, "10.0.0.2:0")
    public = await lab.start_node("public", lab.public, f"{_PUBLIC}:0")
    assert host_of(private.ready["observed"]) == public_router
    assert public.ready["observed"] == public.ready["endpoint"]

    # The public node dials first: its frames are dropped by the NAT until the beacon
    # has the private node send towards it.
    await public.echo(private, 1)
    await wait_direct((public, private), (private, public))
    before = relayed_between(await public.beacon_stats(), public, private)
    size = 1 << 20
    await public.echo(private, size)
    await private.echo(public, size)
    assert relayed_between(await public.beacon_stats(), public, private) == before


# -- (d) a Go daemon behind a NAT, our node behind another ------------------------------------


@pytest.mark.skipif(pilot_binaries() is None, reason="pilotprotocol wheel not installed")
async def test_a_daemon_behind_a_nat_and_our_node_behind_another(lab: NatLab) -> None:
    lan_d, public_d = lab.private_lan()
    lan_n, public_n = lab.private_lan()
    daemon = await lab.start_daemon("daemon", lan_d, "10.0.0.2:4000")
    node = await lab.start_node("ours", lan_n, "10.0.0.2:0")
    assert host_of(node.ready["observed"]) == public_n

    # The daemon gates streams on trust: it asks our node (which approves everything).
    ipc_json(daemon.socket, ipc.handshake(ipc.HandshakeSub.REQUEST, node.node_id, "nat test"))

    def trusted() -> bool:
        listed = ipc_json(daemon.socket, ipc.handshake(ipc.HandshakeSub.TRUSTED))
        return any(int(e["node_id"]) == node.node_id for e in listed.get("trusted") or [])

    await wait_for(trusted, 60.0, "the daemon to trust our node", 0.2)
    peer = NodeProcess("daemon", node.proc, {"node_id": daemon.node_id})
    await node.echo(peer, 1)

    # The daemon registered the endpoint its NAT gave it (it keeps the port); once each
    # side has sent towards the other, our node hears from it straight and stops relaying.
    await wait_direct((node, peer))
    assert (await node.peer(peer))["endpoint"] == f"{public_d}:4000"
    before = relayed_between(await node.beacon_stats(), node, peer)
    await node.echo(peer, 1 << 20)
    assert relayed_between(await node.beacon_stats(), node, peer) == before
