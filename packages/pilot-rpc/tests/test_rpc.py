"""Client and server driven end to end through the in-memory pair (no sockets, no TLS)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from pilot_rpc import (
    Cancelled,
    ClientOptions,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MethodKind,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    RpcClient,
    RpcServer,
    ServerOptions,
    Unavailable,
    Unimplemented,
)
from pilot_rpc.testing import connect_in_memory

MakeServer = Callable[[ServerOptions | None], RpcServer]


async def test_unary_round_trip_of_msgpack_values(server: RpcServer) -> None:
    value = {"s": "text", "b": b"\x00\xff", "i": -(2**63), "f": 1.5, "l": [None, True], 1: "k"}
    async with connect_in_memory(server) as pair:
        assert await pair.call("echo", value) == value
        assert await pair.call("echo") is None
        assert await pair.call("sync_echo", [1, 2]) == [1, 2]


async def test_context_sees_peer_metadata_and_deadline(server: RpcServer, probe: Any) -> None:
    async with connect_in_memory(server, client_name="alice") as pair:
        await pair.call(
            "echo",
            1,
            timeout=30,
            metadata={"tenant": "t1"},
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            idempotency_key="op-42",
        )
    (ctx,) = probe.contexts
    assert ctx.peer.name == "alice"
    assert ctx.method == "echo"
    assert ctx.metadata["tenant"] == "t1"
    assert ctx.traceparent is not None
    assert ctx.traceparent.startswith("00-0af7")
    assert ctx.idempotency_key == "op-42"
    assert ctx.request_id  # generated when the caller gives none
    remaining = ctx.time_remaining()
    assert remaining is not None
    assert 0 < remaining <= 30
    assert not ctx.cancelled


async def test_handler_errors_reach_the_caller(server: RpcServer) -> None:
    async with connect_in_memory(server) as pair:
        with pytest.raises(Internal) as info:
            await pair.call("fail", 7)
        assert info.value.message == "ValueError: bad value 7"
        assert info.value.details == {"exception_type": "ValueError"}
        with pytest.raises(NotFound) as nf:
            await pair.call("not_found", "k1")
        assert nf.value.details == {"key": "k1"}
        with pytest.raises(Unimplemented, match="no method named 'nope'"):
            await pair.call("nope")
        with pytest.raises(Unimplemented, match="SERVER_STREAMING, called as UNARY"):
            await pair.call("count", 1)
        with pytest.raises(Internal, match="not msgpack-encodable"):
            await pair.call("bad_reply")
        # The connection survived all of that.
        assert await pair.call("echo", "ok") == "ok"
        assert pair.client.connections() == 1


async def test_tracebacks_only_when_the_server_opts_in(make_server: MakeServer) -> None:
    server = make_server(ServerOptions(include_tracebacks=True))
    async with connect_in_memory(server) as pair:
        with pytest.raises(Internal) as info:
            await pair.call("fail", 1)
    assert "Traceback" in info.value.details["traceback"]
    assert "bad value 1" in info.value.details["traceback"]


async def test_unencodable_request_is_invalid_argument_and_nothing_is_sent(
    server: RpcServer,
) -> None:
    async with connect_in_memory(server) as pair:
        with pytest.raises(InvalidArgument, match="not msgpack-encodable"):
            await pair.call("echo", object())
        with pytest.raises(InvalidArgument, match="metadata"):
            await pair.call("echo", 1, metadata={"k": 1})  # type: ignore[dict-item]
        assert await pair.call("echo", 2) == 2


async def test_request_over_the_servers_limit_fails_locally(make_server: MakeServer) -> None:
    server = make_server(ServerOptions(max_message_size=64 * 1024))
    async with connect_in_memory(server) as pair:
        with pytest.raises(ResourceExhausted, match="exceeds the peer's limit"):
            await pair.call("echo", b"x" * 100_000)
        assert await pair.call("echo", b"x" * 60_000) == b"x" * 60_000


async def test_large_message_in_pieces(server: RpcServer) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, eight frames of 256 KiB
    async with connect_in_memory(server) as pair:
        assert await pair.call("echo", body) == body


# -- deadlines and cancellation -------------------------------------------------------------------


async def test_deadline_fails_the_caller_and_cancels_the_handler(
    server: RpcServer, probe: Any
) -> None:
    async with connect_in_memory(server) as pair:
        with pytest.raises(DeadlineExceeded) as info:
            await pair.call("hang", timeout=0.2)
        assert isinstance(info.value, TimeoutError)
        async with asyncio.timeout(5):
            await probe.cancelled.wait()
        assert probe.contexts[0].cancelled
        assert await pair.call("echo", 1) == 1


async def test_cancelled_caller_cancels_the_handler(server: RpcServer, probe: Any) -> None:
    async with connect_in_memory(server) as pair:
        task = asyncio.create_task(pair.call("hang"))
        async with asyncio.timeout(5):
            await probe.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(5):
            await probe.cancelled.wait()
            await probe.contexts[0].wait_cancelled()
        assert server.inflight == 0 or await _until(lambda: server.inflight == 0)


async def _until(predicate: Any, timeout: float = 5.0) -> bool:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    return True


async def test_connection_loss_fails_pending_calls_then_reconnects(
    server: RpcServer, probe: Any
) -> None:
    async with connect_in_memory(server) as pair:
        task = asyncio.create_task(pair.call("hang"))
        async with asyncio.timeout(5):
            await probe.started.wait()
        pair.break_connections()
        with pytest.raises(Unavailable) as info:
            async with asyncio.timeout(5):
                await task
        assert not info.value.retry_safe  # it had reached the handler
        async with asyncio.timeout(5):
            await probe.cancelled.wait()  # the server side noticed too
        assert await pair.call("echo", "again") == "again"


async def test_client_aclose_fails_pending_calls_with_cancelled(
    server: RpcServer, probe: Any
) -> None:
    async with connect_in_memory(server) as pair:
        task = asyncio.create_task(pair.call("hang"))
        async with asyncio.timeout(5):
            await probe.started.wait()
        await pair.client.aclose()
        with pytest.raises(Cancelled):
            await task
        with pytest.raises(Cancelled):
            await pair.call("echo", 1)


# -- progress -------------------------------------------------------------------------------------


async def test_progress_callbacks_sync_and_async(server: RpcServer) -> None:
    seen: list[Any] = []

    async def record(value: Any) -> None:
        seen.append(("async", value))

    async with connect_in_memory(server) as pair:
        assert await pair.call("progress", 3, on_progress=seen.append) == "done"
        assert seen == [{"step": 0}, {"step": 1}, {"step": 2}]
        seen.clear()
        assert await pair.call("progress", 2, on_progress=record) == "done"
        assert seen == [("async", {"step": 0}), ("async", {"step": 1})]
        # Without a callback, progress is dropped (and credited) silently.
        assert await pair.call("progress", 500) == "done"


async def test_failing_progress_callback_abandons_the_call(server: RpcServer) -> None:
    def explode(value: Any) -> None:
        raise RuntimeError("callback broke")

    async with connect_in_memory(server) as pair:
        with pytest.raises(RuntimeError, match="callback broke"):
            await pair.call("progress", 3, on_progress=explode)
        assert await pair.call("echo", 1) == 1


# -- streaming ------------------------------------------------------------------------------------


async def test_server_streaming(server: RpcServer) -> None:
    async with connect_in_memory(server) as pair:
        async with pair.stream("count", 1000) as items:
            assert [i async for i in items] == list(range(1000))
        async with pair.stream("count", 0) as items:
            assert [i async for i in items] == []


async def test_stream_error_after_items(server: RpcServer) -> None:
    async with connect_in_memory(server) as pair, pair.stream("fail_after", 3) as items:
        got = [await anext(items) for _ in range(3)]
        with pytest.raises(InvalidArgument) as info:
            await anext(items)
        assert got == [0, 1, 2]
        assert info.value.details == {"at": 3}


async def test_slow_reader_bounds_the_writer(server: RpcServer, probe: Any) -> None:
    async with connect_in_memory(server) as pair, pair.stream("firehose", 1000) as items:
        first = await anext(items)
        assert len(first) == 1000
        # Stop reading: the producer must stall once the window (256 KiB) is full.
        async with asyncio.timeout(5):
            while True:
                before = probe.produced
                await asyncio.sleep(0.05)
                if probe.produced == before:
                    break
        assert probe.produced <= 256 * 1024 // 1000 + 2
        # Reading again resumes it.
        for _ in range(1000):
            await anext(items)
        assert probe.produced > 256
    # Leaving the block cancelled the call: the generator was closed.
    async with asyncio.timeout(5):
        await probe.finished.wait()


async def test_client_streaming_and_bidi(server: RpcServer) -> None:
    async with connect_in_memory(server) as pair:
        async with pair.client.client_streaming(pair.peer, pair.port, "sum") as requests:
            for i in range(100):
                await requests.send(i)
            assert await requests.finish() == sum(range(100))
        async with pair.client.bidi_streaming(pair.peer, pair.port, "double") as stream:
            await stream.send(1)
            assert await anext(stream) == 2
            await stream.send(5)
            await stream.done_sending()
            assert [x async for x in stream] == [10]


# -- concurrency, limits, drain -------------------------------------------------------------------


async def test_many_concurrent_calls_beyond_the_servers_limit(make_server: MakeServer) -> None:
    server = make_server(ServerOptions(max_concurrent_calls_per_connection=8))
    async with connect_in_memory(server) as pair:
        results = await asyncio.gather(*(pair.call("echo", i) for i in range(300)))
        assert results == list(range(300))
        assert pair.client.connections() == 1


async def test_drain_lets_inflight_calls_finish(server: RpcServer, probe: Any) -> None:
    async with connect_in_memory(server) as pair:
        task = asyncio.create_task(pair.call("sleep", 0.2))
        async with asyncio.timeout(5):
            await probe.started.wait()
        cut = await server.drain(timeout=5)
        assert cut == 0
        assert await task == "slept"


async def test_drain_cuts_calls_past_the_timeout(server: RpcServer, probe: Any) -> None:
    async with connect_in_memory(server) as pair:
        task = asyncio.create_task(pair.call("hang"))
        async with asyncio.timeout(5):
            await probe.started.wait()
        assert await server.drain(timeout=0.1) == 1
        with pytest.raises(Unavailable, match="shut down"):
            await task


async def test_goaway_moves_new_calls_to_a_new_connection(server: RpcServer, probe: Any) -> None:
    async with connect_in_memory(server) as pair:
        assert await pair.call("echo", 1) == 1
        (conn,) = pair.transport.server_connections
        conn.core.goaway(0, "rotating")
        conn.kick()
        async with asyncio.timeout(5):
            while pair.client.connections() and not _going_away(pair):
                await asyncio.sleep(0.01)
        assert await pair.call("echo", 2) == 2
        assert len(pair.transport.server_connections) == 2


def _going_away(pair: Any) -> bool:
    return any(c.going_away for pool in pair.client._pools.values() for c in pool.conns)


# -- retries and reconnect ------------------------------------------------------------------------


async def test_unreachable_peer_fails_fast_and_retries_with_backoff(server: RpcServer) -> None:
    from pilot_transport.errors import PeerUnreachableError

    options = ClientOptions(retry=RetryPolicy(max_attempts=2, initial_backoff=0.01))
    async with connect_in_memory(server, client_options=options) as pair:
        pair.transport.refuse = PeerUnreachableError("connection refused")
        with pytest.raises(Unavailable) as info:
            await pair.call("echo", 1)
        assert info.value.retry_safe
        assert isinstance(info.value.__cause__, Unavailable | PeerUnreachableError)
        pair.transport.refuse = None
        # The backoff window passes, then the peer is dialled again.
        async with asyncio.timeout(5):
            while True:
                try:
                    assert await pair.call("echo", 2) == 2
                    break
                except Unavailable:
                    await asyncio.sleep(0.05)


async def test_retry_policy_reaches_a_peer_that_comes_back(server: RpcServer) -> None:
    from pilot_transport.errors import PeerUnreachableError

    options = ClientOptions(
        retry=RetryPolicy(max_attempts=10, initial_backoff=0.02, max_backoff=0.05),
        reconnect_backoff=0.01,
        reconnect_backoff_max=0.02,
    )
    async with connect_in_memory(server, client_options=options) as pair:
        pair.transport.refuse = PeerUnreachableError("connection refused")
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, setattr, pair.transport, "refuse", None)
        assert await pair.call("echo", "eventually") == "eventually"


async def test_streaming_calls_take_a_per_call_retry_policy(server: RpcServer) -> None:
    from pilot_transport.errors import PeerUnreachableError

    # The client's own policy would keep retrying for a while ...
    options = ClientOptions(
        retry=RetryPolicy(max_attempts=50, initial_backoff=0.01, max_backoff=0.02),
        reconnect_backoff=0.001,
        reconnect_backoff_max=0.002,
    )
    async with connect_in_memory(server, client_options=options) as pair:
        dials = 0
        refuse = pair.transport.connect

        async def counting(peer: str, port: int, *, timeout: float | None = None) -> Any:
            nonlocal dials
            dials += 1
            return await refuse(peer, port, timeout=timeout)

        pair.transport.connect = counting  # type: ignore[method-assign]
        pair.transport.refuse = PeerUnreachableError("connection refused")
        # ... but a caller that fails over itself opens each kind of streaming call once.
        no_retry = RetryPolicy.disabled()
        openers: list[Callable[[RpcClient], Any]] = [
            lambda c: c.stream(pair.peer, pair.port, "count", 3, retry=no_retry),
            lambda c: c.client_streaming(pair.peer, pair.port, "sum", retry=no_retry),
            lambda c: c.bidi_streaming(pair.peer, pair.port, "double", retry=no_retry),
        ]
        for opener in openers:
            async with RpcClient(pair.transport, options=options) as client:
                before = dials
                with pytest.raises(Unavailable) as info:
                    async with opener(client):
                        pass
                assert info.value.retry_safe
                assert dials - before == 1
        # With a policy of its own, opening a stream is retried until the peer answers.
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, setattr, pair.transport, "refuse", None)
        before = dials
        async with pair.client.stream(
            pair.peer,
            pair.port,
            "count",
            3,
            retry=RetryPolicy(max_attempts=100, initial_backoff=0.005, max_backoff=0.01),
        ) as items:
            assert [item async for item in items] == [0, 1, 2]
        assert dials - before > 1


async def test_unknown_peer_is_invalid_argument(server: RpcServer) -> None:
    async with connect_in_memory(server) as pair:
        with pytest.raises(InvalidArgument, match="no peer named"):
            await pair.client.call("mallory", 1, "echo", 1)


# -- method table ---------------------------------------------------------------------------------


async def test_method_table_edits(server: RpcServer) -> None:
    with pytest.raises(ValueError, match="already registered"):
        server.add_method("echo", lambda r, c: r, kind=MethodKind.UNARY)

    async def coroutine(request: Any, ctx: Any) -> Any:
        return request

    with pytest.raises(TypeError, match="async generator"):
        server.add_method("stream", coroutine, kind=MethodKind.SERVER_STREAMING)
    with pytest.raises(TypeError):
        server.add_method("x", 42, kind=MethodKind.UNARY)  # type: ignore[arg-type]

    async def shout(request: str, ctx: Any) -> str:
        return request.upper()

    async with connect_in_memory(server) as pair:
        server.replace_method("echo", shout, kind=MethodKind.UNARY)
        assert await pair.call("echo", "hi") == "HI"
        server.remove_method("echo")
        with pytest.raises(Unimplemented):
            await pair.call("echo", "hi")
    assert "count" in server.methods


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        ServerOptions(max_frame_size=10)
    with pytest.raises(ValueError, match="keepalive_interval"):
        ClientOptions(keepalive_interval=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=2)
    assert RetryPolicy.disabled().max_attempts == 1
    assert RetryPolicy(initial_backoff=0.1, max_backoff=0.3).backoff(5) == 0.3


async def test_waiting_for_a_slot_respects_the_deadline(
    make_server: MakeServer, probe: Any
) -> None:
    server = make_server(ServerOptions(max_concurrent_calls_per_connection=1))
    async with connect_in_memory(server) as pair:
        hanging = asyncio.create_task(pair.call("hang"))
        async with asyncio.timeout(5):
            await probe.started.wait()
        with pytest.raises(DeadlineExceeded, match="free connection slot"):
            await pair.call("echo", 1, timeout=0.2)
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging
        assert await pair.call("echo", 2, timeout=5) == 2


async def test_pool_spreads_busy_calls_over_connections(server: RpcServer, probe: Any) -> None:
    async with connect_in_memory(server, client_options=ClientOptions(pool_size=3)) as pair:
        calls = [asyncio.create_task(pair.call("sleep", 0.3)) for _ in range(6)]
        assert await asyncio.gather(*calls) == ["slept"] * 6
        assert pair.client.connections() == 3


async def test_pool_size_follows_the_transports_preference(server: RpcServer) -> None:
    from pilot_rpc.testing import InMemoryTransport

    transport = InMemoryTransport(server, client_name="c", server_name="server")
    # The client asks the transport (pilot_transport.Transport says 8 over pilot://),
    # it does not test the URL itself.
    transport.url = "pilot:///tmp/pilot.sock"
    assert RpcClient(transport)._pool_size == 1
    transport.preferred_pool_size = 8
    client = RpcClient(transport)
    try:
        assert client._pool_size == 8
        assert await client.call("server", 1, "echo", 1) == 1
    finally:
        await client.aclose()
        await transport.aclose()


async def test_peer_that_never_reads_cannot_grow_server_memory(server: RpcServer) -> None:
    import struct

    from pilot_rpc import _protocol as P
    from pilot_rpc._memory import memory_stream_pair
    from pilot_rpc.testing import fake_peer

    client_end, server_end = memory_stream_pair(fake_peer("flooder"), fake_peer("server"))
    conn = server._start_connection(server_end)
    hello = P.Connection(P.Role.CLIENT).data_to_send()
    ping = struct.pack(">IBBI", 8, 0x0A, 0, 0) + b"12345678"
    await client_end.write(hello)

    async def flood() -> None:
        while True:  # 18 bytes in, 18 bytes of PONG out, and never a read
            await client_end.write(ping * 1000)

    task = asyncio.create_task(flood())
    try:
        # The flood stalls: the server stopped reading once its output hit the cap.
        async with asyncio.timeout(10):
            while True:
                before = conn.core.pending_output
                await asyncio.sleep(0.1)
                if conn.core.pending_output == before and before > 0:
                    break
        assert conn.core.pending_output <= 4 * 1024 * 1024 + 256 * 1024
    finally:
        task.cancel()
        await client_end.aclose()
        await conn.aclose()
