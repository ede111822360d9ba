"""``pilot-langgraph``: pair peers, look at a worker, run the demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any, cast

from pilot_langgraph._env import DEFAULT_PORT
from pilot_langgraph.errors import PilotLangGraphError, PilotUsageError

__all__ = ["main"]

_PEER_KEYS = ("name", "identity", "trust", "endpoint", "address")


def _parse_peer(text: str) -> Any:
    from pilot_langgraph._trust import PeerSpec

    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _PEER_KEYS:
            raise PilotUsageError(
                f"bad --peer {text!r}: use name=N,identity=KEYFILE,trust=TRUSTFILE"
                "[,endpoint=HOST:PORT][,address=N:XXXX.XXXX.XXXX]"
            )
        fields[key] = value.strip()
    missing = [k for k in ("name", "identity", "trust") if k not in fields]
    if missing:
        raise PilotUsageError(f"bad --peer {text!r}: missing {', '.join(missing)}")
    return PeerSpec(**fields)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pilot-langgraph",
        description="LangGraph over pilot: pair peers, inspect workers, run the demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    trust = sub.add_parser(
        "trust",
        help="make peers trust each other",
        description="Make every --peer trust every other one (idempotent). Key and trust "
        "files are created when missing.",
    )
    trust.add_argument(
        "--peer",
        action="append",
        required=True,
        metavar="name=N,identity=KEY,trust=FILE[,endpoint=H:P][,address=A]",
        help="one peer (repeat, at least twice)",
    )

    discover = sub.add_parser(
        "discover",
        help="list the handlers of a worker",
        description="Show the handlers a worker serves: kind, ACL, timeout, schemas, latency.",
    )
    discover.add_argument("peer", help="trust-store name, node id or Pilot address")
    discover.add_argument("--port", type=int, default=DEFAULT_PORT)
    discover.add_argument("--json", action="store_true", help="print JSON instead of a table")
    discover.add_argument("--timeout", type=float, default=10.0)
    discover.add_argument("--transport", help="carrier URL (default: PILOT_TRANSPORT_URL)")
    discover.add_argument("--identity", help="identity key file (default: PILOT_IDENTITY)")
    discover.add_argument("--trust", help="trust store file (default: PILOT_TRUST)")

    demo = sub.add_parser(
        "demo",
        help="run the distributed demo on loopback",
        description="Start four workers on tcp:// loopback, run a planner -> executor -> "
        "verifier graph across them with checkpoints on state-worker, then kill a run "
        "with SIGKILL and resume it from state-worker.",
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    demo.add_argument("--timeout", type=float, default=120.0, help="overall time limit (s)")
    return parser


def _cmd_trust(args: argparse.Namespace) -> int:
    from pilot_langgraph._trust import ensure_trust

    specs = [_parse_peer(p) for p in args.peer]
    ensure_trust(*specs)
    for spec in specs:
        others = ", ".join(s.name for s in specs if s is not spec)
        print(f"{spec.name}: trusts {others}")
    return 0


def _format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _latency(info: Any) -> str:
    lat = info.latency_ms

    def fmt(key: str) -> str:
        value = lat.get(key)
        return f"{value:.2f}" if isinstance(value, (int, float)) else "-"

    return f"{fmt('p50')}/{fmt('p99')}"


def _acl(info: Any) -> str:
    if info.allow is not None:
        return f"allow {len(info.allow)} node(s)"
    return str(info.raw.get("effective_policy") or "open")


async def _discover(args: argparse.Namespace) -> int:
    from pilot_langgraph._discover import (
        GRAPH_SCHEMAS_HANDLER,
        describe_graphs,
        describe_handlers,
    )
    from pilot_langgraph._runtime import aclose_default_transport, configure_default_transport

    configure_default_transport(url=args.transport, identity=args.identity, trust=args.trust)
    graphs: dict[str, dict[str, Any]] = {}
    try:
        handlers = await describe_handlers(args.peer, port=args.port, timeout_secs=args.timeout)
        if any(h.name == GRAPH_SCHEMAS_HANDLER for h in handlers):
            graphs = await describe_graphs(args.peer, port=args.port, timeout_secs=args.timeout)
    finally:
        await aclose_default_transport()
    if args.json:
        # the served graphs' schemas ride on the entry of their schemas handler
        print(
            json.dumps(
                [
                    dict(h.raw)
                    | {"rtt_ms": round(h.rtt_ms, 3)}
                    | ({"graphs": graphs} if h.name == GRAPH_SCHEMAS_HANDLER else {})
                    for h in handlers
                ],
                indent=2,
                default=str,
            )
        )
        return 0
    rows = [
        [
            "HANDLER",
            "KIND",
            "ACL",
            "TIMEOUT",
            "CALLS",
            "P50/P99 ms",
            "INPUT",
            "OUTPUT",
            "DESCRIPTION",
        ]
    ]
    for h in sorted(handlers, key=lambda h: (h.name.startswith("_"), h.name)):
        rows.append(
            [
                h.name,
                h.kind,
                _acl(h),
                "-" if h.timeout_secs is None else f"{h.timeout_secs:g}s",
                str(h.raw.get("calls", "-")),
                _latency(h),
                str((h.input_schema or {}).get("title", "-")),
                str((h.output_schema or {}).get("title", "-")),
                h.description,
            ]
        )
    rtt = handlers[0].rtt_ms if handlers else 0.0
    print(f"{args.peer} port {args.port}: {len(handlers)} handler(s), round trip {rtt:.2f} ms")
    print(_format_table(rows))
    if graphs:
        print(f"\n{len(graphs)} graph(s) served (pilot_langgraph.PilotRemoteGraph):")
        graph_rows = [["GRAPH", "INPUT", "OUTPUT", "CONTEXT"]]
        for name in sorted(graphs):
            schemas = graphs[name]
            graph_rows.append(
                [
                    name,
                    _schema_summary(schemas.get("input_schema")),
                    _schema_summary(schemas.get("output_schema")),
                    _schema_summary(schemas.get("context_schema")),
                ]
            )
        print(_format_table(graph_rows))
    return 0


def _schema_summary(schema: Any) -> str:
    """``Title{field, ...}`` of a JSON Schema (``-`` for none)."""
    if not isinstance(schema, dict):
        return "-"
    typed = cast("dict[str, Any]", schema)
    props = typed.get("properties")
    fields = ", ".join(sorted(cast("dict[str, Any]", props))) if isinstance(props, dict) else ""
    return f"{typed.get('title', 'object')}{{{fields}}}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pilot-langgraph``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        if args.command == "trust":
            return _cmd_trust(args)
        if args.command == "discover":
            return asyncio.run(_discover(args))
        if args.command == "demo":
            from pilot_langgraph._demo.run import run_demo

            return run_demo(keep=args.keep, timeout=args.timeout)
    except PilotLangGraphError as exc:
        print(f"pilot-langgraph: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # Configuration errors of the layers below (a 0644 key file, a bad
        # --transport URL, a malformed trust file): one line, no traceback.
        from pilot_rpc import RpcError
        from pilot_transport.errors import TransportError

        if not isinstance(exc, TransportError | RpcError):
            raise
        print(f"pilot-langgraph: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
