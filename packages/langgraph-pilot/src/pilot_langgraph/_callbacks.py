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
    """
    manager = get_async_callback_manager_for_config(config)
    if not manager.handlers:
        return await body(config)
    run_manager = await manager.on_chain_start(
        None,
        input,
        name=config.get("run_name") or name,
        run_id=config.pop("run_id", None),
    )
    try:
        result = await body(patch_config(config, callbacks=run_manager.get_child()))
    except BaseException as exc:
        await run_manager.on_chain_error(exc)
        raise
    await run_manager.on_chain_end(result)
    return result
