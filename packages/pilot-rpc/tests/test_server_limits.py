"""RpcServer's peer-facing limits through the asyncio driver (in memory).

The authorize hook, ErrorInfo end to end, the per-peer connection cap, accept
back-off when file descriptors run out, and the idle deadline of unfinished
messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import struct
from typing import Any

import msgpack
import pytest
from pilot_rpc import (
    CallContext,
    ClientOptions,
    ErrorInfo,
    Internal,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    RpcClient,
    RpcServer,
    ServerOptions,
    Unimplemented,
)
from pilot_rpc import _frames as F
from pilot_rpc import _protocol as P
from pilot_rpc._memory import MemoryStream, memory_stream_pair
from pilot_rpc.testing import connect_in_memory, fake_peer
from pilot_transport.errors import StreamResetError

TIMEOUT = 10.0


def build(options: ServerOptions | None = None, **kw: Any) -> tuple[RpcServer, list[str]]:
    ran: list[str] = []
    server = RpcServer(options=options, **kw)

    @server.unary("echo")
    async def echo(request: Any, ctx: CallContext) -> Any:
        ran.append(ctx.peer.name)
        return request

    @server.unary("lookup")
    async def lookup(request: Any, ctx: CallContext) -> Any:
        raise NotFound("no such key", info=ErrorInfo("KEY_MISSING", "kv", {"key": str(request)}))

    @server.unary("crash")
    async def crash(request: Any, ctx: CallContext) -> Any:
        raise KeyError(request)

    return server, ran


# -- authorize hook -------------------------------------------------------------------------------


async def test_authorize_refuses_before_the_handler_runs() -> None:
    seen: list[tuple[str, str]] = []

    def authorize(method: str, peer: Any) -> None:
        seen.append((method, peer.name))
        if peer.name == "mallory":
            raise PermissionDenied(
                f"{peer.name} may not call {method}",
                info=ErrorInfo("ACL_DENIED", "test", {"method": method}),
            )

    server, ran = build(authorize=authorize)
    async with connect_in_memory(server, client_name="mallory") as pair:
        with pytest.raises(PermissionDenied) as caught:
            await pair.call("echo", b"x" * 2_000_000, timeout=TIMEOUT)  # sent in pieces
        assert caught.value.info == ErrorInfo("ACL_DENIED", "test", {"method": "echo"})
        # The connection survives a refusal.
        with pytest.raises(PermissionDenied):
            await pair.call("echo", 1, timeout=TIMEOUT)
    async with connect_in_memory(server, client_name="alice") as pair:
        assert await pair.call("echo", 2, timeout=TIMEOUT) == 2
    assert ran == ["alice"]
    assert seen == [("echo", "mallory"), ("echo", "mallory"), ("echo", "alice")]


async def test_unknown_methods_are_refused_before_authorize_is_asked() -> None:
    asked: list[str] = []
    server, _ = build(authorize=lambda method, peer: asked.append(method))
    async with connect_in_memory(server) as pair:
        with pytest.raises(Unimplemented) as caught:
            await pair.call("nope", 1, timeout=TIMEOUT)
    assert caught.value.info.reason == "METHOD_NOT_FOUND"
    assert asked == []


async def test_a_failing_authorize_hook_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    def authorize(method: str, peer: Any) -> None:
        raise RuntimeError("acl store unreadable")

    server, ran = build(authorize=authorize)
    async with connect_in_memory(server) as pair:
        with pytest.raises(Internal) as caught:
            await pair.call("echo", 1, timeout=TIMEOUT)
    assert caught.value.info.reason == "AUTHORIZE_FAILED"
    assert ran == []
    assert "authorize hook failed" in caplog.text


async def test_authorize_may_be_replaced_while_serving() -> None:
    server, _ = build()
    async with connect_in_memory(server) as pair:
        assert await pair.call("echo", 1, timeout=TIMEOUT) == 1

        def deny(method: str, peer: Any) -> None:
            raise PermissionDenied("revoked")

        server.authorize = deny
        with pytest.raises(PermissionDenied):
            await pair.call("echo", 1, timeout=TIMEOUT)


# -- ErrorInfo end to end -------------------------------------------------------------------------


async def test_error_info_reaches_the_caller() -> None:
    server, _ = build()
    async with connect_in_memory(server) as pair:
        with pytest.raises(NotFound) as caught:
            await pair.call("lookup", 7, timeout=TIMEOUT)
        assert caught.value.info == ErrorInfo("KEY_MISSING", "kv", {"key": "7"})
        with pytest.raises(Internal) as crashed:
            await pair.call("crash", 1, timeout=TIMEOUT)
        assert crashed.value.info == ErrorInfo(
            "HANDLER_EXCEPTION", "pilot-rpc", {"exception_type": "KeyError"}
        )
        # details stay readable for code that has not moved to info yet.
        assert crashed.value.details["exception_type"] == "KeyError"


# -- connection caps and accept back-off ----------------------------------------------------------


class QueueListener:
    """A ListenerLike fed by the test: streams or exceptions, in order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[MemoryStream | BaseException] = asyncio.Queue()

    async def accept(self) -> MemoryStream:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class ListenerTransport:
    """Connects by handing the server end to a QueueListener."""

    url = "memory-rpc://"

    def __init__(self, listener: QueueListener, name: str) -> None:
        self.listener = listener
        self.name = name

    async def connect(self, peer: str, port: int, *, timeout: float | None = None) -> MemoryStream:
        client_end, server_end = memory_stream_pair(fake_peer(self.name), fake_peer(peer))
        self.listener.queue.put_nowait(server_end)
        return client_end


async def read_until_eof(stream: MemoryStream) -> bytes:
    data = b""
    try:
        while more := await stream.read(65536):
            data += more
    except StreamResetError:
        return data  # a reset counts as closed too
    return data


async def test_one_peer_cannot_take_every_connection_slot(caplog: pytest.LogCaptureFixture) -> None:
    server, ran = build(ServerOptions(max_connections_per_peer=3))
    listener = QueueListener()
    greedy: list[MemoryStream] = []
    async with server.serve_in_background(listener):
        for _ in range(10):
            client_end, server_end = memory_stream_pair(fake_peer("greedy"), fake_peer("server"))
            greedy.append(client_end)
            listener.queue.put_nowait(server_end)
        async with asyncio.timeout(TIMEOUT):
            # The 7 over the cap are closed without a HELLO; the first 3 get one.
            refused = [await read_until_eof(s) for s in greedy[3:]]
        assert refused == [b""] * 7
        client = RpcClient(
            ListenerTransport(listener, "alice"),
            options=ClientOptions(retry=RetryPolicy.disabled()),
        )
        async with client:
            assert await client.call("server", 1, "echo", "hi", timeout=TIMEOUT) == "hi"
        # A greedy connection that ends frees its slot.
        await greedy[0].aclose()
        async with asyncio.timeout(TIMEOUT):
            while True:
                client_end, server_end = memory_stream_pair(
                    fake_peer("greedy"), fake_peer("server")
                )
                listener.queue.put_nowait(server_end)
                first = await client_end.read(10)
                if first:
                    break
                await client_end.aclose()
        await client_end.aclose()
        for stream in greedy:
            await stream.aclose()
    assert ran == ["alice"]
    warnings = [r for r in caplog.records if "max_connections_per_peer" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: one line for the burst


async def test_accept_backs_off_on_fd_exhaustion_with_few_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pilot_rpc.server")
    server, _ = build()
    listener = QueueListener()
    for _ in range(6):
        listener.queue.put_nowait(OSError(errno.EMFILE, "Too many open files"))
    async with server.serve_in_background(listener):
        client = RpcClient(
            ListenerTransport(listener, "alice"),
            options=ClientOptions(retry=RetryPolicy.disabled()),
        )
        async with client:
            assert await client.call("server", 1, "echo", 5, timeout=TIMEOUT) == 5
    lines = [r for r in caplog.records if "EMFILE" in r.getMessage()]
    assert len(lines) == 1
    assert not any(r.exc_info for r in caplog.records)


async def test_other_accept_errors_still_stop_serving(caplog: pytest.LogCaptureFixture) -> None:
    server, _ = build()
    listener = QueueListener()
    listener.queue.put_nowait(OSError(errno.EBADF, "bad fd"))
    async with asyncio.timeout(TIMEOUT):
        await server.serve(listener)
    assert "no longer serving" in caplog.text


# -- unfinished messages through the driver -------------------------------------------------------


async def test_an_unfinished_call_times_out_and_frees_its_pieces() -> None:
    options = ServerOptions(unfinished_message_timeout=0.05)
    server, ran = build(options)
    listener = QueueListener()
    async with server.serve_in_background(listener):
        client_end, server_end = memory_stream_pair(fake_peer("slow"), fake_peer("server"))
        listener.queue.put_nowait(server_end)
        core = P.Connection(P.Role.CLIENT)
        await client_end.write(core.data_to_send())
        header = msgpack.packb(["echo", 1, None, None])
        body = struct.pack(">H", len(header)) + header + b"\xc6\x00\x10\x00\x00" + b"a" * 1000
        await client_end.write(
            struct.pack(">IBBI", len(body), F.CALL, F.FLAG_END_STREAM | F.FLAG_MORE, 1) + body
        )
        buffer = b""
        error: list[Any] | None = None
        async with asyncio.timeout(TIMEOUT):
            while error is None:
                buffer += await client_end.read(65536)
                pos = 0
                while len(buffer) - pos >= 10:
                    length, kind, _, call_id = struct.unpack_from(">IBBI", buffer, pos)
                    if len(buffer) - pos - 10 < length:
                        break
                    if kind == F.ERROR and call_id == 1:
                        error = msgpack.unpackb(buffer[pos + 10 : pos + 10 + length])
                    pos += 10 + length
        assert error[0] == 4  # DEADLINE_EXCEEDED
        assert error[3][0] == "UNFINISHED_MESSAGE_IDLE"
        assert server._budget.used == 0  # pyright: ignore[reportPrivateUsage]
        await client_end.aclose()
    assert ran == []


# -- cancellation is never swallowed --------------------------------------------------------------


async def test_closing_a_connection_does_not_swallow_the_callers_cancellation() -> None:
    from pilot_rpc._driver import ClientConnection
    from pilot_rpc._types import MethodKind

    client_end, server_end = memory_stream_pair(
        fake_peer("client"), fake_peer("server"), max_buffer=64 * 1024
    )
    await server_end.write(P.Connection(P.Role.SERVER).data_to_send())  # hello, then silence
    conn = ClientConnection(
        client_end, P.Connection(P.Role.CLIENT), keepalive_interval=None,
        keepalive_timeout=5.0, max_calls=8,
    )  # fmt: skip
    conn.start()
    await conn.hello
    # A request larger than the pipe: the writer blocks, so closing waits to flush it.
    conn.start_call("m", MethodKind.UNARY, b"x" * (1 << 20), None, None)
    closing = asyncio.create_task(conn.aclose(flush_timeout=60))
    while not conn._closing:  # pyright: ignore[reportPrivateUsage]
        await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert closing.cancelled()
    await conn.aclose(flush_timeout=0.01)
    await server_end.aclose()


# -- the deadline is answered whatever the handler does -------------------------------------------


async def _read_frames(stream: MemoryStream, core: P.Connection, until: Any) -> list[P.Event]:
    """Feed what ``stream`` delivers to ``core`` until ``until(events)`` holds."""
    events: list[P.Event] = []
    async with asyncio.timeout(TIMEOUT):
        while not until(events):
            data = await stream.read(65536)
            assert data, "the server closed the connection"
            events.extend(core.receive_data(data))
    return events


@pytest.mark.parametrize("kind", ["unary", "server_streaming"])
async def test_a_deadline_is_answered_while_a_stubborn_handler_keeps_running(kind: str) -> None:
    from pilot_rpc._types import MethodKind
    from pilot_rpc.errors import StatusCode

    server = RpcServer()
    release = asyncio.Event()
    caught: list[str] = []
    ended: list[str] = []

    async def stubborn() -> None:
        # Catches every cancellation and carries on until the test releases it.
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                caught.append("cancelled")

    @server.unary("stubborn")
    async def stubborn_unary(request: Any, ctx: CallContext) -> Any:
        await stubborn()
        ended.append("unary")
        return "late result"

    @server.server_streaming("stubborn_stream")
    async def stubborn_stream(request: Any, ctx: CallContext) -> Any:
        await stubborn()
        ended.append("stream")
        yield "late item"

    try:
        listener = QueueListener()
        async with server.serve_in_background(listener):
            client_end, server_end = memory_stream_pair(fake_peer("caller"), fake_peer("server"))
            listener.queue.put_nowait(server_end)
            core = P.Connection(P.Role.CLIENT)
            await client_end.write(core.data_to_send())
            await _read_frames(
                client_end, core, lambda evs: any(isinstance(e, P.HelloReceived) for e in evs)
            )
            if kind == "unary":
                call_id = core.start_call("stubborn", MethodKind.UNARY, None, timeout=0.05)
            else:
                call_id = core.start_call(
                    "stubborn_stream", MethodKind.SERVER_STREAMING, None, timeout=0.05
                )
            await client_end.write(core.data_to_send())

            def answered(events: list[P.Event]) -> bool:
                return any(getattr(e, "call_id", None) == call_id for e in events)

            events = await _read_frames(client_end, core, answered)
            (status,) = [e for e in events if getattr(e, "call_id", None) == call_id]
            assert isinstance(status, P.ErrorReceived)
            assert status.code == StatusCode.DEADLINE_EXCEEDED
            # Answered while the handler still runs, having swallowed its cancellation.
            assert caught == ["cancelled"]
            assert ended == []
            release.set()
            async with asyncio.timeout(TIMEOUT):
                while not ended:
                    await asyncio.sleep(0)
            assert ended == ["unary" if kind == "unary" else "stream"]
            # The late result is discarded: a ping's round trip brings nothing more for the
            # call, and the connection still serves.
            core.ping(b"late-res")
            await client_end.write(core.data_to_send())
            events = await _read_frames(
                client_end, core, lambda evs: any(isinstance(e, P.PongReceived) for e in evs)
            )
            assert not [e for e in events if getattr(e, "call_id", None) == call_id]
            await client_end.aclose()
    finally:
        release.set()  # a failed test must not leave the handler running forever


# -- a connection the remote side forgot ----------------------------------------------------------


@pytest.mark.parametrize("answered_meanwhile", [False, True])
async def test_a_call_given_up_on_a_silent_connection_retires_it(answered_meanwhile: bool) -> None:
    """A call that times out with nothing received since it was sent retires its pooled
    connection (new calls dial afresh); a frame received meanwhile keeps it."""
    from pilot_rpc._driver import ClientConnection
    from pilot_rpc._types import MethodKind

    client_end, server_end = memory_stream_pair(fake_peer("client"), fake_peer("server"))
    server_core = P.Connection(P.Role.SERVER)
    await server_end.write(server_core.data_to_send())  # hello, then silence
    conn = ClientConnection(
        client_end, P.Connection(P.Role.CLIENT), keepalive_interval=None,
        keepalive_timeout=5.0, max_calls=8,
    )  # fmt: skip
    conn.start()
    await conn.hello
    call = conn.start_call("m", MethodKind.UNARY, b"x", None, None)
    if answered_meanwhile:
        # The server is alive: a pong arrives after the call was sent.
        async with asyncio.timeout(TIMEOUT):
            while not any(
                isinstance(e, P.CallReceived)
                for e in server_core.receive_data(await server_end.read(65536))
            ):
                pass
        conn.core.ping(b"probe123")
        conn.kick()
        async with asyncio.timeout(TIMEOUT):
            while True:  # until the server core answers the ping with its pong
                server_core.receive_data(await server_end.read(65536))
                pong = server_core.data_to_send()
                if pong:
                    await server_end.write(pong)
                    break
        async with asyncio.timeout(TIMEOUT):
            while conn._last_recv < call.sent_at:  # pyright: ignore[reportPrivateUsage]
                await asyncio.sleep(0)
    conn.cancel(call)  # the caller gave up (its own deadline)
    assert conn.going_away is (not answered_meanwhile)
    assert conn.usable is answered_meanwhile
    await conn.aclose(flush_timeout=0.1)
    await server_end.aclose()


async def test_a_shortened_deadline_is_answered_with_the_servers_error() -> None:
    """``CallContext.shorten_deadline``: the earlier deadline fires like the caller's would,
    answering with the given error while a handler that swallows cancellation runs on."""
    from pilot_rpc._types import MethodKind
    from pilot_rpc.errors import StatusCode

    server = RpcServer()
    release = asyncio.Event()
    ended: list[str] = []
    moved: list[bool] = []

    @server.unary("stubborn")
    async def stubborn(request: Any, ctx: CallContext) -> Any:
        loop = asyncio.get_running_loop()
        assert ctx.deadline is not None
        moved.append(ctx.shorten_deadline(ctx.deadline + 5))  # later: ignored
        moved.append(
            ctx.shorten_deadline(
                loop.time() + 0.05, lambda: ResourceExhausted("budget", details={"why": "own"})
            )
        )
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()
        ended.append("unary")
        return "late result"

    try:
        listener = QueueListener()
        async with server.serve_in_background(listener):
            client_end, server_end = memory_stream_pair(fake_peer("caller"), fake_peer("server"))
            listener.queue.put_nowait(server_end)
            core = P.Connection(P.Role.CLIENT)
            await client_end.write(core.data_to_send())
            await _read_frames(
                client_end, core, lambda evs: any(isinstance(e, P.HelloReceived) for e in evs)
            )
            call_id = core.start_call("stubborn", MethodKind.UNARY, None, timeout=60)
            await client_end.write(core.data_to_send())

            def answered(events: list[P.Event]) -> bool:
                return any(getattr(e, "call_id", None) == call_id for e in events)

            events = await _read_frames(client_end, core, answered)
            (status,) = [e for e in events if getattr(e, "call_id", None) == call_id]
            assert isinstance(status, P.ErrorReceived)
            assert status.code == StatusCode.RESOURCE_EXHAUSTED
            assert status.details == {"why": "own"}
            assert moved == [False, True]
            assert ended == []  # answered while the handler still runs
            release.set()
            async with asyncio.timeout(TIMEOUT):
                while not ended:
                    await asyncio.sleep(0)
            await client_end.aclose()
    finally:
        release.set()
