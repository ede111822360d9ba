"""Three processes, two of which trust each other: pilot-transport over tcp:// with mutual TLS.

- ``bob`` (a server process) and ``alice`` (a client process) each have their
  own Ed25519 identity and trust file, and trust each other's key;
- alice connects to bob by name, both sides prove their keys in a TLS 1.3
  handshake, and they exchange data;
- ``mallory`` (a third process) knows bob's key and endpoint, but bob does not
  trust mallory: the handshake is refused, and both sides show mallory's
  fingerprint, so an operator knows exactly what to trust if they wanted to.

Everything lives in a temporary directory and every process this script
starts is stopped before it exits. Run: ``python examples/transport_demo.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pilot_transport import Identity, SecureStream, TrustedPeer, TrustStore, open_transport
from pilot_transport.errors import HandshakeError, TransportError

PORT = 7
ROUNDS = 200
SIZE = 4096


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "pid": os.getpid(), **fields}), flush=True)


# -- the child processes ----------------------------------------------------------------------


async def serve(identity: Path, trust: Path) -> None:
    """bob: listen on virtual port 7 and echo whatever a trusted peer sends."""
    handlers: set[asyncio.Task[None]] = set()

    async def echo(stream: SecureStream) -> None:
        async with stream:
            total = 0
            try:
                while data := await stream.read(65536):
                    total += len(data)
                    await stream.write(data)
            except TransportError as exc:
                emit("broken", peer=stream.peer.name, error=str(exc))
            emit("closed", peer=stream.peer.name, bytes=total)

    async with open_transport("tcp://127.0.0.1:0", identity=identity, trust=trust) as transport:
        listener = await transport.listen(PORT)
        emit("ready", endpoint=(await transport.info()).endpoint)
        async for stream in listener:
            emit("accepted", peer=stream.peer.name, fingerprint=stream.peer.fingerprint)
            task = asyncio.create_task(echo(stream))
            handlers.add(task)
            task.add_done_callback(handlers.discard)


async def call(identity: Path, trust: Path) -> int:
    """alice or mallory: connect to bob by name and exchange ROUNDS echoes of SIZE bytes."""
    async with open_transport("tcp://127.0.0.1:0", identity=identity, trust=trust) as transport:
        start = time.perf_counter()
        try:
            stream = await transport.connect("bob", PORT, timeout=10)
        except HandshakeError as exc:
            emit("refused", error=type(exc).__name__, message=str(exc))
            return 1
        setup = time.perf_counter() - start
        payload = os.urandom(SIZE)
        start = time.perf_counter()
        async with stream:
            for _ in range(ROUNDS):
                await stream.write(payload)
                received = bytearray()
                while len(received) < SIZE:
                    received += await stream.read(65536)
                assert received == payload
            elapsed = time.perf_counter() - start
            emit(
                "exchanged",
                peer=stream.peer.name,
                peer_fingerprint=stream.peer.fingerprint,
                bytes=2 * ROUNDS * SIZE,
                seconds=elapsed,
                setup_ms=setup * 1e3,
            )
        return 0


# -- the orchestrator ---------------------------------------------------------------------------


class Child:
    def __init__(self, name: str, role: str, home: Path) -> None:
        self.name = name
        self.log = home / f"{name}.log"
        with open(self.log, "wb") as stderr:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    role,
                    "--identity",
                    str(home / name / "identity.key"),
                    "--trust",
                    str(home / name / "trust.json"),
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )

    def event(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited early:\n{self.log.read_text()}")
        return json.loads(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_for_log(child: Child, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in child.log.read_text().splitlines():
            if text in line:
                return line
        time.sleep(0.05)  # polling a log file written by another process
    raise RuntimeError(f"{child.name} never logged {text!r}")


def say(text: str = "") -> None:
    print(text, flush=True)


def orchestrate() -> int:
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="pilot-transport-demo-") as tmp:
        home = Path(tmp)
        identities: dict[str, Identity] = {}
        say("pilot-transport demo: three processes, TLS 1.3 with mutual authentication over tcp://")
        say(f"files in {home}")
        say()
        for name in ("alice", "bob", "mallory"):
            identity = Identity.generate()
            identity.save(home / name / "identity.key")
            identities[name] = identity
            say(f"  {name:<8} node id {identity.node_id}  fingerprint {identity.fingerprint}")
        key = {name: identity.public_key for name, identity in identities.items()}
        TrustStore.open(home / "bob" / "trust.json").add(TrustedPeer("alice", key["alice"]))
        say()
        say("  bob trusts alice; alice and mallory know bob's key; bob does not know mallory's")
        try:
            bob = Child("bob", "serve", home)
            children.append(bob)
            ready = bob.event()
            endpoint = ready["endpoint"]
            for name in ("alice", "mallory"):
                TrustStore.open(home / name / "trust.json").add(
                    TrustedPeer("bob", key["bob"], endpoint=endpoint)
                )
            say()
            say(f"1. bob (pid {bob.process.pid}) listens on tcp://{endpoint}, virtual port {PORT}")

            alice = Child("alice", "call", home)
            children.append(alice)
            result = alice.event()
            accepted = bob.event()
            if result["event"] != "exchanged":
                raise RuntimeError(f"alice could not talk to bob: {result}")
            alice.process.wait(timeout=30)
            closed = bob.event()
            rtt_ms = result["seconds"] / ROUNDS * 1e3
            mib_s = result["bytes"] / result["seconds"] / 2**20
            say(f"2. alice (pid {alice.process.pid}) connected to bob by name")
            say(f"   alice saw peer {result['peer']!r} proving {result['peer_fingerprint']}")
            say(f"   bob saw peer {accepted['peer']!r} proving {accepted['fingerprint']}")
            say(
                f"   {ROUNDS} echoes of {SIZE} bytes: {result['bytes']} bytes in "
                f"{result['seconds'] * 1e3:.1f} ms ({rtt_ms:.2f} ms per round trip, "
                f"{mib_s:.1f} MiB/s); connect + handshake {result['setup_ms']:.1f} ms"
            )
            say(f"   bob echoed {closed['bytes']} bytes back and saw alice close cleanly")

            mallory = Child("mallory", "call", home)
            children.append(mallory)
            refused = mallory.event()
            mallory.process.wait(timeout=30)
            if refused["event"] != "refused":
                raise RuntimeError(f"mallory was not refused: {refused}")
            logged = wait_for_log(bob, identities["mallory"].fingerprint)
            say(f"3. mallory (pid {mallory.process.pid}) tried the same and was refused:")
            say(f"   mallory got {refused['error']}: {refused['message']}")
            say(f"   bob logged: {logged.removeprefix('WARNING ')}")
            say()
            say(
                "Both sides name mallory's fingerprint; trusting it would take one command on bob's"
            )
            say("host, with no restart: pilot-transport trust add mallory <key>.")
        finally:
            for child in children:
                child.stop()
            if children:
                say(f"4. stopped {', '.join(f'{c.name} (pid {c.process.pid})' for c in children)}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["serve", "call"], help=argparse.SUPPRESS)
    parser.add_argument("--identity", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trust", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role is None:
        sys.exit(orchestrate())
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s"
    )
    if args.role == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.identity, args.trust))
        return
    sys.exit(asyncio.run(call(args.identity, args.trust)))


if __name__ == "__main__":
    main()
