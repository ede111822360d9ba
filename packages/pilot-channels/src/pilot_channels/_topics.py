"""Topic names and subscription patterns.

A *topic* is a dot-separated name such as ``agents.planner.tasks``: 1 to 32
non-empty segments, at most 255 UTF-8 bytes in all. A segment may hold any
printable character except ``.``, ``*``, ``>`` and whitespace.

A *pattern* is a topic in which whole segments may be wildcards:

- ``*`` matches exactly one segment: ``agents.*.tasks`` matches
  ``agents.planner.tasks`` but not ``agents.tasks`` nor ``agents.a.b.tasks``.
- ``>`` (last segment only) matches one or more remaining segments:
  ``agents.>`` matches ``agents.planner`` and ``agents.planner.tasks`` but not
  ``agents`` itself. A bare ``>`` matches every topic.

A pattern without wildcards matches only that exact topic. This is the syntax
of NATS subjects, chosen because it is small and widely known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidPatternError, InvalidTopicError

__all__ = [
    "MATCH_ALL",
    "MAX_SEGMENTS",
    "MAX_TOPIC_BYTES",
    "TopicPattern",
    "compile_pattern",
    "validate_topic",
]

MAX_TOPIC_BYTES = 255
MAX_SEGMENTS = 32
MATCH_ALL = ">"
_ONE = "*"
_REST = ">"


def _check_segment(segment: str, text: str, kind: str, error: type[ValueError]) -> None:
    if not segment:
        raise error(f"{kind} {text!r} has an empty segment (leading, trailing or double '.')")
    for ch in segment:
        if ch in "*>":
            raise error(
                f"{kind} {text!r}: {ch!r} may only stand alone as a whole segment"
                if kind == "pattern"
                else f"topic {text!r} contains wildcard {ch!r} (wildcards are for patterns)"
            )
        if ch.isspace() or not ch.isprintable():
            raise error(f"{kind} {text!r} contains a space or control character {ch!r}")


def _split(text: object, kind: str, error: type[ValueError]) -> list[str]:
    if not isinstance(text, str):
        raise error(f"{kind} must be a str, got {type(text).__name__}")
    if not text:
        raise error(f"{kind} must not be empty")
    if len(text.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise error(f"{kind} {text[:40]!r}... is longer than {MAX_TOPIC_BYTES} UTF-8 bytes")
    segments = text.split(".")
    if len(segments) > MAX_SEGMENTS:
        raise error(f"{kind} {text!r} has more than {MAX_SEGMENTS} segments")
    return segments


def validate_topic(topic: object) -> str:
    """Return ``topic`` if it is a valid topic name.

    Raises:
        InvalidTopicError: the name breaks the syntax (the message says how).
    """
    segments = _split(topic, "topic", InvalidTopicError)
    for segment in segments:
        _check_segment(segment, str(topic), "topic", InvalidTopicError)
    return str(topic)


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """A compiled subscription pattern (see the module docstring for the syntax)."""

    text: str
    segments: tuple[str, ...]

    @property
    def is_exact(self) -> bool:
        """True when the pattern has no wildcard and so names one topic."""
        return _ONE not in self.segments and self.segments[-1] != _REST

    def matches(self, topic: str) -> bool:
        """Whether ``topic`` (assumed valid) matches this pattern."""
        return _match(self.segments, topic.split("."))

    def overlaps(self, other: TopicPattern) -> bool:
        """Whether some topic matches both this pattern and ``other``."""
        return _overlap(self.segments, other.segments)

    def __str__(self) -> str:
        return self.text


def compile_pattern(pattern: str | TopicPattern) -> TopicPattern:
    """Parse a subscription pattern.

    Raises:
        InvalidPatternError: the pattern breaks the syntax (the message says how).
    """
    if isinstance(pattern, TopicPattern):
        return pattern
    segments = _split(pattern, "pattern", InvalidPatternError)
    for index, segment in enumerate(segments):
        if segment == _REST:
            if index != len(segments) - 1:
                raise InvalidPatternError(f"pattern {pattern!r}: '>' may only be the last segment")
            continue
        if segment == _ONE:
            continue
        _check_segment(segment, pattern, "pattern", InvalidPatternError)
    return TopicPattern(text=pattern, segments=tuple(segments))


def _match(pattern: Sequence[str], topic: Sequence[str]) -> bool:
    for index, want in enumerate(pattern):
        if want == _REST:
            return len(topic) > index
        if index >= len(topic):
            return False
        if want != _ONE and want != topic[index]:
            return False
    return len(topic) == len(pattern)


def _overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    for index in range(max(len(a), len(b))):
        left = a[index] if index < len(a) else None
        right = b[index] if index < len(b) else None
        if left == _REST:
            return right is not None
        if right == _REST:
            return left is not None
        if left is None or right is None:
            return False
        if left != right and _ONE not in (left, right):
            return False
    return True
