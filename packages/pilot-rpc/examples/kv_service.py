"""A plain key-value service on pilot-rpc: unary methods, typed errors, a watch stream.

Run the whole demo (a server and a client, each with its own identity, over
tcp:// on loopback with mutual TLS), from a checkout of the repository
(`scripts/uv` is uv, installed into `.tools/` when the machine has none)::

    scripts/uv run python packages/pilot-rpc/examples/kv_service.py

Or serve it for other peers, with your own key and trust files::

    scripts/uv run python packages/pilot-rpc/examples/kv_service.py serve \\
        --identity server.key --trust trust.json --url tcp://127.0.0.1:7001
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import AsyncIterator
from typing import Any

from pilot_rpc import (
    AlreadyExists,
    CallContext,
    InvalidArgument,
    NotFound,
    RpcClient,
    RpcServer,
)
from pilot_transport import open_transport
from pilot_transport.testing import create_test_peers

PORT = 7100


class KeyValueStore:
    """The service: a dict, plus watchers that get every change."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.watchers: set[asyncio.Queue[dict[str, Any]]] = set()

    def build_server(self) -> RpcServer:
        server = RpcServer()

        @server.unary("kv.get")
        async def get(key: str, ctx: CallContext) -> Any:
            if key not in self.data:
                raise NotFound(f"no key {key!r}", details={"key": key})
            return self.data[key]

        @server.unary("kv.put")
        async def put(request: dict[str, Any], ctx: CallContext) -> int:
            key, value = request.get("key"), request.get("value")
            if not isinstance(key, str) or not key:
                raise InvalidArgument("key must be a non-empty string")
            if request.get("create_only") and key in self.data:
                raise AlreadyExists(f"key {key!r} exists", details={"key": key})
            self.data[key] = value
            self._publish({"op": "put", "key": key, "value": value, "by": ctx.peer.name})
            return len(self.data)

        @server.unary("kv.delete")
        async def delete(key: str, ctx: CallContext) -> bool:
            existed = self.data.pop(key, None) is not None
            if existed:
                self._publish({"op": "delete", "key": key, "by": ctx.peer.name})
            return existed

        @server.server_streaming("kv.watch")
        async def watch(prefix: str, ctx: CallContext) -> AsyncIterator[dict[str, Any]]:
            queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
            self.watchers.add(queue)
            try:
                yield {"op": "watching", "key": prefix}  # tells the caller it is subscribed
                while True:
                    change = await queue.get()
                    if change["key"].startswith(prefix):
                        yield change
            finally:
                self.watchers.discard(queue)

        return server

    def _publish(self, change: dict[str, Any]) -> None:
        for queue in self.watchers:
            if not queue.full():  # a watcher that falls 1000 changes behind misses some
                queue.put_nowait(change)


async def demo() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        peers = create_test_peers(tmp, ["kv-server", "app"])
        server_peer, app_peer = peers["kv-server"], peers["app"]
        async with open_transport(
            "tcp://127.0.0.1:0", identity=server_peer.identity, trust=server_peer.trust
        ) as server_transport:
            listener = await server_transport.listen(PORT)
            info = await server_transport.info()
            assert info.endpoint is not None
            peers.set_endpoint("kv-server", info.endpoint)
            server = KeyValueStore().build_server()
            async with (
                server.serve_in_background(listener),
                open_transport(
                    "tcp://127.0.0.1:0", identity=app_peer.identity, trust=app_peer.trust
                ) as app_transport,
                RpcClient(app_transport) as client,
            ):
                await run_client(client)


async def run_client(client: RpcClient) -> None:
    changes: list[dict[str, Any]] = []
    subscribed = asyncio.Event()

    async def watch() -> None:
        async with client.stream("kv-server", PORT, "kv.watch", "user:") as stream:
            async for change in stream:
                if change["op"] == "watching":
                    subscribed.set()
                    continue
                changes.append(change)
                if len(changes) == 3:
                    return

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(subscribed.wait(), 10)
    for key, value in (("user:1", "ada"), ("user:2", "bob")):
        size = await client.call("kv-server", PORT, "kv.put", {"key": key, "value": value})
        print("put  ->", size)
    print("get  ->", await client.call("kv-server", PORT, "kv.get", "user:1", timeout=5))
    try:
        await client.call("kv-server", PORT, "kv.get", "user:9", timeout=5)
    except NotFound as exc:
        print("get  -> NotFound:", exc.message, exc.details)
    try:
        await client.call(
            "kv-server", PORT, "kv.put", {"key": "user:1", "value": "x", "create_only": True}
        )
    except AlreadyExists as exc:
        print("put  -> AlreadyExists:", exc.message)
    print("del  ->", await client.call("kv-server", PORT, "kv.delete", "user:2"))
    await asyncio.wait_for(watcher, 10)
    for change in changes:
        print("watch:", change)


async def serve(identity: str, trust: str, url: str) -> None:
    async with open_transport(url, identity=identity, trust=trust) as transport:
        listener = await transport.listen(PORT)
        print(f"serving kv on {(await transport.info()).endpoint or url} port {PORT}")
        await KeyValueStore().build_server().serve(listener)


def main() -> None:
    parser = argparse.ArgumentParser(description="A key-value service on pilot-rpc.")
    sub = parser.add_subparsers(dest="command")
    serve_parser = sub.add_parser("serve", help="serve the store")
    serve_parser.add_argument("--identity", required=True)
    serve_parser.add_argument("--trust", required=True)
    serve_parser.add_argument("--url", default="tcp://127.0.0.1:7001")
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args.identity, args.trust, args.url))
    else:
        asyncio.run(demo())


if __name__ == "__main__":
    main()
