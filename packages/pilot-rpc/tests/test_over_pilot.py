"""pilot-rpc over the pilot:// carrier, against linked daemon doubles: a pool of streams."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pilot_rpc import RpcClient, RpcServer
from pilot_transport import open_transport
from pilot_transport.testing import PilotDaemonDouble, PilotNetworkDouble, create_test_peers

PORT = 5000


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="rpc-pilot-", dir="/tmp")  # short: Unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_calls_spread_over_a_pool_of_pilot_streams(sock_dir: str, tmp_path: Path) -> None:
    peers = create_test_peers(tmp_path, ["client", "server"])
    network = PilotNetworkDouble()
    server = RpcServer()
    release = asyncio.Event()

    @server.unary("wait")
    async def wait(request: Any, ctx: Any) -> Any:
        await release.wait()
        return request

    @server.server_streaming("count")
    async def count(request: int, ctx: Any) -> AsyncIterator[int]:
        for i in range(request):
            yield i

    async with (
        PilotDaemonDouble(f"{sock_dir}/c.sock", network=network) as dc,
        PilotDaemonDouble(f"{sock_dir}/s.sock", network=network) as ds,
    ):
        peers.set_address("server", str(ds.address))
        async with (
            open_transport(
                f"pilot://{ds.socket_path}",
                identity=peers["server"].identity,
                trust=peers["server"].trust,
            ) as server_transport,
            open_transport(
                f"pilot://{dc.socket_path}",
                identity=peers["client"].identity,
                trust=peers["client"].trust,
            ) as client_transport,
        ):
            listener = await server_transport.listen(PORT)
            async with server.serve_in_background(listener), RpcClient(client_transport) as client:
                release.set()
                assert await client.call("server", PORT, "wait", 0, timeout=30) == 0
                assert client.connections() == 1
                release.clear()
                # Busy calls make the pool grow (pipelining on one pilot stream is slow).
                calls = [
                    asyncio.create_task(client.call("server", PORT, "wait", i, timeout=30))
                    for i in range(8)
                ]
                async with asyncio.timeout(30):
                    while client.connections() < 4:
                        await asyncio.sleep(0.02)
                release.set()
                assert await asyncio.gather(*calls) == list(range(8))
                assert 1 < client.connections() <= 8
                async with client.stream("server", PORT, "count", 2000, timeout=30) as items:
                    assert [i async for i in items] == list(range(2000))
