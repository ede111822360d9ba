"""One of our Pilot nodes as a process, driven over stdin/stdout (for the NAT tests).

Run: ``python _pilot_nat_node.py '<NodeConfig fields as JSON>'``. Once started it prints
``{"ready": ..., "node_id": ..., "observed": "host:port", ...}``, then answers one JSON
line per request line:

* ``{"op": "info"}``: node id, bound and observed endpoints, the node's counters;
* ``{"op": "peer", "node_id": N}``: what the node knows of peer N (``Node.peer_info``);
* ``{"op": "echo", "node_id": N, "size": S}``: a stream to N's built-in echo (port 7),
  S bytes of a seeded pattern written and read back; answers the SHA-256 of both;
* ``{"op": "registry", "msg": {...}}``: one registry call (the stand-in's counters).

Errors are answered as ``{"error": "..."}``. End of input stops the node.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
from typing import Any

from pilot_node import Address, Node, NodeConfig, open_stream


def pattern(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def _text(endpoint: tuple[str, int] | None) -> str:
    return f"{endpoint[0]}:{endpoint[1]}" if endpoint else ""


def _info(node: Node) -> dict[str, Any]:
    return {
        "node_id": node.node_id,
        "address": str(node.address),
        "endpoint": _text(node.endpoint),
        "observed": _text(node.observed_endpoint),
        "stats": dict(node.stats),
    }


async def _echo(node: Node, node_id: int, size: int) -> dict[str, Any]:
    data = pattern(size)
    stream = await open_stream(node, Address(0, node_id), 7, timeout=60)
    try:
        writer = asyncio.create_task(stream.write(data))
        try:
            got = await stream.readexactly(size)
        finally:
            await writer
    finally:
        await stream.aclose()
    return {
        "sent": hashlib.sha256(data).hexdigest(),
        "received": hashlib.sha256(got).hexdigest(),
        "size": len(got),
    }


async def _handle(node: Node, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "info":
        return _info(node)
    if op == "peer":
        info = node.peer_info(int(request["node_id"]))
        if info.get("endpoint"):
            info["endpoint"] = _text(info["endpoint"])
        return info
    if op == "echo":
        return await _echo(node, int(request["node_id"]), int(request["size"]))
    if op == "registry":
        return await node.registry.call(dict(request["msg"]))
    return {"error": f"unknown op {op!r}"}


async def main() -> None:
    config = NodeConfig(**json.loads(sys.argv[1]))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with Node(config) as node:
        print(json.dumps({"ready": True, **_info(node)}), flush=True)
        while line := await reader.readline():
            try:
                answer = await _handle(node, json.loads(line))
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
