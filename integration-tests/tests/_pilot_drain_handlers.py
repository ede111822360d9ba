"""A handler for the drain test over real Pilot daemons: slow, with a 2 MiB reply.

It marks ``$LG_TEST_DIR/<tag>.started`` when it begins, so the test can send
SIGTERM while every call is in flight.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pilot_worker import pilot_handler

REPLY_SIZE = 2 * 1024 * 1024


def reply_for(tag: str) -> str:
    return (tag + ":") * (REPLY_SIZE // (len(tag) + 1))


@pilot_handler("big_slow", timeout_secs=60)
async def big_slow(tag: str) -> str:
    (Path(os.environ["LG_TEST_DIR"]) / f"{tag}.started").write_text(str(os.getpid()))
    await asyncio.sleep(1.5)
    return reply_for(tag)
