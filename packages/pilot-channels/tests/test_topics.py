from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pilot_channels import InvalidPatternError, InvalidTopicError, compile_pattern, validate_topic


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("agents.planner", "agents.planner", True),
        ("agents.planner", "agents.planner.x", False),
        ("agents.*", "agents.planner", True),
        ("agents.*", "agents", False),
        ("agents.*", "agents.planner.tasks", False),
        ("agents.*.tasks", "agents.planner.tasks", True),
        ("agents.*.tasks", "agents.tasks", False),
        ("agents.>", "agents.planner", True),
        ("agents.>", "agents.planner.tasks.x", True),
        ("agents.>", "agents", False),
        ("agents.>", "other.planner", False),
        (">", "anything", True),
        (">", "a.b.c", True),
        ("*", "a", True),
        ("*", "a.b", False),
        ("*.b.>", "a.b.c", True),
        ("*.b.>", "a.b", False),
    ],
)
def test_matching(pattern: str, topic: str, expected: bool) -> None:
    assert compile_pattern(pattern).matches(validate_topic(topic)) is expected


@pytest.mark.parametrize(
    "bad", ["", ".a", "a.", "a..b", "a.*", "a.>", "a b", "a\n", "x" * 256, ".".join("a" * 33)]
)
def test_bad_topics(bad: str) -> None:
    with pytest.raises(InvalidTopicError):
        validate_topic(bad)


@pytest.mark.parametrize("bad", ["", "a.>.b", "a.b*", "a.>x", "a..b", "a b", 5])
def test_bad_patterns(bad: object) -> None:
    with pytest.raises(InvalidPatternError):
        compile_pattern(bad)  # type: ignore[arg-type]


def test_errors_are_value_errors_naming_the_problem() -> None:
    with pytest.raises(ValueError, match="'>' may only be the last segment"):
        compile_pattern("a.>.b")
    with pytest.raises(ValueError, match="wildcard"):
        validate_topic("a.*")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a.>", "a.b", True),
        ("a.>", "a", False),
        ("a.*", "a.b.c", False),
        ("a.*", "*.b", True),
        (">", "x.y", True),
        ("a.b", "a.c", False),
        ("a.*.c", "a.b.>", True),
        ("a.>", "b.>", False),
    ],
)
def test_overlap(a: str, b: str, expected: bool) -> None:
    assert compile_pattern(a).overlaps(compile_pattern(b)) is expected
    assert compile_pattern(b).overlaps(compile_pattern(a)) is expected


segment = st.sampled_from(["a", "b", "c"])
topic_st = st.lists(segment, min_size=1, max_size=4).map(".".join)
pattern_seg = st.sampled_from(["a", "b", "*"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    segs = draw(st.lists(pattern_seg, min_size=1, max_size=4))
    if draw(st.booleans()):
        segs.append(">")
    return ".".join(segs)


@given(patterns(), patterns(), st.lists(topic_st, max_size=30))
def test_overlap_agrees_with_matching(a: str, b: str, topics: list[str]) -> None:
    pa, pb = compile_pattern(a), compile_pattern(b)
    if any(pa.matches(t) and pb.matches(t) for t in topics):
        assert pa.overlaps(pb)
