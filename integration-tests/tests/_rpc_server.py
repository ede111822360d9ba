"""An RpcServer process for the pilot-rpc integration tests.

Prints ``READY <endpoint>`` once listening. SIGTERM drains (goaway, in-flight
calls finish up to --drain-timeout) and exits 0. Its ``stats`` method reports
what the handlers saw, so tests can observe server-side effects from outside.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from pilot_rpc import CallContext, PermissionDenied, RpcServer, ServerOptions
from pilot_transport import open_transport

PORT = 5000


def build(
    stats: dict[str, int],
    *,
    options: ServerOptions | None = None,
    deny_peer: str | None = None,
) -> RpcServer:
    def authorize(method: str, peer: Any) -> None:
        if peer.name == deny_peer and method != "stats":
            raise PermissionDenied(f"{peer.name} may not call {method}")

    server = RpcServer(
        options=options or ServerOptions(max_concurrent_calls_per_connection=20_000),
        authorize=authorize if deny_peer else None,
    )
    gate = asyncio.Event()

    @server.client_streaming("slow_count")
    async def slow_count(requests: AsyncIterator[Any], ctx: CallContext) -> int:
        # Takes one item, then waits for "release" before reading the rest.
        count = 0
        async for _ in requests:
            count += 1
            stats["slow_items"] = count
            await gate.wait()
        return count

    @server.unary("release")
    async def release(request: Any, ctx: CallContext) -> None:
        gate.set()

    @server.unary("echo")
    async def echo(request: Any, ctx: CallContext) -> Any:
        return request

    @server.unary("stats")
    async def get_stats(request: Any, ctx: CallContext) -> dict[str, int]:
        return dict(stats)

    @server.unary("hang")
    async def hang(request: Any, ctx: CallContext) -> Any:
        stats["hang_started"] += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            remaining = ctx.time_remaining()
            if remaining is not None and remaining <= 0.05:
                stats["hang_deadline"] += 1
            else:
                stats["hang_cancelled"] += 1
            raise

    @server.unary("sleep")
    async def sleep(request: float, ctx: CallContext) -> str:
        stats["sleep_started"] += 1
        await asyncio.sleep(request)
        return "slept"

    @server.server_streaming("firehose")
    async def firehose(request: int, ctx: CallContext) -> AsyncIterator[bytes]:
        item = b"x" * request
        try:
            while True:
                yield item
                stats["firehose_produced"] += 1
        finally:
            stats["firehose_closed"] += 1

    return server


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--identity", required=True)
    parser.add_argument("--trust", required=True)
    parser.add_argument("--url", default="tcp://127.0.0.1:0")
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    parser.add_argument("--deny-peer", default=None, help="refuse every call of this peer")
    parser.add_argument("--max-connections-per-peer", type=int, default=64)
    parser.add_argument("--unfinished-timeout", type=float, default=30.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    stats: dict[str, int] = {
        "hang_started": 0,
        "hang_cancelled": 0,
        "hang_deadline": 0,
        "sleep_started": 0,
        "firehose_produced": 0,
        "firehose_closed": 0,
        "slow_items": 0,
    }
    options = ServerOptions(
        max_concurrent_calls_per_connection=20_000,
        max_connections_per_peer=args.max_connections_per_peer,
        unfinished_message_timeout=args.unfinished_timeout,
    )
    server = build(stats, options=options, deny_peer=args.deny_peer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with open_transport(args.url, identity=args.identity, trust=args.trust) as transport:
        listener = await transport.listen(PORT)
        print(f"READY {(await transport.info()).endpoint}", flush=True)
        serving = asyncio.create_task(server.serve(listener))
        await stop.wait()
        cut = await server.drain(timeout=args.drain_timeout)
        logging.info("drained; %d calls cut", cut)
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
