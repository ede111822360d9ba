"""Real Go Pilot daemons on loopback for tests: our rendezvous plus N daemons.

The daemons come from the ``pilotprotocol`` wheel (a test-only dependency of
this directory; AGPL-3.0). Each daemon gets its own directory (used as its
``HOME``, so nothing is written to the real home), identity file, IPC socket and
UDP port, and is pointed at :mod:`_pilot_rendezvous` on 127.0.0.1, never at the
public network. Every process is started here and stopped here by PID.

Usage (synchronous; fixtures call it outside the event loop)::

    with PilotNet(tmp_path, count=2) as net:
        net.daemons[0].socket, net.daemons[1].address
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pilot_transport._carriers import _pilot_ipc as ipc

_RENDEZVOUS = str(Path(__file__).with_name("_pilot_rendezvous.py"))


def pilot_binaries() -> tuple[Path, Path] | None:
    """``(pilot-daemon, pilotctl)`` inside the installed wheel, or None.

    The package is located without importing it (importing it copies its
    binaries into ``~/.pilot``).
    """
    spec = importlib.util.find_spec("pilotprotocol")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "bin"
    daemon, ctl = folder / "pilot-daemon", folder / "pilotctl"
    if not (daemon.is_file() and os.access(daemon, os.X_OK)):
        return None
    return daemon, ctl


def daemon_version() -> str:
    found = pilot_binaries()
    if found is None:
        return ""
    marker = found[0].parent / ".pilot-version"
    return marker.read_text().strip() if marker.is_file() else ""


def ipc_call(socket_path: str, frame: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """One blocking request/reply on a fresh IPC connection (for fixtures)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(frame)
        head = _recv_exactly(sock, 4)
        (length,) = struct.unpack(">I", head)
        body = _recv_exactly(sock, length)
        return body[0], body[1:]


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        if not chunk:
            raise ConnectionError("pilot daemon closed the IPC connection")
        out += chunk
    return bytes(out)


def ipc_json(socket_path: str, frame: bytes) -> Any:
    cmd, payload = ipc_call(socket_path, frame)
    if cmd == ipc.Cmd.ERROR:
        raise RuntimeError(f"pilot daemon error: {payload[2:].decode(errors='replace')}")
    return json.loads(payload)


def daemon_argv(
    daemon_bin: Path,
    *,
    registry: str,
    beacon: str,
    socket_path: str,
    directory: Path,
    listen: str,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The command line of a daemon pointed at our registry and beacon, nothing public."""
    return [
        str(daemon_bin),
        "-registry",
        registry,
        "-beacon",
        beacon,
        "-socket",
        socket_path,
        "-identity",
        str(directory / "identity.json"),
        "-listen",
        listen,
        "-telemetry-url",
        "",
        "-motd-feed-url",
        "",
        "-no-skillinject",
        "-proxy",
        "off",
        *extra,
    ]


def daemon_env(directory: Path) -> dict[str, str]:
    """The daemon's environment: no ``PILOT_*`` settings, ``directory`` as its home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
    env["HOME"] = str(directory)
    return env


@dataclass
class RealDaemon:
    index: int
    directory: Path
    socket: str
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    node_id: int = 0
    udp_port: int = 0
    log: Path = field(default_factory=lambda: Path(os.devnull))

    def info(self) -> dict[str, Any]:
        return ipc_json(self.socket, ipc.info())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class PilotNet:
    """A registry/beacon process and ``count`` pilot daemons that trust each other."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        count: int = 2,
        daemon_args: tuple[str, ...] = (),
        registry_ttl: float = 0.0,
        trust: bool = True,
    ) -> None:
        found = pilot_binaries()
        if found is None:
            raise RuntimeError("the pilotprotocol wheel (pilot-daemon) is not installed")
        self.daemon_bin, self.ctl_bin = found
        # Unix socket paths are limited to ~107 bytes: keep sockets in a short /tmp dir.
        self._sock_dir = tempfile.mkdtemp(prefix="pnet-", dir="/tmp")
        self.directory = Path(directory or self._sock_dir)
        self.daemon_args = daemon_args
        self.registry_ttl = registry_ttl
        self.trust = trust
        self.registry_port = 0
        self.beacon_port = 0
        self._rendezvous: subprocess.Popen[str] | None = None
        self.daemons = [
            RealDaemon(i, self.directory / f"d{i}", f"{self._sock_dir}/d{i}.sock")
            for i in range(count)
        ]

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        try:
            self._start_rendezvous(timeout)
            for daemon in self.daemons:
                self.start_daemon(daemon.index, wait=False)
            for daemon in self.daemons:
                self.wait_registered(daemon.index, timeout)
            if self.trust:
                self.trust_all(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_rendezvous(self, timeout: float) -> None:
        env = dict(os.environ)
        if self.registry_ttl > 0:
            env["PILOT_RENDEZVOUS_TTL"] = str(self.registry_ttl)
        proc = subprocess.Popen(
            [sys.executable, _RENDEZVOUS],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._rendezvous = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if line.startswith("ready"):
                break
        words = line.split()
        if words[:1] != ["ready"]:
            raise RuntimeError(f"pilot rendezvous did not start: {line!r}")
        self.registry_port, self.beacon_port = int(words[1]), int(words[2])

    def start_daemon(self, index: int, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Start (or restart) daemon ``index`` with its persistent identity and socket."""
        daemon = self.daemons[index]
        if daemon.proc is not None and daemon.proc.poll() is None:
            raise RuntimeError(f"daemon {index} is already running")
        daemon.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        daemon.log = daemon.directory / "daemon.log"
        if not daemon.udp_port:
            # Kept across restarts, as a configured daemon keeps its port: peers
            # then reach the restarted daemon at once and re-key.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind(("127.0.0.1", 0))
                daemon.udp_port = int(probe.getsockname()[1])
        env = daemon_env(daemon.directory)
        argv = daemon_argv(
            self.daemon_bin,
            registry=f"127.0.0.1:{self.registry_port}",
            beacon=f"127.0.0.1:{self.beacon_port}",
            socket_path=daemon.socket,
            directory=daemon.directory,
            listen=f"127.0.0.1:{daemon.udp_port}",
            extra=self.daemon_args,
        )
        with daemon.log.open("ab") as log:
            daemon.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(daemon.directory),
            )
        if wait:
            self.wait_registered(index, timeout)

    def wait_registered(self, index: int, timeout: float = 60.0) -> None:
        """Wait until the daemon answers Info with a registered address."""
        daemon = self.daemons[index]
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if daemon.proc is not None and daemon.proc.poll() is not None:
                raise RuntimeError(f"pilot daemon {index} exited:\n{daemon.log_tail()}")
            try:
                info = daemon.info()
            except (OSError, ConnectionError, RuntimeError, ValueError) as exc:
                last = exc
            else:
                node_id = int(info.get("node_id") or 0)
                if node_id:
                    daemon.node_id = node_id
                    daemon.address = str(info["address"])
                    return
            time.sleep(0.05)
        raise TimeoutError(f"pilot daemon {index} not registered ({last}):\n{daemon.log_tail()}")

    def ctl(self, index: int, *args: str, timeout: float = 30.0) -> Any:
        """Run ``pilotctl --json <args>`` against daemon ``index``; the parsed reply's data.

        Raises:
            RuntimeError: pilotctl failed or answered with an error status.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
        env["PILOT_SOCKET"] = self.daemons[index].socket
        env["HOME"] = str(self.daemons[index].directory)
        # pilotctl itself looks peers up (ping, bench) at the public registry unless told.
        env["PILOT_REGISTRY"] = f"127.0.0.1:{self.registry_port}"
        env["PILOT_BEACON"] = f"127.0.0.1:{self.beacon_port}"
        done = subprocess.run(
            [str(self.ctl_bin), "--json", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        try:
            reply = json.loads(done.stdout)
        except ValueError:
            raise RuntimeError(f"pilotctl {args}: {done.stdout!r} {done.stderr!r}") from None
        if not isinstance(reply, dict) or reply.get("status") != "ok":
            raise RuntimeError(f"pilotctl {args}: {reply}")
        return reply.get("data")

    def trust_all(self, timeout: float = 60.0) -> None:
        """Mutual daemon-level trust between every pair (the daemons gate streams on it)."""
        for a in self.daemons:
            for b in self.daemons:
                if a is not b:
                    self._trust(a, b, timeout)

    def _trust(self, src: RealDaemon, dst: RealDaemon, timeout: float) -> None:
        def trusted_by(d: RealDaemon) -> set[int]:
            listed = ipc_json(d.socket, ipc.handshake(ipc.HandshakeSub.TRUSTED))
            return {int(e["node_id"]) for e in listed.get("trusted") or []}

        if dst.node_id in trusted_by(src) and src.node_id in trusted_by(dst):
            return
        ipc_json(src.socket, ipc.handshake(ipc.HandshakeSub.REQUEST, dst.node_id, "tests"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = ipc_json(dst.socket, ipc.handshake(ipc.HandshakeSub.PENDING))
            if any(int(p["node_id"]) == src.node_id for p in pending.get("pending") or []):
                ipc_json(dst.socket, ipc.handshake(ipc.HandshakeSub.APPROVE, src.node_id))
            if src.node_id in trusted_by(dst) and dst.node_id in trusted_by(src):
                return
            time.sleep(0.05)
        raise TimeoutError(f"daemons {src.index} and {dst.index} did not establish trust")

    def kill(self, index: int, sig: int = signal.SIGKILL, timeout: float = 15.0) -> None:
        """Signal daemon ``index`` (SIGKILL by default) and wait for it to exit."""
        proc = self.daemons[index].proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        """Stop every process this net started (SIGTERM, then SIGKILL). Idempotent."""
        for daemon in self.daemons:
            self.kill(daemon.index, signal.SIGTERM, timeout=5.0)
        proc = self._rendezvous
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
            self._rendezvous = None
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def __enter__(self) -> PilotNet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


__all__ = [
    "PilotNet",
    "RealDaemon",
    "daemon_argv",
    "daemon_env",
    "daemon_version",
    "ipc_call",
    "ipc_json",
    "pilot_binaries",
]
