"""Handlers the examples' workers serve.

Run one yourself with::

    pilot-langgraph-worker --handlers examples/research_handlers.py --port 5000 \\
        --identity worker-a.key --trust worker-a.trust.json

Every handler is a plain function; LangGraph values (messages, pydantic models,
datetimes) arrive as what they were, because ``pilot-langgraph-worker`` uses
LangGraph's serializer on the wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

from langchain_core.messages import AIMessage
from pilot_worker import Context, pilot_handler

CORPUS = {
    "transport": "Every link is TLS 1.3 with both sides proving an Ed25519 identity.",
    "trust": "A worker only answers peers listed in its trust store.",
    "checkpoints": "Graph state is checkpointed on a store worker, so any process can resume.",
    "fan-out": "One input goes to many workers at once; results come back labelled.",
    "idempotency": "Retries carry LangGraph's task id, so side effects run once.",
    "streaming": "Handlers can yield chunks; graphs see them in stream_mode='custom'.",
}


def _me() -> str:
    return f"{os.environ.get('EXAMPLE_WORKER', 'local')}/pid {os.getpid()}"


@pilot_handler("search", timeout_secs=10)
async def search(state: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Find corpus entries for the query; 'deep' searches read whole entries."""
    query = str(state.get("query", "")).lower()
    depth = ctx.metadata.get("langgraph-fanout-label", "broad")
    hits = [k for k in CORPUS if any(w in k or w in CORPUS[k].lower() for w in query.split())]
    if depth == "deep":
        hits = [CORPUS[k] for k in hits]
    return {"depth": depth, "hits": hits, "worker": _me()}


@pilot_handler("square", timeout_secs=10)
async def square(task: dict[str, Any]) -> dict[str, Any]:
    """One piece of a map step: square a number (and say where it ran)."""
    n = int(task["n"])
    return {"squares": [{"n": n, "square": n * n, "worker": _me()}]}


@pilot_handler("research_topic", timeout_secs=30)
async def research_topic(task: dict[str, Any]) -> dict[str, Any]:
    """A researcher agent: collect notes on one topic."""
    topic = str(task["topic"])
    await asyncio.sleep(0.05)  # stands in for tool calls
    notes = [text for key, text in CORPUS.items() if key in topic or topic in key]
    return {
        "findings": [{"topic": topic, "notes": notes or ["nothing found"], "by": _me()}],
        "messages": [AIMessage(f"notes on {topic}: {len(notes)} item(s)", name="researcher")],
    }


@pilot_handler("write_report", timeout_secs=60)
async def write_report(state: dict[str, Any]) -> dict[str, Any]:
    """The writer agent: an LLM when OPENAI_API_KEY is set (and langchain-openai is
    installed), otherwise a deterministic summary."""
    findings = state.get("findings", [])
    lines = [f"- {f['topic']}: {' '.join(f['notes'])}" for f in findings]
    if os.environ.get("OPENAI_API_KEY"):
        try:
            from langchain_openai import ChatOpenAI  # pyright: ignore[reportMissingImports]
        except ImportError:
            pass
        else:
            llm = ChatOpenAI(model=os.environ.get("EXAMPLE_MODEL", "gpt-4o-mini"))
            reply = await llm.ainvoke(
                "Write a 5-line report from these notes:\n" + "\n".join(lines)
            )
            return {"report": str(reply.content), "messages": [reply]}
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:8]
    report = f"Report ({len(findings)} topics, digest {digest}):\n" + "\n".join(lines)
    return {"report": report, "messages": [AIMessage(report, name="writer")]}


@pilot_handler("critique", timeout_secs=30)
async def critique(state: dict[str, Any]) -> dict[str, Any]:
    """The critic agent: accept a report that covers every requested topic."""
    report = str(state.get("report", ""))
    missing = [t for t in state.get("topics", []) if t not in report]
    verdict = "accept" if not missing else f"revise: missing {', '.join(missing)}"
    return {"verdict": verdict, "messages": [AIMessage(verdict, name="critic")]}
