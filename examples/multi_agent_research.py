"""A multi-agent research flow: a supervisor, researcher agents, a writer, a critic.

    scripts/uv run python examples/multi_agent_research.py

(`scripts/uv` is uv: the machine's own, or the one the README's commands
install into `.tools/`; with uv on PATH, `uv run ...` is the same.)

Researchers run on worker-a and worker-b (in parallel, via ``Send``), the
writer on worker-c, the critic on worker-a; the supervisor is local. No LLM key
is needed: the writer uses one only when ``OPENAI_API_KEY`` is set on its
worker (and ``langchain-openai`` is installed there), otherwise it writes a
deterministic summary. Messages from every agent (``AIMessage``) cross the
wire as messages.
"""

from __future__ import annotations

import asyncio
import operator
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Send
from pilot_langgraph import PilotRemoteRunnable, aclose_default_transport

HERE = Path(__file__).resolve().parent


class State(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    topics: list[str]
    findings: Annotated[list[dict[str, Any]], operator.add]
    report: str
    verdict: str
    rounds: int


def supervisor(state: State) -> dict[str, Any]:
    question = str(state["messages"][0].content).lower()
    wanted = ["transport", "trust", "checkpoints", "fan-out", "idempotency", "streaming"]
    return {"topics": [t for t in wanted if t in question] or ["transport"], "rounds": 0}


def assign(state: State) -> list[Send]:
    return [Send("researcher", {"topic": t}) for t in state["topics"]]


def after_critic(state: State) -> str:
    return END if state["verdict"] == "accept" or state.get("rounds", 0) >= 2 else "writer"


def build() -> Any:
    graph = StateGraph(State)
    graph.add_node("supervisor", supervisor)
    graph.add_node(
        "researcher", PilotRemoteRunnable(node="research_topic", peer=["worker-a", "worker-b"])
    )
    graph.add_node("writer", PilotRemoteRunnable(node="write_report", peer="worker-c"))
    graph.add_node("critic", PilotRemoteRunnable(node="critique", peer="worker-a"))
    graph.add_edge(START, "supervisor")
    graph.add_conditional_edges("supervisor", assign, ["researcher"])
    graph.add_edge("researcher", "writer")
    graph.add_edge("writer", "critic")
    graph.add_conditional_edges("critic", after_critic, ["writer", END])
    return graph.compile()


async def run(question: str) -> dict[str, Any]:
    try:
        return await build().ainvoke({"messages": [HumanMessage(question)]})
    finally:
        await aclose_default_transport()


def main() -> int:
    from pilot_langgraph.testing import LocalCluster

    question = "How do transport, trust and checkpoints fit together?"
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(tmp) as cluster:
        for name in ("worker-a", "worker-b", "worker-c"):
            cluster.add_worker(
                name, handlers=[str(HERE / "research_handlers.py")], env={"EXAMPLE_WORKER": name}
            )
        cluster.start()
        state = asyncio.run(run(question))
    for message in state["messages"]:
        who = getattr(message, "name", None) or message.type
        print(f"{who:>10}: {str(message.content).splitlines()[0]}")
    print(f"verdict: {state['verdict']}")
    return 0 if state["verdict"] == "accept" else 1


if __name__ == "__main__":
    sys.exit(main())
