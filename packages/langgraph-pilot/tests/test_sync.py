"""Sync methods work from threads with or without a running loop (tcp:// loopback)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pilot_langgraph import (
    LangGraphCodec,
    PilotFanoutRunnable,
    PilotRemoteRunnable,
    PilotUsageError,
    aclose_default_transport,
    configure_default_transport,
)
from pilot_langgraph._builtin_handlers import echo
from pilot_transport import open_transport
from pilot_transport.testing import create_test_peers
from pilot_worker import WorkerConfig, WorkerServer, pilot_handler


@pilot_handler("double")
async def double(n: int) -> int:
    return 2 * n


@pilot_handler("chunks")
async def chunks(n: int) -> Any:
    for i in range(n):
        yield f"{i}"


async def test_sync_methods_use_the_default_transport(tmp_path: Path) -> None:
    peers = create_test_peers(tmp_path, ["me", "worker-a"])
    async with await open_transport(
        "tcp://127.0.0.1:0", identity=peers["worker-a"].identity, trust=peers["worker-a"].trust
    ) as transport:
        worker = WorkerServer(
            transport, WorkerConfig(port=5000, log_calls=False), codec=LangGraphCodec()
        )
        for fn in (double, chunks, echo):
            worker.register(fn)
        async with worker:
            peers.set_endpoint("worker-a", str((await transport.info()).endpoint))
            configure_default_transport(
                url="tcp://127.0.0.1:0",
                identity=peers["me"].identity_path,
                trust=peers["me"].trust_path,
            )
            try:
                node = PilotRemoteRunnable(node="double", peer="worker-a")
                # a thread with no event loop
                assert await asyncio.to_thread(node.invoke, 21) == 42
                assert await asyncio.to_thread(node.batch, [1, 2, 3]) == [2, 4, 6]
                streamer = PilotRemoteRunnable(node="chunks", peer="worker-a", streaming=True)
                assert await asyncio.to_thread(lambda: list(streamer.stream(3))) == ["0", "1", "2"]
                fan = PilotFanoutRunnable({"x": node, "y": {"node": "double", "peer": "worker-a"}})
                assert await asyncio.to_thread(fan.invoke, 5) == {"x": 10, "y": 10}

                # a thread whose own loop is running (e.g. a notebook cell)
                def inside_a_loop() -> int:
                    async def run() -> int:
                        return node.invoke(4)

                    return asyncio.run(run())

                assert await asyncio.to_thread(inside_a_loop) == 8
                # and the async path on this loop uses its own default transport
                assert await node.ainvoke(1) == 2
            finally:
                await aclose_default_transport()
                configure_default_transport()


async def test_sync_call_on_the_transports_own_loop_is_refused(cluster: Any) -> None:
    await cluster.start_worker("worker-a", [double])
    node = PilotRemoteRunnable(node="double", peer="worker-a", transport=cluster.client)
    assert await node.ainvoke(1) == 2
    with pytest.raises(PilotUsageError):
        node.invoke(1)
