"""``pilot-langgraph-worker``: the pilot-worker command line with LangGraph's codec.

Every ``pilot-worker`` option works unchanged (``--handlers``, ``--port``,
``--plugin``, ``--metrics-port``, ``--reload``, ``--log-format``,
``--drain-timeout``, ``--transport``, ``--ready-file`` ...); handler payloads
and results cross the wire with LangGraph's typed serializer, every handler
runs under :class:`~pilot_langgraph.LangGraphMiddleware` (the caller's
RunnableConfig, forwarded callback events, the custom stream writer and
``interrupt()``), and the worker also serves ``lg.echo`` for
:class:`~pilot_langgraph.PilotEchoRunnable`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pilot-langgraph-worker``; returns the exit code."""
    from pilot_worker.cli import main as worker_main

    args = sys.argv[1:] if argv is None else list(argv)
    return worker_main(
        worker_argv(args),
        codec=LangGraphCodec(),
        prog="pilot-langgraph-worker",
        setup=install,
        description="Serve LangGraph node handlers to trusted peers (pilot-worker with "
        "LangGraph's serializer).",
    )


if __name__ == "__main__":
    raise SystemExit(main())
