"""Metadata headers sent with every remote node call (handlers read ``ctx.metadata``)."""

from __future__ import annotations

from typing import Final

__all__ = [
    "CONFIG_HEADER",
    "FANOUT_LABEL_HEADER",
    "NODE_HEADER",
    "TASK_ID_HEADER",
    "THREAD_ID_HEADER",
]

TASK_ID_HEADER: Final = "langgraph-task-id"
"""LangGraph's stable id of the task (same across retries and resumes)."""
NODE_HEADER: Final = "langgraph-node"
"""Name of the graph node the call is made for."""
THREAD_ID_HEADER: Final = "langgraph-thread-id"
"""The run's ``thread_id`` when the graph has one."""
FANOUT_LABEL_HEADER: Final = "langgraph-fanout-label"
"""The label of the target when the call is part of a PilotFanoutRunnable."""
CONFIG_HEADER: Final = "langgraph-config"
"""The caller's serializable RunnableConfig and what the call forwards (callback
events, custom stream, interrupt state): LangGraph's serializer, base64."""
