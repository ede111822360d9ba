"""``pilot-node``: join a Pilot network from the command line.

Commands::

    pilot-node run     [--hostname NAME] [--private] [--auto-approve]
    pilot-node ping    TARGET [--count N]
    pilot-node lookup  TARGET
    pilot-node trust   TARGET [--justification TEXT] [--wait SECONDS]

TARGET is a Pilot address (``0:0000.0000.002A``), a hostname or a node id. Every command
joins the network with the identity file (``--identity``, default
``~/.pilot-node/identity.json``, created with mode 0600), the registry (``--registry`` or
``PILOT_NODE_REGISTRY``) and the beacon (``--beacon`` or ``PILOT_NODE_BEACON``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ._node import Node, NodeConfig
from .errors import PilotNodeError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pilot-node", description="A Pilot network node.")
    parser.add_argument(
        "--registry",
        default=os.environ.get("PILOT_NODE_REGISTRY", ""),
        help="registry host:port (env PILOT_NODE_REGISTRY)",
    )
    parser.add_argument(
        "--beacon",
        default=os.environ.get("PILOT_NODE_BEACON", ""),
        help="beacon host:port (env PILOT_NODE_BEACON); empty: no discovery or relay",
    )
    parser.add_argument(
        "--identity",
        default=str(Path.home() / ".pilot-node" / "identity.json"),
        help="identity file (created with mode 0600 when missing)",
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="local UDP host:port")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join the network and stay until interrupted")
    run.add_argument("--hostname", default="")
    run.add_argument("--private", action="store_true", help="resolvable by trusted nodes only")
    run.add_argument("--auto-approve", action="store_true", help="approve every trust request")
    ping = sub.add_parser("ping", help="round-trip time to a node's echo port")
    ping.add_argument("target")
    ping.add_argument("--count", type=int, default=3)
    lookup = sub.add_parser("lookup", help="a node's registry entry")
    lookup.add_argument("target")
    trust = sub.add_parser("trust", help="ask a node to trust us (relayed by the registry)")
    trust.add_argument("target")
    trust.add_argument("--justification", default="")
    trust.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the answer")
    return parser


def _config(args: argparse.Namespace, **extra: object) -> NodeConfig:
    config = NodeConfig(
        registry=str(args.registry),
        beacon=str(args.beacon),
        identity_path=str(args.identity),
        listen=str(args.listen),
    )
    for key, value in extra.items():
        setattr(config, key, value)
    return config


async def _run(args: argparse.Namespace) -> int:
    config = _config(
        args,
        hostname=str(args.hostname),
        public=not args.private,
        auto_approve=bool(args.auto_approve),
    )
    async with Node(config) as node:
        print(
            json.dumps(
                {
                    "address": str(node.address),
                    "node_id": node.node_id,
                    "fingerprint": node.fingerprint,
                    "endpoint": f"{node.endpoint[0]}:{node.endpoint[1]}",
                    "hostname": config.hostname,
                }
            ),
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    return 0


async def _ping(args: argparse.Namespace) -> int:
    async with Node(_config(args)) as node:
        failures = 0
        for seq in range(max(1, int(args.count))):
            try:
                rtt = await node.ping(str(args.target))
            except PilotNodeError as exc:
                failures += 1
                print(json.dumps({"seq": seq, "error": str(exc)}), flush=True)
            else:
                print(json.dumps({"seq": seq, "rtt_ms": round(rtt * 1000, 3)}), flush=True)
        return 1 if failures else 0


async def _lookup(args: argparse.Namespace) -> int:
    async with Node(_config(args)) as node:
        entry = await node.lookup(str(args.target))
        print(
            json.dumps(
                {
                    "node_id": entry.node_id,
                    "address": entry.address,
                    "hostname": entry.hostname,
                    "public": entry.public,
                    "endpoint": f"{entry.endpoint[0]}:{entry.endpoint[1]}"
                    if entry.endpoint
                    else "",
                    "version": entry.version,
                }
            )
        )
    return 0


async def _trust(args: argparse.Namespace) -> int:
    async with Node(_config(args)) as node:
        wait = float(args.wait)
        approved = await node.trust(
            str(args.target), str(args.justification), timeout=wait if wait > 0 else None
        )
        state = "approved" if approved else ("not answered" if wait > 0 else "requested")
        print(json.dumps({"target": str(args.target), "state": state}))
        return 0 if approved or wait <= 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pilot-node`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if not args.registry:
        print("pilot-node: --registry (or PILOT_NODE_REGISTRY) is required", file=sys.stderr)
        return 2
    commands = {"run": _run, "ping": _ping, "lookup": _lookup, "trust": _trust}
    try:
        return asyncio.run(commands[str(args.command)](args))
    except PilotNodeError as exc:
        print(f"pilot-node: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
