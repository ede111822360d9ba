"""Subscriber and publisher processes for the pilot-channels multi-process tests.

Status lines are JSON on stdout; logs go to stderr.

    subscribe --identity K --trust T (--pattern P --out FILE)... [--peer broker]
              [--queue N] [--policy P] [--delay SECS] [--pause SECS] [--resume]
              [--start earliest] [--daemon-socket PATH]
        subscribes (one channel per pattern), prints {"event": "ready"}, then
        appends one JSON line per event to that pattern's FILE: {"topic",
        "payload", "offset", "publisher", "dropped", "reconnects"} (flushed
        each time). --pause sleeps that long after the first event (a consumer
        that stalls); --delay after every event. With --resume, the offset of
        the last line already in the first FILE is where durable topics resume.
    publish   --identity K --trust T --topic T --count N [--first I] [--size B]
              [--concurrency C] [--daemon-socket PATH]
        publishes payloads {"i": I, "pad": "..."} (bytes b"I" over a daemon),
        prints {"event": "done", "offsets": [...], "elapsed": s}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pilot_channels import (
    ChannelError,
    PilotChannel,
    PilotPublisher,
    PublisherOptions,
    ReconnectPolicy,
    SubscribeOptions,
)
from pilot_transport import open_transport

FAST_RECONNECT = ReconnectPolicy(initial_backoff_secs=0.05, max_backoff_secs=0.5)


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "pid": os.getpid(), **fields}), flush=True)


def last_offset(path: Path) -> int | None:
    if not path.exists():
        return None
    offset = None
    for line in path.read_text().splitlines():
        try:
            value = json.loads(line).get("offset")
        except ValueError:
            continue  # a line cut short by kill -9: that event comes again
        if value is not None:
            offset = value
    return offset


def jsonable(payload: Any) -> Any:
    if isinstance(payload, bytes):
        return {"bytes": payload.decode("utf-8", "replace")}
    return payload


async def consume(channel: PilotChannel, out: Path, args: argparse.Namespace) -> None:
    pause = args.pause
    with out.open("a", encoding="utf-8") as sink:
        async for event in channel:
            record = {
                "topic": event.topic,
                "payload": jsonable(event.payload),
                "offset": event.offset,
                "publisher": event.publisher,
                "dropped": channel.dropped,
                "reconnects": channel.reconnects,
            }
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            if pause:
                await asyncio.sleep(pause)
                pause = 0.0
            if args.delay:
                await asyncio.sleep(args.delay)


async def run_channels(channels: list[PilotChannel], args: argparse.Namespace) -> None:
    try:
        for channel in channels:
            await channel.open()
        emit("ready", last_offset=channels[0].last_offset)
        await asyncio.gather(
            *(consume(c, Path(o), args) for c, o in zip(channels, args.out, strict=True))
        )
    finally:
        for channel in channels:
            await channel.aclose()


async def subscribe(args: argparse.Namespace) -> None:
    if len(args.pattern) != len(args.out):
        raise SystemExit("give one --out per --pattern")
    options = SubscribeOptions(
        queue_size=args.queue,
        policy=args.policy,
        start=args.start,
        resume_after=last_offset(Path(args.out[0])) if args.resume else None,
        buffer_batches=args.buffer,
        reconnect=FAST_RECONNECT,
    )
    try:
        if args.daemon_socket:
            channels = [
                PilotChannel.from_daemon(p, socket_path=args.daemon_socket, options=options)
                for p in args.pattern
            ]
            await run_channels(channels, args)
            return
        async with open_transport(
            "tcp://127.0.0.1:0", identity=args.identity, trust=args.trust
        ) as transport:
            channels = [
                PilotChannel(transport, p, peer=args.peer, port=args.port, options=options)
                for p in args.pattern
            ]
            await run_channels(channels, args)
    except ChannelError as exc:
        emit("error", error=type(exc).__name__, message=str(exc))
        sys.exit(3)


async def publish(args: argparse.Namespace) -> None:
    pad = "x" * args.size
    started = time.perf_counter()
    sem = asyncio.Semaphore(args.concurrency)

    async def one(publisher: PilotPublisher, i: int) -> int | None:
        async with sem:
            payload: Any = str(i).encode() if args.daemon_socket else {"i": i, "pad": pad}
            return await publisher.publish(args.topic, payload)

    try:
        if args.daemon_socket:
            publisher = PilotPublisher.from_daemon(socket_path=args.daemon_socket)
            async with publisher:
                offsets = [
                    await one(publisher, i) for i in range(args.first, args.first + args.count)
                ]
        else:
            async with open_transport(
                "tcp://127.0.0.1:0", identity=args.identity, trust=args.trust
            ) as transport:
                options = PublisherOptions(timeout_secs=60)
                async with PilotPublisher(
                    transport, peer=args.peer, port=args.port, options=options
                ) as publisher:
                    offsets = await asyncio.gather(
                        *(one(publisher, i) for i in range(args.first, args.first + args.count))
                    )
    except ChannelError as exc:
        emit("error", error=type(exc).__name__, message=str(exc))
        sys.exit(3)
    emit("done", offsets=list(offsets), elapsed=time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["subscribe", "publish"])
    parser.add_argument("--identity")
    parser.add_argument("--trust")
    parser.add_argument("--peer", default="broker")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--pattern", action="append", default=[])
    parser.add_argument("--out", action="append", default=[])
    parser.add_argument("--queue", type=int)
    parser.add_argument("--policy")
    parser.add_argument("--buffer", type=int, default=16)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--start", default="latest")
    parser.add_argument("--daemon-socket")
    parser.add_argument("--topic")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--size", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(subscribe(args) if args.role == "subscribe" else publish(args))


if __name__ == "__main__":
    main()
