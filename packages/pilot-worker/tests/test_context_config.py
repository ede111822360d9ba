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


async def test_with_progress_routes_report_progress_to_the_middleware() -> None:
    ctx = make_context("h")
    routed: list[object] = []

    async def send(value: object) -> None:
        routed.append(value)

    twin = ctx.with_progress(send)
    await twin.report_progress({"pct": 5})
    await twin.with_config({"tags": ["a"]}).report_progress(6)  # kept by with_config
    assert routed == [{"pct": 5}, 6]  # the values as the handler gave them
    assert ctx._call.progress == []  # pyright: ignore[reportPrivateUsage, reportAttributeAccessIssue]
    await ctx.report_progress(7)  # the original still sends progress frames
    assert ctx._call.progress == [7]  # pyright: ignore[reportPrivateUsage, reportAttributeAccessIssue]
