"""The 3-node graph both sides of bench_remote_graph.py serve (planner/executor/verifier).

The verifier streams a reply from a fake chat model word by word, so the
``messages`` stream mode has tokens to measure time to first token with.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict


class BenchState(TypedDict, total=False):
    task: str
    plan: list[str]
    results: Annotated[list[str], operator.add]
    answer: str


def _planner(state: BenchState) -> dict[str, Any]:
    return {"plan": [f"{state['task']}:{i}" for i in range(3)]}


def _executor(state: BenchState) -> dict[str, Any]:
    return {"results": [s.upper() for s in state["plan"]]}


async def _verifier(state: BenchState) -> dict[str, Any]:
    model = GenericFakeChatModel(messages=iter([AIMessage(content="all three steps verified ok")]))
    reply = await model.ainvoke(state["task"])
    return {"answer": str(reply.content)}


def _build() -> Any:
    g = StateGraph(BenchState)
    g.add_node("planner", _planner)
    g.add_node("executor", _executor)
    g.add_node("verifier", _verifier)
    g.add_edge(START, "planner")
    g.add_edge("planner", "executor")
    g.add_edge("executor", "verifier")
    g.add_edge("verifier", END)
    return g


builder = _build()
graph = builder.compile()
