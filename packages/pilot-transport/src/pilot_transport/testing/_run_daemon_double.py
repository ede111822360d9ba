"""Serve linked Pilot daemon doubles from their own process (tests and benchmarks).

``python -m pilot_transport.testing._run_daemon_double --socket A.sock --socket B.sock``
prints ``ready`` and the doubles' addresses once listening, then runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from pilot_transport.testing._daemon_double import PilotDaemonDouble, PilotNetworkDouble


async def _serve_forever(paths: list[str]) -> None:
    network = PilotNetworkDouble()
    doubles = [PilotDaemonDouble(path, network=network) for path in paths]
    for double in doubles:
        await double.start()
    print("ready", *(str(d.address) for d in doubles), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for double in doubles:
            await double.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve linked daemon doubles until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--socket", action="append", required=True, help="Unix socket path")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(list(args.socket)))


if __name__ == "__main__":
    main()
