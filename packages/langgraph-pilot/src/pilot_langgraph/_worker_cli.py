"""``pilot-langgraph-worker``: the pilot-worker command line with LangGraph's codec.

Every ``pilot-worker`` option works unchanged (``--handlers``, ``--port``,
``--plugin``, ``--metrics-port``, ``--reload``, ``--log-format``,
``--drain-timeout``, ``--transport``, ``--ready-file`` ...); handler payloads
and results cross the wire with LangGraph's typed serializer, every handler
runs under :class:`~pilot_langgraph.LangGraphMiddleware` (the caller's
RunnableConfig, forwarded callback events, the custom stream writer and
``interrupt()``), and the worker also serves ``lg.echo`` for
:class:`~pilot_langgraph.PilotEchoRunnable`.

``--graph NAME=module:attr`` (repeatable) serves whole graphs to
:class:`~pilot_langgraph.PilotRemoteGraph`, checkpointed to ``--checkpoint-db URL``
(a store in this process) or ``--checkpoint-peer NAME`` (a store worker).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pilot_langgraph._codec import LangGraphCodec
from pilot_langgraph._env import PILOT_WORKER_HANDLERS

if TYPE_CHECKING:
    from pilot_worker import PluginContext

__all__ = ["main"]

_BUILTIN_MODULE = "pilot_langgraph._builtin_handlers"


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The pilot-worker argv for a pilot-langgraph-worker argv."""
    args = list(argv)
    if any(a in ("-h", "--help", "--version") for a in args):
        return args
    has_handlers = any(a == "--handlers" or a.startswith("--handlers=") for a in args)
    # pilot-worker reads this only when no --handlers is given; we always pass
    # one, so expand it ourselves.
    if not has_handlers and (env := os.environ.get(PILOT_WORKER_HANDLERS)):
        for module in filter(None, (m.strip() for m in env.split(","))):
            args += ["--handlers", module]
    return [*args, "--handlers", _BUILTIN_MODULE]


def install(context: PluginContext) -> None:
    """Set-up hook: run every handler under :class:`LangGraphMiddleware`."""
    from pilot_langgraph._served import LangGraphMiddleware

    context.worker.add_middleware(LangGraphMiddleware(context.worker))


def _take_option(args: list[str], flag: str, *, keep: bool = False) -> list[str]:
    """Values of every ``flag VALUE`` / ``flag=VALUE`` in ``args`` (removed unless ``keep``)."""
    values: list[str] = []
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
            if keep:
                out += args[i : i + 2]
            i += 2
            continue
        if arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1 :])
            if keep:
                out.append(arg)
            i += 1
            continue
        out.append(arg)
        i += 1
    args[:] = out
    return values


def graph_options(args: list[str]) -> Any:
    """Take ``--graph``/``--checkpoint-peer`` (and read ``--checkpoint-db``) out of ``args``.

    Returns the plugin serving the graphs, or ``None`` when no ``--graph`` was given.
    ``--checkpoint-db`` stays in ``args`` when the checkpoint-sqlite plugin is loaded
    too (it serves the same store to peers).

    Raises:
        ValueError: a malformed ``--graph`` value.
    """
    from pilot_langgraph._graph_serving import GRAPH_LEASE_TTL, graph_plugin, parse_graph_option

    graphs = _take_option(args, "--graph")
    if not graphs:
        return None
    peers = _take_option(args, "--checkpoint-peer")
    store_plugin = any("checkpoint-sqlite" in a for a in args) or "checkpoint-sqlite" in (
        os.environ.get("PILOT_WORKER_PLUGINS") or ""
    )
    dbs = _take_option(args, "--checkpoint-db", keep=store_plugin)
    ttls = _take_option(args, "--graph-lease-ttl")
    lease_ttl = GRAPH_LEASE_TTL
    if ttls:
        try:
            lease_ttl = float(ttls[-1])
        except ValueError:
            lease_ttl = -1.0
        if not 0 < lease_ttl <= 3600:
            raise ValueError(f"--graph-lease-ttl expects seconds in (0, 3600], got {ttls[-1]!r}")
    return graph_plugin(
        [parse_graph_option(g) for g in graphs],
        checkpoint_db=dbs[-1] if dbs else None,
        checkpoint_peer=peers[-1] if peers else None,
        lease_ttl=lease_ttl,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pilot-langgraph-worker``; returns the exit code."""
    from pilot_worker.cli import main as worker_main

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        plugin = graph_options(args)
    except ValueError as exc:
        print(f"pilot-langgraph-worker: error: {exc}", file=sys.stderr)
        return 2
    return worker_main(
        worker_argv(args),
        plugins=[plugin] if plugin is not None else (),
        codec=LangGraphCodec(),
        prog="pilot-langgraph-worker",
        setup=install,
        description="Serve LangGraph node handlers to trusted peers (pilot-worker with "
        "LangGraph's serializer). --graph NAME=module:attr (repeatable) also serves a whole "
        "graph to PilotRemoteGraph, checkpointed to --checkpoint-db URL (a store in this "
        "process) or --checkpoint-peer NAME (a store worker), else in memory; "
        "--graph-lease-ttl SECS (default 6) bounds how long a killed worker's run keeps "
        "its thread from other runs (a resume of the same run takes it over at once).",
    )


if __name__ == "__main__":
    raise SystemExit(main())
