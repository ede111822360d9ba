"""``Context.config`` and ``Context.with_config``: how a middleware hands a handler its config."""

from __future__ import annotations

from pilot_worker.testing import make_context


async def test_config_is_empty_until_a_middleware_sets_it() -> None:
    ctx = make_context("h", metadata={"k": "v"})
    assert dict(ctx.config) == {}
    twin = ctx.with_config({"tags": ["a"]})
    assert twin.config == {"tags": ["a"]}
    assert dict(ctx.config) == {}  # the original is unchanged
    assert twin.request_id == ctx.request_id
    assert twin.metadata == {"k": "v"}
    assert twin.handler_name == "h"
    await twin.report_progress(1)  # the copy serves the same call
    assert ctx._call.progress == [1]  # pyright: ignore[reportPrivateUsage, reportAttributeAccessIssue]
