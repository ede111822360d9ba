"""pilot-transport between real processes over tcp:// with mutual TLS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pilot_transport import Identity, TrustedPeer, TrustStore
from pilot_transport.testing import TestPeers, create_test_peers

PEER_SCRIPT = Path(__file__).with_name("_transport_peer.py")
EVENT_TIMEOUT = 30.0


class Peer:
    """A peer process: JSON events on stdout, logs in a file."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log

    @classmethod
    async def start(cls, role: str, identity: Path, trust: Path, log: Path, *extra: str) -> Peer:
        with open(log, "wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(PEER_SCRIPT),
                role,
                "--identity",
                str(identity),
                "--trust",
                str(trust),
                *extra,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        return cls(process, log)

    async def event(self, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        assert line, f"process exited without an event; its log:\n{self.log.read_text()}"
        return json.loads(line)

    async def wait_for_log(self, text: str, timeout: float = EVENT_TIMEOUT) -> str:
        async with asyncio.timeout(timeout):
            while text not in (content := self.log.read_text()):
                await asyncio.sleep(0.05)
        return content

    async def finish(self, timeout: float = EVENT_TIMEOUT) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@pytest.fixture
async def started() -> AsyncIterator[list[Peer]]:
    peers: list[Peer] = []
    yield peers
    for peer in peers:
        await peer.stop()


async def _serve(peers: TestPeers, tmp_path: Path, started: list[Peer]) -> tuple[Peer, str]:
    server = await Peer.start(
        "serve", peers["server"].identity_path, peers["server"].trust_path, tmp_path / "server.log"
    )
    started.append(server)
    ready = await server.event()
    assert ready["event"] == "ready"
    assert ready["node_id"] == peers["server"].node_id
    peers.set_endpoint("server", ready["endpoint"])
    return server, ready["endpoint"]


def _stranger(
    tmp_path: Path, name: str, trusted: dict[str, TrustedPeer]
) -> tuple[Identity, Path, Path]:
    identity = Identity.generate()
    key = tmp_path / name / "identity.key"
    identity.save(key)
    trust_path = tmp_path / name / "trust.json"
    store = TrustStore.open(trust_path)
    for peer in trusted.values():
        store.add(peer)
    return identity, key, trust_path


async def test_trusted_processes_talk_and_an_untrusted_one_is_refused_on_both_sides(
    tmp_path: Path, started: list[Peer]
) -> None:
    peers = create_test_peers(tmp_path, ["server", "client"])
    server, endpoint = await _serve(peers, tmp_path, started)

    client = await Peer.start(
        "call",
        peers["client"].identity_path,
        peers["client"].trust_path,
        tmp_path / "client.log",
        "--rounds",
        "20",
    )
    started.append(client)
    echoed = await client.event()
    assert echoed["event"] == "echoed"
    assert echoed["peer"] == "server"
    assert echoed["node_id"] == peers["server"].node_id
    assert echoed["pid"] != server.process.pid
    assert await client.finish() == 0
    accepted = await server.event()
    assert accepted == {
        "event": "accepted",
        "pid": server.process.pid,
        "peer": "client",
        "node_id": peers["client"].node_id,
    }

    # A third process the server does not trust (it trusts the server).
    server_entry = TrustedPeer("server", peers["server"].identity.public_key, endpoint=endpoint)
    intruder, key, trust = _stranger(tmp_path, "intruder", {"server": server_entry})
    process = await Peer.start("call", key, trust, tmp_path / "intruder.log")
    started.append(process)
    refused = await process.event()
    assert refused["event"] == "refused"
    assert refused["error"] == "RejectedByPeerError"
    assert refused["fingerprint"] == intruder.fingerprint
    assert intruder.public_key_text in refused["message"]
    assert await process.finish() == 1
    log = await server.wait_for_log(intruder.fingerprint)
    assert "refused inbound connection" in log
    assert f"trust add NAME {intruder.public_key_text}" in log


async def test_a_client_refuses_a_server_it_does_not_trust(
    tmp_path: Path, started: list[Peer]
) -> None:
    peers = create_test_peers(tmp_path, ["server", "client"])
    server, endpoint = await _serve(peers, tmp_path, started)
    # The client expects someone else's key at that endpoint.
    impostor_key = Identity.generate().public_key
    expected = TrustedPeer("server", impostor_key, endpoint=endpoint)
    _, key, trust = _stranger(tmp_path, "wary", {"server": expected})
    TrustStore.open(peers["server"].trust_path).add(
        TrustedPeer("wary", Identity.load(key).public_key)
    )
    process = await Peer.start("call", key, trust, tmp_path / "wary.log")
    started.append(process)
    refused = await process.event()
    assert refused["error"] == "PeerNotTrustedError"
    assert refused["fingerprint"] == peers["server"].identity.fingerprint
    assert peers["server"].identity.public_key_text in refused["message"]
    await server.wait_for_log("does not trust our key")


async def test_server_killed_mid_stream_resets_the_client_promptly(
    tmp_path: Path, started: list[Peer]
) -> None:
    peers = create_test_peers(tmp_path, ["server", "client"])
    server, _ = await _serve(peers, tmp_path, started)
    drinker = await Peer.start(
        "drink", peers["client"].identity_path, peers["client"].trust_path, tmp_path / "d.log"
    )
    started.append(drinker)
    assert (await drinker.event())["event"] == "drinking"
    os.kill(server.process.pid, signal.SIGKILL)
    await server.process.wait()
    ended = await drinker.event(timeout=10)
    assert ended["event"] == "ended"
    assert ended["how"] in {"StreamResetError", "eof"}
    assert ended["bytes"] > 0
    assert await drinker.finish() == 0


async def test_trust_added_at_runtime_takes_effect_without_restart(
    tmp_path: Path, started: list[Peer]
) -> None:
    peers = create_test_peers(tmp_path, ["server", "client"])
    server, endpoint = await _serve(peers, tmp_path, started)
    server_entry = TrustedPeer("server", peers["server"].identity.public_key, endpoint=endpoint)
    newcomer, key, trust = _stranger(tmp_path, "newcomer", {"server": server_entry})

    async def attempt(label: str) -> dict[str, Any]:
        process = await Peer.start("call", key, trust, tmp_path / f"{label}.log")
        started.append(process)
        event = await process.event()
        await process.finish()
        return event

    assert (await attempt("before"))["event"] == "refused"
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pilot_transport",
        "--trust",
        str(peers["server"].trust_path),
        "trust",
        "add",
        "newcomer",
        newcomer.public_key_text,
    )
    assert await asyncio.wait_for(cli.wait(), EVENT_TIMEOUT) == 0
    after = await attempt("after")
    assert after["event"] == "echoed"
    assert after["peer"] == "server"
    TrustStore.open(peers["server"].trust_path).remove("newcomer")
    assert (await attempt("revoked"))["event"] == "refused"
    assert server.process.returncode is None  # the same server process throughout
