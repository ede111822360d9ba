"""Run a coroutine as one LangChain chain run (on_chain_start/end/error).

``Runnable._acall_with_config`` does the same but inspects the wrapped
function's signature on every call, which costs more than a remote call's
whole client side. Here the callback manager is built once per call and,
when no handler is configured at all (no callbacks, no tracing), the events
are skipped: nobody would observe them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import (
    get_async_callback_manager_for_config,
    patch_config,
    var_child_runnable_config,
)

__all__ = ["run_as_chain"]

T = TypeVar("T")


async def run_as_chain(
    name: str,
    input: Any,
    config: RunnableConfig,
    body: Callable[[RunnableConfig], Awaitable[T]],
) -> T:
    """Await ``body(child_config)`` between ``on_chain_start`` and ``on_chain_end``.

    ``config`` must already have been through ``ensure_config``. Errors
    (cancellation included) are reported with ``on_chain_error`` and re-raised.
    While ``body`` runs, the child config is the current runnable config, so
    LangGraph's ``get_config()``/``get_stream_writer()`` work inside it.
    """
    manager = get_async_callback_manager_for_config(config)
    if not manager.handlers:
        return await _in_config(config, body)
    run_manager = await manager.on_chain_start(
        None,
        input,
        name=config.get("run_name") or name,
        run_id=config.pop("run_id", None),
    )
    try:
        result = await _in_config(patch_config(config, callbacks=run_manager.get_child()), body)
    except BaseException as exc:
        await run_manager.on_chain_error(exc)
        raise
    await run_manager.on_chain_end(result)
    return result


async def _in_config(config: RunnableConfig, body: Callable[[RunnableConfig], Awaitable[T]]) -> T:
    # Set in the current task and reset right after: no extra task per call.
    token = var_child_runnable_config.set(config)
    try:
        return await body(config)
    finally:
        var_child_runnable_config.reset(token)
