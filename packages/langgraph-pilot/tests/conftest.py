"""A small in-process cluster: workers and a client on one memory:// hub."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pilot_langgraph import LangGraphCodec, LangGraphMiddleware, aclose_default_transport
from pilot_transport import Transport, open_transport
from pilot_transport.testing import TestPeers, create_test_peers
from pilot_worker import WorkerConfig, WorkerServer


@dataclass
class Cluster:
    peers: TestPeers
    hub: str
    client: Transport
    stack: AsyncExitStack
    workers: dict[str, WorkerServer] = field(default_factory=dict[str, WorkerServer])

    async def start_worker(
        self,
        name: str,
        handlers: Sequence[Callable[..., Any]] | ModuleType = (),
        *,
        config: WorkerConfig | None = None,
    ) -> WorkerServer:
        peer = self.peers[name]
        transport = await self.stack.enter_async_context(
            await open_transport(self.hub, identity=peer.identity, trust=peer.trust)
        )
        worker = WorkerServer(
            transport, config or WorkerConfig(port=5000, log_calls=False), codec=LangGraphCodec()
        )
        worker.add_middleware(LangGraphMiddleware(worker))
        if isinstance(handlers, ModuleType):
            worker.include_module(handlers)
        else:
            for fn in handlers:
                worker.register(fn)
        await worker.start()
        self.stack.push_async_callback(worker.aclose)
        self.workers[name] = worker
        return worker


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    peers = create_test_peers(
        tmp_path, ["client", "worker-a", "worker-b", "worker-c", "state-worker"]
    )
    hub = f"memory://lg-{uuid.uuid4().hex[:12]}"
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            await open_transport(
                hub, identity=peers["client"].identity, trust=peers["client"].trust
            )
        )
        stack.push_async_callback(aclose_default_transport)
        yield Cluster(peers=peers, hub=hub, client=client, stack=stack)
