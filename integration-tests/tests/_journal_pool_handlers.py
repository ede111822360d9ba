"""The handler served by the journal-pool workers of ``test_langgraph_journal_pool``.

Every real run of the handler and of its "charge" step appends one JSON line
to ``$JOURNAL_POOL_EFFECTS`` (shared by the test and every worker), so the test
counts what really ran, in which process, under which idempotency key.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from pilot_worker import Context, pilot_handler


def _log(kind: str, order: str, **fields: Any) -> None:
    line = json.dumps({"kind": kind, "order": order, "pid": os.getpid(), **fields})
    with Path(os.environ["JOURNAL_POOL_EFFECTS"]).open("a", encoding="utf-8") as sink:
        sink.write(line + "\n")


@pilot_handler("pay", idempotent=True, timeout_secs=None)
async def pay(state: dict[str, Any], ctx: Context) -> dict[str, Any]:
    order = str(state["order"])
    _log("run", order, key=ctx.idempotency_key)

    def charge() -> dict[str, Any]:
        _log("charge", order)
        return {"charged": state["amount"], "by": os.getpid()}

    receipt = await ctx.step("charge", charge)
    _log("step-recorded", order)
    if state.get("stall") and receipt["by"] == os.getpid():
        # The first run of a call to be killed: wait here until the test
        # kills this process (a run that replayed the step goes on).
        await asyncio.Event().wait()
    if work := state.get("work"):
        await asyncio.sleep(work)  # the handler's own work: keeps duplicates overlapping
    return {"receipt": receipt, "served_by": os.getpid()}
