"""pilot-worker as a real process: calls, ACL and limits, HTTP endpoints, SIGTERM drain,
--reload on a real file edit, plugins, OpenTelemetry export and CLI errors.

Each test starts its own worker (``python -m pilot_worker``) on
``tcp://127.0.0.1:0``, learns the bound endpoint from ``--ready-file``, and ends
only the process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pilot_rpc import (
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    RpcClient,
    Unavailable,
)
from pilot_transport import open_transport
from pilot_transport.testing import TestPeers, create_test_peers
from pilot_worker._cli import READY_FILE_KEYS
from pilot_worker.cli import main as cli_main
from pilot_worker.testing import WorkerProcess, run_worker_process

HANDLERS = """
import asyncio
import logging
import threading

from pydantic import BaseModel

from pilot_worker import Context, pilot_handler

log = logging.getLogger("test_handlers")
CLIENT = {client!r}


class Query(BaseModel):
    q: str
    limit: int = 3


@pilot_handler("echo")
async def echo(payload, ctx: Context):
    return {{"payload": payload, "caller": ctx.caller_node_id, "request_id": ctx.request_id}}


@pilot_handler("client_only", allow=[CLIENT])
def client_only(payload):
    return "for the client"


@pilot_handler("search")
async def search(query: Query) -> dict:
    return {{"q": query.q, "hits": list(range(query.limit))}}


@pilot_handler("limited", rate_per_caller=2, rate_window_secs=600)
def limited(payload):
    return payload


_busy = asyncio.Event()


@pilot_handler("busy", max_concurrent=1, timeout_secs=None)
async def busy(seconds):
    log.info("busy started")
    await asyncio.sleep(seconds)
    return "busy done"


@pilot_handler("work", timeout_secs=None)
async def work(seconds, ctx: Context):
    log.info("work started %s", ctx.request_id)
    await asyncio.sleep(seconds)
    return "work done"


@pilot_handler("sync_work", timeout_secs=0.2)
def sync_work(seconds):
    threading.Event().wait(seconds)
    return "sync done"


@pilot_handler("count")
async def count(n):
    for i in range(n):
        yield i
"""

RELOAD_V1 = """
from pilot_worker import pilot_handler

@pilot_handler("version")
def version(payload):
    return 1
"""

RELOAD_V2 = """
from pilot_worker import pilot_handler

@pilot_handler("version")
def version(payload):
    return 2

@pilot_handler("added")
def added(payload):
    return "added"
"""

RELOAD_BROKEN = """
from pilot_worker import pilot_handler

@pilot_handler("version")
def version(payload):
    return 3

this is not python
"""

PLUGIN = """
from pilot_worker import Plugin, PluginOption, pilot_handler


def setup(ctx):
    greeting = ctx.options["greeting"]
    punctuation = ctx.options["punctuation"]

    @pilot_handler("greet")
    def greet(payload):
        return f"{greeting}, {payload}{punctuation}"

    ctx.worker.register(greet)
    ctx.worker.on_shutdown(lambda: ctx.logger.info("greeter shutting down"))


plugin = Plugin(
    name="greeter",
    description="Greets.",
    options=[
        PluginOption(flag="--greeting", help="the greeting", required=True),
        PluginOption(flag="--punctuation", help="the end", env="GREETER_PUNCTUATION", default="."),
    ],
    setup=setup,
)
"""

DUP_ONE = """
from pilot_worker import pilot_handler

@pilot_handler("x")
def a(p):
    return 1
"""

DUP_TWO = DUP_ONE.replace("def a(p)", "def b(p)")


@dataclass
class World:
    tmp: Path
    peers: TestPeers

    def worker_args(self, *extra: str) -> list[str]:
        return [
            "--transport",
            "tcp://127.0.0.1:0",
            "--identity",
            str(self.peers["worker"].identity_path),
            "--trust",
            str(self.peers["worker"].trust_path),
            "--log-format",
            "json",
            *extra,
        ]

    def handlers_source(self) -> str:
        return HANDLERS.format(client=self.node_id("client"))

    def node_id(self, name: str) -> str:
        return self.peers[name].identity.node_id

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(textwrap.dedent(text))
        return path


@pytest.fixture
def world(tmp_path: Path) -> World:
    peers = create_test_peers(tmp_path / "peers", ["client", "other", "worker"])
    return World(tmp=tmp_path, peers=peers)


@contextlib.asynccontextmanager
async def started(
    world: World, *extra: str, env: dict[str, str] | None = None
) -> AsyncIterator[WorkerProcess]:
    """A worker process; peers' trust files learn its endpoint."""
    async with run_worker_process(
        world.worker_args(*extra),
        ready_file=world.tmp / "ready.json",
        cwd=world.tmp,
        env=env,
    ) as proc:
        # The ready file holds exactly the keys `pilot-worker --help` lists.
        assert list(proc.info) == list(READY_FILE_KEYS)
        world.peers.set_endpoint("worker", proc.info["endpoint"])
        yield proc


@contextlib.asynccontextmanager
async def client_of(world: World, name: str = "client") -> AsyncIterator[RpcClient]:
    peer = world.peers[name]
    async with open_transport("tcp://127.0.0.1:0", identity=peer.identity, trust=peer.trust) as t:
        client = RpcClient(t)
        try:
            yield client
        finally:
            await client.aclose()


async def call(client: RpcClient, method: str, payload: Any = None, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", 10)
    return await client.call("worker", 5000, method, payload, **kwargs)


async def http_get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as http:
        return await http.get(f"http://127.0.0.1:{port}{path}")


# --------------------------------------------------------------------------- calls


async def test_calls_acl_limits_and_validation(world: World) -> None:
    handlers = world.write("worker_handlers_main.py", world.handlers_source())
    extra = ["--handlers", str(handlers), "--default-policy", "closed"]
    extra += ["--introspection-allow", world.node_id("client")]
    # Closed by default: only handlers naming a caller are reachable.
    source = handlers.read_text()
    handlers.write_text(source.replace('("echo")', '("echo", allow=[CLIENT])'))
    async with (
        started(world, *extra) as proc,
        client_of(world) as client,
        client_of(world, "other") as other,
    ):
        reply = await call(client, "echo", {"x": 1})
        assert reply["payload"] == {"x": 1}
        assert reply["caller"] == world.node_id("client")
        assert await call(client, "client_only") == "for the client"
        # ACL on the authenticated node id: "other" is trusted by the transport but not allowed.
        with pytest.raises(PermissionDenied):
            await call(other, "client_only")
        with pytest.raises(PermissionDenied):
            await call(other, "echo", 1)
        # Closed default policy covers handlers without allow=, and the built-ins.
        with pytest.raises(PermissionDenied):
            await call(client, "search", {"q": "x"})
        with pytest.raises(PermissionDenied):
            await call(other, "_health")
        health = await call(client, "_health")
        assert health["ok"] is True
        listing = {h["name"]: h for h in await call(client, "_handlers")}
        assert listing["client_only"]["allow"] == [world.node_id("client")]
        assert listing["busy"]["max_concurrent"] == 1
        assert listing["search"]["input_schema"]["required"] == ["q"]
        assert listing["echo"]["calls"] == 2
        # A JSON log line per call, with the fields operators search by.
        line = await proc.wait_for_log('"handler":"client_only","status":"PERMISSION_DENIED"')
        record = json.loads(line)
        assert record["caller"] == world.node_id("other")
        assert record["reason"] == "acl"
        assert record["request_id"]


async def test_limits_timeouts_and_validation(world: World) -> None:
    handlers = world.write("worker_handlers_limits.py", world.handlers_source())
    async with started(world, "--handlers", str(handlers)) as proc, client_of(world) as client:
        assert await call(client, "search", {"q": "a", "limit": 2}) == {"q": "a", "hits": [0, 1]}
        with pytest.raises(InvalidArgument) as invalid:
            await call(client, "search", {"limit": "x"})
        assert {tuple(e["loc"]) for e in invalid.value.details["errors"]} == {("q",), ("limit",)}
        assert await call(client, "limited", 1) == 1
        assert await call(client, "limited", 2) == 2
        with pytest.raises(ResourceExhausted) as rate:
            await call(client, "limited", 3)
        assert rate.value.details["reason"] == "rate_limit"
        mark = len(proc.logs)
        first = asyncio.create_task(call(client, "busy", 1.0))
        await proc.wait_for_log("busy started", start=mark)
        with pytest.raises(ResourceExhausted) as busy:
            await call(client, "busy", 0)
        assert busy.value.details["reason"] == "concurrency_limit"
        assert await first == "busy done"
        with pytest.raises(DeadlineExceeded):
            await call(client, "sync_work", 1.0)
        async with client.stream("worker", 5000, "count", 3, timeout=10) as items:
            assert [item async for item in items] == [0, 1, 2]


# ------------------------------------------------------------------- HTTP endpoints


async def test_metrics_healthz_readyz_over_http(world: World) -> None:
    handlers = world.write("worker_handlers_http.py", world.handlers_source())
    extra = ["--handlers", str(handlers), "--metrics-port", "0", "--drain-timeout", "20"]
    async with started(world, *extra) as proc, client_of(world) as client:
        port = proc.info["metrics_port"]
        assert isinstance(port, int)
        await call(client, "echo", 1)
        with pytest.raises(InvalidArgument):
            await call(client, "search", {})
        metrics = (await http_get(port, "/metrics")).text
        assert 'pilot_worker_calls_total{code="OK",handler="echo"} 1.0' in metrics
        assert 'pilot_worker_errors_total{code="INVALID_ARGUMENT",handler="search"} 1.0' in metrics
        rejected = 'pilot_worker_rejections_total{handler="search",reason="invalid_argument"} 1.0'
        assert rejected in metrics
        assert 'pilot_worker_call_duration_seconds_count{handler="echo"} 1.0' in metrics
        assert "pilot_worker_ready 1.0" in metrics
        assert "process_resident_memory_bytes" in metrics
        assert (await http_get(port, "/healthz")).status_code == 200
        assert (await http_get(port, "/readyz")).status_code == 200

        # While draining: alive but not ready.
        mark = len(proc.logs)
        running = asyncio.create_task(call(client, "work", 1.5))
        await proc.wait_for_log("work started", start=mark)
        proc.send_signal(signal.SIGTERM)
        await proc.wait_for_log("received SIGTERM", start=mark)
        assert (await http_get(port, "/readyz")).status_code == 503
        assert (await http_get(port, "/healthz")).status_code == 200
        in_flight = (await http_get(port, "/metrics")).text
        assert 'pilot_worker_in_flight_calls{handler="work"} 1.0' in in_flight
        assert await running == "work done"
        assert await proc.wait() == 0


# --------------------------------------------------------------------------- drain


async def test_sigint_drain_finishes_in_flight_calls(world: World) -> None:
    # SIGTERM takes the same path; it is exercised by the HTTP and cut tests.
    handlers = world.write("worker_handlers_drain.py", world.handlers_source())
    async with started(world, "--handlers", str(handlers), "--drain-timeout", "20") as proc:
        async with client_of(world) as client:
            mark = len(proc.logs)
            running = [asyncio.create_task(call(client, "work", 1.0)) for _ in range(3)]
            for _ in range(3):
                line = await proc.wait_for_log("work started", start=mark)
                mark = proc.logs.index(line) + 1
            proc.send_signal(signal.SIGINT)
            assert await asyncio.gather(*running) == ["work done"] * 3
        assert await proc.wait() == 0
        assert any("drained: all in-flight calls finished" in line for line in proc.logs)


async def test_sigterm_drain_cuts_after_timeout_and_exits_nonzero(world: World) -> None:
    handlers = world.write("worker_handlers_cut.py", world.handlers_source())
    async with started(world, "--handlers", str(handlers), "--drain-timeout", "0.5") as proc:
        async with client_of(world) as client:
            mark = len(proc.logs)
            running = asyncio.create_task(call(client, "work", 60.0, timeout=30))
            await proc.wait_for_log("work started", start=mark)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(Unavailable):
                await running
        assert await proc.wait() == 1
        assert any("drain cut 1 call(s)" in line for line in proc.logs)


# -------------------------------------------------------------------------- reload


async def test_reload_on_a_real_file_edit(world: World) -> None:
    source = world.write("worker_handlers_reload.py", RELOAD_V1)
    extra = ["--handlers", source.name, "--reload"]
    async with started(world, *extra) as proc, client_of(world) as client:
        assert await call(client, "version") == 1
        await proc.wait_for_log("watching")
        mark = len(proc.logs)
        source.write_text(RELOAD_V2)
        await proc.wait_for_log("reloaded handlers", start=mark)
        assert await call(client, "version") == 2
        assert await call(client, "added") == "added"

        mark = len(proc.logs)
        source.write_text(RELOAD_BROKEN)
        line = await proc.wait_for_log("reload failed", start=mark)
        assert "keeping the previous handlers" in line
        assert "worker_handlers_reload.py" in line
        assert await call(client, "version") == 2


# ------------------------------------------------------------------------- plugins


async def test_plugin_with_options_in_a_real_process(world: World) -> None:
    world.write("greeter_plugin_mod.py", PLUGIN)
    env = {**os.environ, "GREETER_PUNCTUATION": "!", "PYTHONPATH": str(world.tmp)}
    extra = ["--plugin", "greeter_plugin_mod:plugin", "--greeting", "Hello"]
    async with started(world, *extra, env=env) as proc, client_of(world) as client:
        assert proc.info["handlers"] == ["greet"]
        assert await call(client, "greet", "pilot") == "Hello, pilot!"
    assert any("greeter shutting down" in line for line in proc.logs)


async def _run_cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pilot_worker",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def test_list_plugins_shows_installed_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    # In this process: the installed distributions' entry points are what matter.
    assert cli_main(["--list-plugins"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint-sqlite" in out
    assert "--checkpoint-db VALUE" in out
    assert "channels" in out


# ---------------------------------------------------------------------- CLI errors


async def test_cli_configuration_error_in_a_real_process(world: World) -> None:
    # The other configuration errors (duplicate names, unusable key files, plugin
    # options) are covered in-process by packages/pilot-worker/tests/test_cli.py.
    world.write("dup_one.py", DUP_ONE)
    world.write("dup_two.py", DUP_TWO)
    code, out, err = await _run_cli(
        *world.worker_args("--handlers", "dup_one", "--handlers", "dup_two"), cwd=world.tmp
    )
    assert code == 2
    assert out == ""
    assert "handler name 'x' is defined twice: dup_one:a and dup_two:b" in err


# --------------------------------------------------------------------------- OTel


async def test_otel_console_export_continues_traceparent(world: World) -> None:
    handlers = world.write("worker_handlers_otel.py", world.handlers_source())
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    extra = ["--handlers", str(handlers), "--otel-endpoint", "console", "--otel-service-name", "wk"]
    async with started(world, *extra) as proc, client_of(world) as client:
        await call(client, "echo", 1, traceparent=f"00-{trace_id}-00f067aa0ba902b7-01")
        await proc.wait_for_log(f'"trace_id": "0x{trace_id}"')
        await proc.wait_for_log('"service.name": "wk"')
