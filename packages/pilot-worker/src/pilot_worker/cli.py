"""Reusable entry points of the ``pilot-worker`` command line.

Another distribution can build its own worker command on top of this one,
adding a codec (and always-on plugins) without copying the CLI::

    from pilot_worker.cli import main

    def my_worker_main() -> int:
        return main(codec=MyCodec(), prog="my-worker")

``build_parser(prog, plugins=...)`` returns the parser; ``run(args, ...)`` runs
a parsed command line inside an event loop. Exit codes: ``EXIT_OK`` (0),
``EXIT_CUT`` (1: the drain cut calls or serving failed), ``EXIT_CONFIG`` (2).
"""

from __future__ import annotations

from pilot_worker._cli import EXIT_CONFIG, EXIT_CUT, EXIT_OK, build_parser, main, run

__all__ = ["EXIT_CONFIG", "EXIT_CUT", "EXIT_OK", "build_parser", "main", "run"]

if __name__ == "__main__":  # python -m pilot_worker.cli
    import sys

    sys.exit(main())
