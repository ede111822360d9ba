"""Per-topic access control on authenticated node ids.

Rules are ordered; for a topic the first rule whose pattern matches decides both
publish and subscribe rights. A topic no rule matches follows
``default_access``. ``None`` as a node id means the broker's own process
(in-process publishes and subscriptions), which is always allowed.

Subscribing to a wildcard pattern is allowed when at least one topic the
pattern can match may be read; every event is then checked against the rules
for its own topic before it is queued, so ``>`` delivers only what the
subscriber may read.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._options import AclRule
from ._topics import TopicPattern, compile_pattern

__all__ = ["TopicAcl"]

_CACHE_LIMIT = 8192


class TopicAcl:
    """Evaluates :class:`AclRule` lists; results per (topic, action) are cached."""

    def __init__(self, rules: Sequence[AclRule], *, default_access: str = "open") -> None:
        self._rules = [(compile_pattern(rule.pattern), rule) for rule in rules]
        self._open = default_access == "open"
        self._cache: dict[tuple[str, bool], frozenset[str] | bool] = {}

    def _decide(self, topic: str, publish: bool) -> frozenset[str] | bool:
        """``True``/``False`` for everyone/no-one, a set of node ids, cached."""
        key = (topic, publish)
        found = self._cache.get(key)
        if found is not None:
            return found
        decision: frozenset[str] | bool = self._open
        for pattern, rule in self._rules:
            if pattern.matches(topic):
                allowed = rule.publish if publish else rule.subscribe
                decision = True if allowed is None else frozenset(allowed)
                break
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = decision
        return decision

    def may_publish(self, node_id: str | None, topic: str) -> bool:
        """Whether ``node_id`` may publish to ``topic``."""
        return node_id is None or _allowed(self._decide(topic, True), node_id)

    def may_read(self, node_id: str | None, topic: str) -> bool:
        """Whether ``node_id`` may receive events of ``topic``."""
        return node_id is None or _allowed(self._decide(topic, False), node_id)

    def may_subscribe(self, node_id: str | None, pattern: TopicPattern) -> bool:
        """Whether ``node_id`` may receive at least one topic ``pattern`` can match."""
        if node_id is None:
            return True
        if pattern.is_exact:
            return self.may_read(node_id, pattern.text)
        for rule_pattern, rule in self._rules:
            allowed = rule.subscribe
            if rule_pattern.overlaps(pattern) and (allowed is None or node_id in allowed):
                return True
        # Topics matching no rule follow the default; with rules that cover the
        # whole pattern this is conservative (a later per-event check still applies).
        return self._open


def _allowed(decision: frozenset[str] | bool, node_id: str) -> bool:
    if isinstance(decision, bool):
        return decision
    return node_id in decision
