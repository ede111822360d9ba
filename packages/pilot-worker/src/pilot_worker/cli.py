"""Reusable entry points of the ``pilot-worker`` command line.

Another distribution can build its own worker command on top of this one,
adding a codec without copying the CLI::

    from pilot_worker.cli import main

    def my_worker_main() -> int:
        return main(codec=MyCodec(), prog="my-worker")
"""

from __future__ import annotations

from pilot_worker._cli import build_parser, main

__all__ = ["build_parser", "main"]
