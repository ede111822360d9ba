"""A full open_transport("pilot:///...") round trip: TLS 1.3 over the pilot:// carrier."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pilot_transport import SecureStream, open_transport
from pilot_transport.errors import PeerNotTrustedError, RejectedByPeerError
from pilot_transport.testing import (
    PilotDaemonDouble,
    PilotNetworkDouble,
    check_stream_conformance,
    create_test_peers,
)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ptt-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_tls_over_pilot_between_two_linked_daemons(sock_dir: str, tmp_path: Path) -> None:
    peers = create_test_peers(tmp_path / "peers", ["client", "server", "stranger"])
    network = PilotNetworkDouble()
    async with (
        PilotDaemonDouble(f"{sock_dir}/c.sock", network=network) as dc,
        PilotDaemonDouble(f"{sock_dir}/s.sock", network=network) as ds,
        PilotDaemonDouble(f"{sock_dir}/x.sock", network=network) as dx,
    ):
        peers.set_address("server", str(ds.address))
        async with (
            open_transport(
                f"pilot://{ds.socket_path}",
                identity=peers["server"].identity,
                trust=peers["server"].trust,
            ) as server,
            open_transport(
                f"pilot://{dc.socket_path}",
                identity=peers["client"].identity,
                trust=peers["client"].trust,
            ) as client,
        ):
            listener = await server.listen(5000)
            info = await server.info()
            assert info.carrier == "pilot"
            assert info.address == str(ds.address)

            async def make_pair() -> tuple[SecureStream, SecureStream]:
                stream = await client.connect("server", 5000, timeout=10.0)
                accepted = await listener.accept()
                assert stream.peer.name == "server"
                assert accepted.peer.node_id == peers["client"].identity.node_id
                return stream, accepted

            await check_stream_conformance(make_pair, large_size=512 * 1024)

            # A node whose key the server does not trust is refused, on both sides.
            stranger_peers = create_test_peers(tmp_path / "strangers", ["stranger", "server"])
            stranger_peers.set_address("server", str(ds.address))
            async with open_transport(
                f"pilot://{dx.socket_path}",
                identity=stranger_peers["stranger"].identity,
                trust=stranger_peers["stranger"].trust,
            ) as stranger:
                with pytest.raises((PeerNotTrustedError, RejectedByPeerError)):
                    await stranger.connect(str(ds.address), 5000, timeout=10.0)
