"""The ``pilot-worker`` command line (reusable by other worker CLIs)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pilot_worker._codec import PayloadCodec

__all__ = ["build_parser", "main"]


def build_parser(
    prog: str = "pilot-worker", description: str | None = None
) -> argparse.ArgumentParser:
    """Return the argument parser of ``pilot-worker`` (without plugin options)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    codec: PayloadCodec | None = None,
    prog: str = "pilot-worker",
    description: str | None = None,
) -> int:
    """Run the worker command line; returns the process exit code."""
    parser = build_parser(prog, description)
    parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    del codec
    print(f"{prog}: serving is not available in this build yet", file=sys.stderr)
    return 2
