"""A client process that calls a worker in a loop, one JSON line per call on stdout.

    python _revocation_client.py --identity K --trust T [--peer worker] [--port 5000]

Calls ``echo`` with an increasing counter until stdin closes (or 120 s pass).
Each line is ``{"event": "ok", "n": N}`` or ``{"event": "error", "n": N,
"error": TYPE, "message": TEXT}``; the first line is ``{"event": "ready"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from pilot_rpc import RpcClient, RpcError
from pilot_transport import open_transport
from pilot_transport.errors import TransportError


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "time": time.monotonic(), **fields}), flush=True)


async def stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--identity", required=True)
    parser.add_argument("--trust", required=True)
    parser.add_argument("--peer", default="worker")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    async with open_transport("tcp://127.0.0.1:0", identity=args.identity, trust=args.trust) as t:
        client = RpcClient(t)
        emit("ready")
        stop = asyncio.ensure_future(stdin_closed())
        n = 0
        try:
            async with asyncio.timeout(120):
                while not stop.done():
                    n += 1
                    try:
                        await client.call(args.peer, args.port, "echo", n, timeout=5)
                    except (RpcError, TransportError) as exc:
                        emit("error", n=n, error=type(exc).__name__, message=str(exc))
                        await asyncio.sleep(0.05)  # pace retries after a failure
                    else:
                        emit("ok", n=n)
                        await asyncio.sleep(0.01)
        finally:
            stop.cancel()
            await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
