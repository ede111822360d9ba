"""Handlers served by the worker processes of the langgraph integration tests.

Markers and the side-effect journal live in ``$LG_TEST_DIR`` (shared by the
test process and the workers), so the test can observe what ran where.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage
from pilot_worker import Context, pilot_handler
from pydantic import BaseModel


def _dir() -> Path:
    return Path(os.environ["LG_TEST_DIR"])


def _me() -> str:
    return os.environ.get("LG_WORKER", "?")


class Query(BaseModel):
    text: str
    limit: int = 2


@pilot_handler("search", timeout_secs=10)
async def search(state: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return {
        "query": state.get("query"),
        "label": ctx.metadata.get("langgraph-fanout-label"),
        "worker": _me(),
        "pid": os.getpid(),
    }


@pilot_handler("chat", timeout_secs=10)
async def chat(state: dict[str, Any]) -> dict[str, Any]:
    last = state["messages"][-1]
    assert isinstance(last, HumanMessage), type(last)
    return {"messages": [AIMessage(f"{_me()} heard: {last.content}")]}


@pilot_handler("whoami", timeout_secs=10)
async def whoami(_: Any) -> str:
    return _me()


@pilot_handler("square", timeout_secs=10)
async def square(task: dict[str, Any]) -> dict[str, Any]:
    return {"squares": [task["n"] * task["n"]], "workers": [_me()]}


@pilot_handler("tokens", timeout_secs=10)
async def tokens(text: str) -> Any:
    for word in text.split():
        yield word + " "


@pilot_handler("slow", timeout_secs=60)
async def slow(tag: str) -> str:
    (_dir() / f"{tag}.started").write_text(str(os.getpid()))
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        (_dir() / f"{tag}.cancelled").write_text(str(os.getpid()))
        raise
    return "never"


@pilot_handler("boom", timeout_secs=10)
async def boom(_: Any) -> Any:
    raise LookupError("no such record")


@pilot_handler("validated", input_model=Query, timeout_secs=10)
async def validated(q: Query) -> dict[str, Any]:
    return {"text": q.text, "limit": q.limit}


@pilot_handler("nobody_may_call", allow=["not-a-real-node-id"], timeout_secs=10)
async def nobody_may_call(_: Any) -> str:
    return "unreachable"


@pilot_handler("too_slow", timeout_secs=0.2)
async def too_slow(_: Any) -> str:
    await asyncio.sleep(5)  # longer than the handler's own timeout
    return "late"


@pilot_handler("single_file", max_concurrent=1, overflow="reject", timeout_secs=30)
async def single_file(tag: str) -> str:
    (_dir() / f"{tag}.busy").write_text("")
    await asyncio.sleep(1.0)  # holds the only slot for a while
    return tag


@pilot_handler("charge", timeout_secs=30)
async def charge(order: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """A side effect guarded by the caller's idempotency key (a shared journal).

    With ``LG_CRASH_AFTER_EFFECT=1`` the worker dies right after the effect,
    before it can answer: the caller must fail over, and the side effect must
    not run twice.
    """
    key = ctx.idempotency_key or ""
    marker = _dir() / ("done-" + hashlib.sha256(key.encode()).hexdigest())
    if marker.exists():
        return {"order": order["id"], "charged_by": marker.read_text(), "replayed": True}
    with (_dir() / "effects.log").open("a") as log:
        log.write(f"{order['id']} {key} {_me()}\n")
    marker.write_text(_me())
    if os.environ.get("LG_CRASH_AFTER_EFFECT") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"order": order["id"], "charged_by": _me(), "replayed": False}
