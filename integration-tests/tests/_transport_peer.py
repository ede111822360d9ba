"""A pilot-transport peer process for the multi-process tests.

Every event is one JSON line on stdout; logs go to stderr.

    serve  --identity K --trust T [--url tcp://127.0.0.1:0]
        listens on port 1 (echo until EOF) and port 2 (firehose: writes until
        the reader goes away); prints {"event": "ready", "endpoint": ...}.
    call   --identity K --trust T --peer NAME [--size N] [--rounds N]
        echoes N rounds of N bytes through port 1; prints the result or the error.
    drink  --identity K --trust T --peer NAME
        reads port 2 until EOF or an error; prints what ended it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time

from pilot_transport import SecureStream, Transport, open_transport
from pilot_transport.errors import HandshakeError, TransportError

ECHO_PORT = 1
FIREHOSE_PORT = 2


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "pid": os.getpid(), **fields}), flush=True)


async def echo(stream: SecureStream) -> None:
    async with stream:
        with contextlib.suppress(TransportError):
            while data := await stream.read(65536):
                await stream.write(data)


async def firehose(stream: SecureStream) -> None:
    chunk = b"\xab" * 65536
    async with stream:
        with contextlib.suppress(TransportError):
            emit("firehose", peer=stream.peer.name)
            while True:
                await stream.write(chunk)


async def serve(args: argparse.Namespace) -> None:
    tasks: set[asyncio.Task[None]] = set()
    async with open_transport(args.url, identity=args.identity, trust=args.trust) as transport:
        echo_listener = await transport.listen(ECHO_PORT)
        firehose_listener = await transport.listen(FIREHOSE_PORT)
        info = await transport.info()
        emit("ready", endpoint=info.endpoint, node_id=info.node_id, fingerprint=info.fingerprint)

        async def loop(listener: object, handler: object) -> None:
            async for stream in listener:  # type: ignore[attr-defined]
                emit("accepted", peer=stream.peer.name, node_id=stream.peer.node_id)
                task = asyncio.create_task(handler(stream))  # type: ignore[operator]
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        await asyncio.gather(loop(echo_listener, echo), loop(firehose_listener, firehose))


async def _connect(transport: Transport, peer: str, port: int) -> SecureStream | None:
    try:
        return await transport.connect(peer, port, timeout=10)
    except HandshakeError as exc:
        emit("refused", error=type(exc).__name__, message=str(exc), fingerprint=exc.fingerprint)
    except TransportError as exc:
        emit("failed", error=type(exc).__name__, message=str(exc))
    return None


async def call(args: argparse.Namespace) -> int:
    async with open_transport(args.url, identity=args.identity, trust=args.trust) as transport:
        start = time.perf_counter()
        stream = await _connect(transport, args.peer, ECHO_PORT)
        if stream is None:
            return 1
        setup = time.perf_counter() - start
        payload = os.urandom(args.size)
        start = time.perf_counter()
        async with stream:
            for _ in range(args.rounds):
                await stream.write(payload)
                received = bytearray()
                while len(received) < len(payload):
                    data = await stream.read(65536)
                    if not data:
                        raise SystemExit("echo ended early")
                    received += data
                if received != payload:
                    raise SystemExit("echo altered the data")
        elapsed = time.perf_counter() - start
        emit(
            "echoed",
            peer=stream.peer.name,
            node_id=stream.peer.node_id,
            fingerprint=stream.peer.fingerprint,
            rounds=args.rounds,
            bytes=args.rounds * args.size * 2,
            setup_ms=round(setup * 1e3, 2),
            round_trip_ms=round(elapsed / args.rounds * 1e3, 3),
        )
        return 0


async def drink(args: argparse.Namespace) -> int:
    async with open_transport(args.url, identity=args.identity, trust=args.trust) as transport:
        stream = await _connect(transport, args.peer, FIREHOSE_PORT)
        if stream is None:
            return 1
        total = 0
        async with stream:
            try:
                while data := await stream.read(1 << 20):
                    if total == 0:
                        emit("drinking")
                    total += len(data)
            except TransportError as exc:
                emit("ended", how=type(exc).__name__, message=str(exc), bytes=total)
                return 0
        emit("ended", how="eof", bytes=total)
        return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["serve", "call", "drink"])
    parser.add_argument("--identity", required=True)
    parser.add_argument("--trust", required=True)
    parser.add_argument("--url", default="tcp://127.0.0.1:0")
    parser.add_argument("--peer", default="server")
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    if args.role == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args))
        return
    sys.exit(asyncio.run(call(args) if args.role == "call" else drink(args)))


if __name__ == "__main__":
    main()
