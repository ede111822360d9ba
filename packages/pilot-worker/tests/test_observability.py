"""Spans continuing the caller's traceparent, JSON call logs, the ops HTTP server."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pilot_rpc import PermissionDenied
from pilot_worker import CallLogWriter, WorkerServer, pilot_handler
from pilot_worker._http import OpsHttpServer
from pilot_worker._logging import JsonFormatter
from pilot_worker.testing import WorkerTestClient, make_peer
from prometheus_client import CollectorRegistry

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pilot_handler("hello")
async def hello(payload: Any) -> str:
    return f"hello {payload}"


@pilot_handler("private", allow=[])
def private(payload: Any) -> None:
    return None


async def test_server_span_continues_traceparent() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    worker = WorkerServer(None, tracer_provider=provider)
    worker.register(hello)
    worker.register(private)
    async with WorkerTestClient(worker, caller="alice") as client:
        await client.call("hello", "x", traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01")
        with pytest.raises(PermissionDenied):
            await client.call("private")
    ok, denied = exporter.get_finished_spans()
    assert ok.name == "hello"
    assert ok.kind is SpanKind.SERVER
    assert ok.context is not None
    assert format(ok.context.trace_id, "032x") == TRACE_ID
    assert ok.parent is not None
    assert format(ok.parent.span_id, "016x") == PARENT_ID
    assert ok.attributes is not None
    assert ok.attributes["pilot.caller.node_id"] == make_peer("alice").node_id
    assert ok.attributes["rpc.pilot.status_code"] == "OK"
    assert denied.status.status_code is StatusCode.ERROR
    assert denied.parent is None


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    calls = logging.getLogger("pilot_worker.calls")
    calls.addHandler(handler)
    previous = calls.level
    calls.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        calls.removeHandler(handler)
        calls.setLevel(previous)


async def test_one_json_line_per_call(json_log: io.StringIO) -> None:
    async with WorkerTestClient([hello, private], caller="bob") as client:
        await client.call("hello", "x")
        with pytest.raises(PermissionDenied):
            await client.call("private")
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert first["handler"] == "hello"
    assert first["status"] == "OK"
    assert first["caller"] == make_peer("bob").node_id
    assert first["caller_name"] == "bob"
    assert first["request_id"].startswith("test-")
    assert first["duration_ms"] >= 0
    assert first["level"] == "INFO"
    assert second["status"] == "PERMISSION_DENIED"
    assert second["reason"] == "acl"
    assert second["level"] == "WARNING"


async def test_call_log_writer_matches_the_json_formatter(json_log: io.StringIO) -> None:
    fast = io.StringIO()
    writer = CallLogWriter(fast, "json")
    worker = WorkerServer(None, call_log=writer)
    worker.register(hello)
    worker.register(private)
    async with WorkerTestClient(worker, caller="bob") as client:
        await client.call("hello", 'quote " and \\ backslash')
        with pytest.raises(PermissionDenied):
            await client.call("private")
    writer.flush()
    assert json_log.getvalue() == ""  # the writer replaced the logger
    lines = [json.loads(line) for line in fast.getvalue().splitlines()]
    assert [line["status"] for line in lines] == ["OK", "PERMISSION_DENIED"]
    reference = JsonFormatter().format(
        logging.LogRecord("pilot_worker.calls", logging.INFO, "", 0, "m", None, None)
    )
    keys = set(json.loads(reference)) | {
        "request_id",
        "caller",
        "caller_name",
        "handler",
        "status",
        "duration_ms",
        "reason",
    }
    assert set(lines[0]) == keys
    assert lines[1]["reason"] == "acl"
    assert lines[1]["level"] == "WARNING"
    assert lines[0]["caller_name"] == "bob"

    plain = io.StringIO()
    plain_writer = CallLogWriter(plain, "plain")
    plain_writer.write(
        handler="h",
        status="OK",
        duration_ms=1.5,
        caller="n",
        caller_name=None,
        request_id="r",
        reason=None,
    )
    plain_writer.flush()
    assert plain.getvalue().endswith(
        " INFO pilot_worker.calls: h OK 1.500ms caller=n request_id=r\n"
    )


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_ops_http_server() -> None:
    registry = CollectorRegistry()
    worker = WorkerServer(None, metrics_registry=registry)
    worker.register(hello)
    async with WorkerTestClient(worker) as client:
        await client.call("hello", 1)
    ready = [True]

    async def is_ready() -> bool:
        return ready[0]

    server = OpsHttpServer(
        host="127.0.0.1", port=0, registry=registry, alive=lambda: True, ready=is_ready
    )
    await server.start()
    try:
        status, body = await _get(server.port, "/metrics")
        assert status == 200
        assert b'pilot_worker_calls_total{code="OK",handler="hello"} 1.0' in body
        assert (await _get(server.port, "/healthz"))[0] == 200
        assert (await _get(server.port, "/readyz"))[0] == 200
        ready[0] = False
        assert (await _get(server.port, "/readyz"))[0] == 503
        assert (await _get(server.port, "/nope"))[0] == 404
        assert (await _get(server.port, "/metrics", "POST"))[0] == 405
        status, body = await _get(server.port, "/healthz", "HEAD")
        assert status == 200
        assert body == b""
    finally:
        await server.aclose()


async def test_ops_http_sheds_idle_connections_instead_of_refusing_probes() -> None:
    registry = CollectorRegistry()

    async def is_ready() -> bool:
        return True

    server = OpsHttpServer(
        host="127.0.0.1",
        port=0,
        registry=registry,
        alive=lambda: True,
        ready=is_ready,
        max_connections=4,
        read_timeout=600.0,  # idle sockets are shed for room, not by the clock
    )
    await server.start()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(10):
            idle.append(await asyncio.open_connection("127.0.0.1", server.port))
        # Each probe finds the cap taken by idle sockets and must still be answered.
        for _ in range(3):
            assert (await _get(server.port, "/healthz"))[0] == 200
        assert server.shed >= 6
        assert server.refused == 0
        # The oldest idle socket was shed first: the server closed it.
        async with asyncio.timeout(30):
            assert await idle[0][0].read() == b""
    finally:
        for _, writer in idle:
            writer.close()
        await server.aclose()
