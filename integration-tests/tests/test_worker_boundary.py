"""pilot-worker's peer boundary as a real process: deadlines a handler cannot
ignore, an ops HTTP port that idle sockets cannot lock out, input validation
that no codec can bypass, and handler types that survive a file-path import.

Each test starts its own worker (pilot-worker's one launcher,
``pilot_worker.testing.run_worker_process``) on ``tcp://127.0.0.1:0`` and ends
only the process it started. Handlers that must outlive their deadline wait
for a release file the test writes, so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pilot_rpc import DeadlineExceeded, InvalidArgument, RpcClient
from pilot_transport import open_transport
from pilot_transport.testing import TestPeers, create_test_peers
from pilot_worker.testing import WorkerProcess, run_worker_process

HANDLERS = """
import asyncio
import logging
import os
import time

from pydantic import BaseModel

from pilot_worker import pilot_handler

log = logging.getLogger("boundary")
RELEASE = {release!r}


class Search(BaseModel):
    q: str
    limit: int


class Answer(BaseModel):
    text: str
    score: float


async def _until_released():
    # Catches every cancellation and carries on: a handler that ignores its deadline.
    while not os.path.exists(RELEASE):
        try:
            await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            log.warning("stubborn: caught my cancellation, carrying on")


@pilot_handler("stubborn", timeout_secs=1)
async def stubborn(payload):
    await _until_released()
    log.warning("stubborn: returning now")
    return "ok"


@pilot_handler("stubborn_caller_deadline")
async def stubborn_caller_deadline(payload):
    await _until_released()
    return "ok"


@pilot_handler("slow_sync", timeout_secs=1)
def slow_sync(payload):
    while not os.path.exists(RELEASE):
        time.sleep(0.02)
    return "ok"


@pilot_handler("search")
def search(args: Search) -> dict:
    log.warning("search ran with q=%r limit=%r", args.q, args.limit)
    return {{"q": args.q, "limit": args.limit}}


@pilot_handler("answer")
def answer(args: Search) -> Answer:
    return Answer(text=args.q * args.limit, score=0.5)
"""


@dataclass
class World:
    tmp: Path
    peers: TestPeers

    @property
    def release(self) -> Path:
        return self.tmp / "release"

    def worker_args(self, *extra: str) -> list[str]:
        handlers = self.tmp / "boundary_handlers.py"
        if not handlers.exists():
            handlers.write_text(textwrap.dedent(HANDLERS.format(release=str(self.release))))
        return [
            "--transport",
            "tcp://127.0.0.1:0",
            "--identity",
            str(self.peers["worker"].identity_path),
            "--trust",
            str(self.peers["worker"].trust_path),
            "--handlers",
            str(handlers),
            "--metrics-port",
            "0",
            *extra,
        ]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp=tmp_path, peers=create_test_peers(tmp_path / "peers", ["client", "worker"]))


@contextlib.asynccontextmanager
async def started(
    world: World, *extra: str, module: str = "pilot_worker"
) -> AsyncIterator[WorkerProcess]:
    async with run_worker_process(
        world.worker_args(*extra), ready_file=world.tmp / "ready.json", module=module
    ) as proc:
        world.peers.set_endpoint("worker", proc.info["endpoint"])
        yield proc


@contextlib.asynccontextmanager
async def client_of(world: World) -> AsyncIterator[RpcClient]:
    peer = world.peers["client"]
    async with open_transport("tcp://127.0.0.1:0", identity=peer.identity, trust=peer.trust) as t:
        client = RpcClient(t)
        try:
            yield client
        finally:
            await client.aclose()


async def call(client: RpcClient, method: str, payload: Any = None, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", 30)
    return await client.call("worker", 5000, method, payload, **kwargs)


async def metric(port: int, name: str, handler: str) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'{name}{{handler="{handler}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ----------------------------------------------------------------- deadlines


@pytest.mark.parametrize("handler", ["stubborn", "slow_sync"])
async def test_a_handler_cannot_outrun_its_timeout(world: World, handler: str) -> None:
    async with started(world) as proc, client_of(world) as client:
        port = proc.info["metrics_port"]
        # The caller allows 30 s; the handler's own timeout is 1 s and it ignores it.
        with pytest.raises(DeadlineExceeded) as info:
            await call(client, handler, timeout=30)
        assert info.value.details["reason"] == "timeout"
        # Answered while the handler still runs: it has not been released yet.
        assert not world.release.exists()
        assert not any("stubborn: returning now" in line for line in proc.logs)
        mark = len(proc.logs)
        world.release.write_text("go")
        line = await proc.wait_for_log("past its deadline", start=mark)
        assert f"handler {handler!r} kept running" in line
        assert "result is discarded" in line
        assert await metric(port, "pilot_worker_deadline_overruns_total", handler) == 1.0
        # The call was counted as DEADLINE_EXCEEDED, never as OK.
        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        assert f'pilot_worker_calls_total{{code="OK",handler="{handler}"}}' not in text
        assert f'pilot_worker_calls_total{{code="DEADLINE_EXCEEDED",handler="{handler}"}} 1.0' in (
            text
        )


async def test_the_callers_deadline_is_not_turned_into_ok(world: World) -> None:
    async with started(world) as proc, client_of(world) as client:
        with pytest.raises(DeadlineExceeded):
            await call(client, "stubborn_caller_deadline", timeout=1.0)
        assert not world.release.exists()
        mark = len(proc.logs)
        world.release.write_text("go")
        line = await proc.wait_for_log("ignored its cancellation", start=mark)
        assert "'stubborn_caller_deadline'" in line
        port = proc.info["metrics_port"]
        count = await metric(
            port, "pilot_worker_deadline_overruns_total", "stubborn_caller_deadline"
        )
        assert count == 1.0


# ------------------------------------------------------------------- ops HTTP


async def test_healthz_answers_with_many_idle_connections(world: World) -> None:
    async with started(world) as proc:
        port = proc.info["metrics_port"]
        idle: list[asyncio.StreamWriter] = []
        try:
            for _ in range(100):  # more than the 64-connection cap, none sends a byte
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                idle.append(writer)
            # Each probe gets through at once: idle sockets are shed for it. The
            # 3 s client timeout is well under the 5 s idle read deadline.
            async with httpx.AsyncClient(timeout=3) as http:
                for _ in range(5):
                    response = await http.get(f"http://127.0.0.1:{port}/healthz")
                    assert response.status_code == 200
                    assert response.text == "ok\n"
        finally:
            for writer in idle:
                writer.close()


# ---------------------------------------------------------------- validation


async def test_invalid_arguments_never_reach_the_handler(world: World) -> None:
    async with started(world) as proc, client_of(world) as client:
        with pytest.raises(InvalidArgument) as info:
            await call(client, "search", {"q": 123, "limit": "DROP TABLE"})
        errors = info.value.details["errors"]
        assert {tuple(e["loc"]) for e in errors} == {("q",), ("limit",)}
        assert info.value.details["reason"] == "invalid_argument"
        assert await call(client, "search", {"q": "x", "limit": 2}) == {"q": "x", "limit": 2}
        # Output is read in order: the first run logged is the valid call's.
        line = await proc.wait_for_log("search ran")
        assert "q='x' limit=2" in line


async def test_a_typed_codec_cannot_smuggle_an_unvalidated_model(world: World) -> None:
    """The LangGraph codec builds a model it cannot validate with model_construct;
    the worker validates it again from its field values."""
    import ormsgpack
    from pilot_langgraph._codec import ENVELOPE_KEY, LangGraphCodec

    sys.path.insert(0, str(world.tmp))
    try:
        args = world.worker_args()  # writes boundary_handlers.py
        import boundary_handlers  # type: ignore[import-not-found]

        codec = LangGraphCodec()
        # What a hostile peer sends: LangGraph's pydantic-v2 extension value naming
        # the handler's model, with fields of the wrong types (the codec's strict
        # encoder would refuse to build it, so it is written by hand).
        fields = {"q": 123, "limit": "DROP TABLE"}
        ext = ormsgpack.Ext(5, ormsgpack.packb(["boundary_handlers", "Search", fields, None]))
        smuggled = {ENVELOPE_KEY: ["msgpack", ormsgpack.packb(ext)]}
        async with (
            run_worker_process(
                args, ready_file=world.tmp / "ready.json", module="pilot_langgraph._worker_cli"
            ) as proc,
            client_of(world) as client,
        ):
            world.peers.set_endpoint("worker", proc.info["endpoint"])
            with pytest.raises(InvalidArgument) as info:
                await call(client, "search", smuggled)
            assert {tuple(e["loc"]) for e in info.value.details["errors"]} == {
                ("q",),
                ("limit",),
            }
            ok = boundary_handlers.Search(q="fine", limit=1)
            assert await call(client, "search", codec.encode(ok)) is not None
            line = await proc.wait_for_log("search ran")
            assert "q='fine' limit=1" in line  # the smuggled call never ran
            # Types as they were: the handler's pydantic model (from a module loaded
            # by file path) comes back as that very type, not as a dict.
            good = boundary_handlers.Search(q="ab", limit=2)
            reply = codec.decode(await call(client, "answer", codec.encode(good)))
            assert type(reply) is boundary_handlers.Answer
            assert reply == boundary_handlers.Answer(text="abab", score=0.5)
    finally:
        sys.path.remove(str(world.tmp))
        sys.modules.pop("boundary_handlers", None)
