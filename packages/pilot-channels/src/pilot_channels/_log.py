"""The durable topic log: an append-only SQLite table with offsets.

One table holds the events of every durable topic; the offset is SQLite's
``AUTOINCREMENT`` key, so it only grows, also across restarts and after
retention deleted old rows. Payloads are stored msgpack-encoded and never run.

The broker calls this from its event loop thread on purpose: appends and the
"has this subscriber caught up" check then happen in one order with no race
between them. The WAL journal with ``synchronous=NORMAL`` keeps every committed
event across a crash of the process (kill -9); a power loss may lose the last
few commits. Calls are short (one transaction per publish request, bounded
reads); a broker with a very high durable rate should put the file on fast storage.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._options import DurableTopic
from ._topics import compile_pattern
from .errors import DurableLogError

__all__ = ["DurableLog", "LogRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    ts REAL NOT NULL,
    publisher TEXT,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_topic_pos ON events(topic, pos);
"""


@dataclass(frozen=True, slots=True)
class LogRow:
    offset: int
    topic: str
    timestamp: float
    publisher: str | None
    payload: bytes


class DurableLog:
    """Append-only event log in one SQLite file (or in memory when ``path`` is None)."""

    def __init__(
        self,
        path: str | None,
        topics: Sequence[DurableTopic],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rules = [(compile_pattern(t.pattern), t) for t in topics]
        self._clock = clock
        self.path = path
        try:
            if path is not None:
                # Create the file owner-only before SQLite opens it (WAL and shm
                # files inherit its mode).
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                os.close(fd)
            self._db = sqlite3.connect(path or ":memory:", isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
            self.head: int = int(row[0]) if row else 0
            count = self._db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM events"
            ).fetchone()
        except (OSError, sqlite3.Error) as exc:
            raise DurableLogError(f"cannot open durable log {path!r}: {exc}") from exc
        self.events: int = int(count[0])
        self.bytes: int = int(count[1])
        self._closed = False

    def append_many(self, rows: Sequence[tuple[str, float, str | None, bytes]]) -> list[int]:
        """Append ``(topic, ts, publisher, payload)`` rows in one transaction.

        Raises:
            DurableLogError: the write failed (nothing of the batch is kept).
        """
        offsets: list[int] = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for topic, ts, publisher, payload in rows:
                    cur = self._db.execute(
                        "INSERT INTO events(topic, ts, publisher, payload) VALUES (?, ?, ?, ?)",
                        (topic, ts, publisher, payload),
                    )
                    offsets.append(int(cur.lastrowid or 0))
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise DurableLogError(f"cannot append to durable log: {exc}") from exc
        if offsets:
            self.head = offsets[-1]
        self.events += len(rows)
        self.bytes += sum(len(r[3]) for r in rows)
        return offsets

    def read_after(self, after: int, limit: int) -> list[LogRow]:
        """Rows with offset > ``after``, oldest first, at most ``limit``."""
        try:
            cur = self._db.execute(
                "SELECT pos, topic, ts, publisher, payload FROM events WHERE pos > ? "
                "ORDER BY pos LIMIT ?",
                (after, limit),
            )
            return [LogRow(int(r[0]), r[1], float(r[2]), r[3], bytes(r[4])) for r in cur]
        except sqlite3.Error as exc:
            raise DurableLogError(f"cannot read durable log: {exc}") from exc

    def first_offset(self) -> int:
        """The oldest retained offset (``head + 1`` when the log is empty)."""
        row = self._db.execute("SELECT min(pos) FROM events").fetchone()
        return int(row[0]) if row and row[0] is not None else self.head + 1

    def _rule_for(self, topic: str) -> DurableTopic | None:
        for pattern, rule in self._rules:
            if pattern.matches(topic):
                return rule
        return None

    def enforce_retention(self) -> int:
        """Delete events past their topic's retention; return how many were deleted.

        Raises:
            DurableLogError: the log could not be read or written.
        """
        now = self._clock()
        deleted = 0
        try:
            topics = [r[0] for r in self._db.execute("SELECT DISTINCT topic FROM events")]
            for topic in topics:
                rule = self._rule_for(topic)
                if rule is None:
                    continue
                keep = rule.retention
                cut = 0
                if keep.max_age_secs is not None:
                    row = self._db.execute(
                        "SELECT max(pos) FROM events WHERE topic = ? AND ts < ?",
                        (topic, now - keep.max_age_secs),
                    ).fetchone()
                    cut = max(cut, int(row[0] or 0))
                if keep.max_events is not None:
                    row = self._db.execute(
                        "SELECT pos FROM events WHERE topic = ? ORDER BY pos DESC LIMIT 1 OFFSET ?",
                        (topic, keep.max_events),
                    ).fetchone()
                    cut = max(cut, int(row[0]) if row else 0)
                if keep.max_bytes is not None:
                    total = 0
                    for pos, size in self._db.execute(
                        "SELECT pos, length(payload) FROM events WHERE topic = ? ORDER BY pos DESC",
                        (topic,),
                    ):
                        total += int(size)
                        if total > keep.max_bytes:
                            cut = max(cut, int(pos))
                            break
                if cut:
                    row = self._db.execute(
                        "SELECT count(*), coalesce(sum(length(payload)), 0) FROM events "
                        "WHERE topic = ? AND pos <= ?",
                        (topic, cut),
                    ).fetchone()
                    self._db.execute(
                        "DELETE FROM events WHERE topic = ? AND pos <= ?", (topic, cut)
                    )
                    deleted += int(row[0])
                    self.events -= int(row[0])
                    self.bytes -= int(row[1])
        except sqlite3.Error as exc:
            raise DurableLogError(f"retention on durable log failed: {exc}") from exc
        return deleted

    def close(self) -> None:
        """Close the database. Idempotent."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
