"""@pilot_handler, HandlerSpec validation and signature inspection."""

from __future__ import annotations

from typing import Any

import pytest
from pilot_worker import (
    CallStyle,
    Context,
    HandlerDefinitionError,
    HandlerKind,
    HandlerSpec,
    get_handler_spec,
    pilot_handler,
)
from pydantic import BaseModel


class Query(BaseModel):
    q: str


class Answer(BaseModel):
    hits: int


def test_decorator_forms_and_defaults() -> None:
    @pilot_handler
    def bare(payload: Any) -> Any:
        return payload

    @pilot_handler()
    def empty(payload: Any) -> Any:
        return payload

    @pilot_handler("named", allow=["n1"], timeout_secs=5, max_concurrent=2)
    async def named(payload: Any, ctx: Context) -> Any:
        return payload

    assert get_handler_spec(bare).name == "bare"  # type: ignore[union-attr]
    assert get_handler_spec(empty).name == "empty"  # type: ignore[union-attr]
    spec = get_handler_spec(named)
    assert spec is not None
    assert spec.name == "named"
    assert spec.allow == ("n1",)
    assert spec.timeout_secs == 5
    assert spec.max_concurrent == 2
    assert spec.style is CallStyle.ASYNC
    assert spec.kind is HandlerKind.UNARY
    assert spec.takes_payload
    assert spec.takes_context
    # The function itself is unchanged and still directly callable.
    assert bare(3) == 3


def test_signature_shapes() -> None:
    def no_args() -> int:
        return 1

    def ctx_only(ctx: Context) -> str:
        return ctx.handler_name

    async def gen(payload: int):
        yield payload

    def with_default(payload: Any, ctx: Any = None, extra: int = 3) -> Any:
        return payload

    s0 = HandlerSpec(name="a", fn=no_args)
    assert (s0.takes_payload, s0.takes_context) == (False, False)
    s1 = HandlerSpec(name="b", fn=ctx_only)
    assert (s1.takes_payload, s1.takes_context) == (False, True)
    s2 = HandlerSpec(name="c", fn=gen)
    assert s2.kind is HandlerKind.SERVER_STREAMING
    assert s2.style is CallStyle.ASYNC_GENERATOR
    s3 = HandlerSpec(name="d", fn=with_default)
    assert (s3.takes_payload, s3.takes_context) == (True, True)


def test_callable_object_with_async_call() -> None:
    class Service:
        async def __call__(self, payload: Any) -> Any:
            return payload

    assert HandlerSpec(name="svc", fn=Service()).style is CallStyle.ASYNC


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timeout_secs": 0}, "timeout_secs"),
        ({"timeout_secs": -1}, "timeout_secs"),
        ({"rate_per_caller": 0}, "rate_per_caller"),
        ({"rate_per_caller": 1.5}, "rate_per_caller"),
        ({"rate_window_secs": 0}, "rate_window_secs"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"allow": "node-a"}, "list of node ids"),
        ({"allow": [""]}, "non-empty"),
        ({"overflow": "drop"}, "overflow"),
        ({"input_model": 42}, "input_model"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(HandlerDefinitionError, match=match):

        @pilot_handler("h", **kwargs)
        def h(payload: Any) -> Any:
            return payload


def test_invalid_signatures() -> None:
    def sync_gen(payload: Any):
        yield payload

    def three(a: Any, b: Any, c: Any) -> None: ...

    def kwonly(payload: Any, *, needed: int) -> None: ...

    with pytest.raises(HandlerDefinitionError, match="sync generator"):
        HandlerSpec(name="g", fn=sync_gen)
    with pytest.raises(HandlerDefinitionError, match="3 required positional"):
        HandlerSpec(name="t", fn=three)
    with pytest.raises(HandlerDefinitionError, match="keyword-only parameter 'needed'"):
        HandlerSpec(name="k", fn=kwonly)


@pytest.mark.parametrize("name", ["", "_health", "_mine", "has space", "x" * 129])
def test_invalid_names(name: str) -> None:
    with pytest.raises(HandlerDefinitionError):
        HandlerSpec(name=name, fn=lambda: None)


def test_idempotent_streaming_refused() -> None:
    async def gen(payload: Any):
        yield payload

    with pytest.raises(HandlerDefinitionError, match="unary handlers only"):
        HandlerSpec(name="g", fn=gen, idempotent=True)


def test_models_inferred_from_annotations() -> None:
    @pilot_handler("search")
    async def search(query: Query) -> Answer:
        return Answer(hits=len(query.q))

    spec = get_handler_spec(search)
    assert spec is not None
    assert spec.input_model is Query
    assert spec.output_model is Answer


def test_explicit_models_and_description() -> None:
    @pilot_handler("x", input_model=list[int], output_model=int)
    def total(values: list[int]) -> int:
        """Add the numbers.

        Longer text.
        """
        return sum(values)

    spec = get_handler_spec(total)
    assert spec is not None
    assert spec.input_model == list[int]
    assert spec.description == "Add the numbers."
