"""History in chunks: each point's events packed into rows of the ``history`` table, the events
not yet in a row (kept in memory), retention by age, count and bytes, and the reads of a
point's history.

A chunk is one row per point and flush, with the events' ``seq``s and times packed and their
JSON one per line, so storing an event costs a share of one row, not a row and its index
entries. The methods that take a ``writer`` run on the store's writer thread, inside the
caller's transaction; the reads run on any thread.

May import: the standard library and ``bridge.pipeline.outbox`` (reading the event log back).
"""

from __future__ import annotations

import sqlite3
import threading
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bridge.pipeline.outbox import log_events

CHUNK_EVENTS = 128
"""A point's events written as one history row at most (sooner at each flush)."""
PENDING_BYTES = 8 << 20
"""Event JSON waiting in memory for its history rows, at most: past it every point is
flushed."""

INSERT_CHUNK = ("INSERT INTO history (point, seq, last, count, seqs, tss, body) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)")

ChunkRow = tuple[str, int, int, int, bytes, bytes, str]
"""A history row: point, first and last ``seq``, count, packed ``seq``s and times, JSON."""


@dataclass(frozen=True)
class Retention:
    """How much history is kept."""

    max_age: float
    """Seconds; older rows are pruned."""
    max_rows: int
    """Per point; the oldest rows beyond it are pruned."""
    max_bytes: int | None = None
    """Event JSON of all points together; the oldest history beyond it is pruned."""


@dataclass(slots=True)
class Chunk:
    """A point's events not yet in a history row."""

    seqs: list[int] = field(default_factory=list)
    tss: list[float] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)

    def add(self, seq: int, ts: float, body: str) -> None:
        """Append one event."""
        self.seqs.append(seq)
        self.tss.append(ts)
        self.bodies.append(body)

    def row(self, point: str) -> ChunkRow:
        """The history row of these events."""
        return (point, self.seqs[0], self.seqs[-1], len(self.seqs),
                array("q", self.seqs).tobytes(), array("d", self.tss).tobytes(),
                "\n".join(self.bodies))


def unpack(seqs: bytes, tss: bytes, body: str) -> tuple[array[int], array[float], list[str]]:
    """The ``seq``s, times and JSON bodies of a history row."""
    return array("q", seqs), array("d", tss), body.split("\n")


class History:
    """Every point's history: its rows, and its events still in memory."""

    def __init__(self, retention: Retention) -> None:
        self.retention = retention
        self._rows: Counter[str] = Counter()
        """Events in history rows, per point (on the writer thread)."""
        self._bytes = 0
        """Characters of event JSON in history rows, not counting the newlines between them
        (on the writer thread)."""
        self._pending: dict[str, Chunk] = {}
        """Each point's events not yet in a history row; ``_lock`` guards it (readers of the
        history take a copy)."""
        self._lock = threading.Lock()
        self._pending_bytes = 0

    # --- on the writer thread ------------------------------------------------------------------

    def load(self, writer: sqlite3.Connection, mark: int) -> None:
        """Count the rows of every point, and take back from the event log the events after
        ``mark`` that no history row holds (the daemon stopped before writing them)."""
        self._rows.clear()
        self._pending.clear()
        self._pending_bytes = 0
        # The size of the history reads every row whole: only when it is bounded.
        sizes = "SUM(length(body) - count + 1)" if self.retention.max_bytes is not None else "0"
        self._bytes = 0
        for point, count, size in writer.execute(
                f"SELECT point, SUM(count), {sizes} FROM history GROUP BY point"):
            self._rows[point] = count
            self._bytes += size
        written: dict[str, int] = {}
        for row in log_events(writer, mark):
            point = row.event.point
            if point not in written:
                (last,) = writer.execute("SELECT COALESCE(MAX(last), 0) FROM history "
                                         "WHERE point = ?", (point,)).fetchone()
                written[point] = last
            if row.seq > written[point]:
                self._add(point, row.seq, row.event.ts, row.body)

    @property
    def has_pending(self) -> bool:
        """Whether events wait in memory for their history rows."""
        return bool(self._pending)

    @property
    def pending_full(self) -> bool:
        """Whether the events in memory reached ``PENDING_BYTES``: time to flush them all."""
        return self._pending_bytes >= PENDING_BYTES

    def add(self, events: Iterable[tuple[int, str, float, str]]) -> list[str]:
        """Keep ``(seq, point, ts, body)`` events in memory until their rows are written;
        returns the points whose chunk is full (``CHUNK_EVENTS``) now."""
        full: list[str] = []
        with self._lock:
            for seq, point, ts, body in events:
                if len(self._add(point, seq, ts, body).seqs) == CHUNK_EVENTS:
                    full.append(point)
        return full

    def _add(self, point: str, seq: int, ts: float, body: str) -> Chunk:
        chunk = self._pending.get(point)
        if chunk is None:
            chunk = self._pending[point] = Chunk()
        chunk.add(seq, ts, body)
        self._pending_bytes += len(body)
        return chunk

    def undo(self, first: int) -> None:
        """Forget the events from ``seq`` ``first`` on: their transaction failed."""
        with self._lock:
            for point in list(self._pending):
                chunk = self._pending[point]
                while chunk.seqs and chunk.seqs[-1] >= first:
                    chunk.seqs.pop()
                    chunk.tss.pop()
                    self._pending_bytes -= len(chunk.bodies.pop())
                if not chunk.seqs:
                    del self._pending[point]

    def write_chunks(self, writer: sqlite3.Connection, points: Sequence[str]) -> None:
        """Write the full chunks of ``points``; ``committed_chunks`` once committed."""
        writer.executemany(INSERT_CHUNK, [self._pending[point].row(point) for point in points])

    def committed_chunks(self, points: Sequence[str]) -> None:
        """The full chunks of ``points`` are in committed history rows now."""
        with self._lock:
            for point in points:
                chunk = self._pending.pop(point)
                self._rows[point] += len(chunk.seqs)
                size = sum(len(body) for body in chunk.bodies)
                self._pending_bytes -= size
                self._bytes += size

    def write_all(self, writer: sqlite3.Connection) -> None:
        """Write every chunk in memory; ``committed_all`` once committed."""
        if self._pending:
            writer.executemany(INSERT_CHUNK, [chunk.row(point)
                                              for point, chunk in self._pending.items()])

    def committed_all(self) -> None:
        """Every chunk in memory is in a committed history row now."""
        with self._lock:
            for point, chunk in self._pending.items():
                self._rows[point] += len(chunk.seqs)
            self._bytes += self._pending_bytes
            self._pending.clear()
            self._pending_bytes = 0

    def trim(self, writer: sqlite3.Connection, cutoff: int | None) -> None:
        """Apply retention: drop every point's events up to ``seq`` ``cutoff`` and its oldest
        beyond ``max_rows``, then the oldest rows beyond ``max_bytes``."""
        for point in list(self._rows):
            self._trim_point(writer, point, cutoff, self.retention.max_rows)
        if self.retention.max_bytes is not None:
            self._trim_bytes(writer, self.retention.max_bytes)

    def _trim_point(self, writer: sqlite3.Connection, point: str, cutoff: int | None,
                    limit: int) -> None:
        """Drop a point's events up to ``seq`` ``cutoff`` and its oldest beyond ``limit``:
        whole rows, and the one row that straddles the line rewritten without them."""
        excess = self._rows[point] - limit
        if excess <= 0 and cutoff is None:
            return
        chunks = writer.execute(
            "SELECT id, seq, last, count, seqs, tss, body FROM history WHERE point = ? "
            "ORDER BY seq", (point,))
        removed = 0
        for row_id, _, last, count, seqs, tss, body in chunks.fetchall():
            old = cutoff is not None and last <= cutoff
            if old or excess - removed >= count:
                writer.execute("DELETE FROM history WHERE id = ?", (row_id,))
                removed += count
                self._bytes -= len(body) - count + 1
                continue
            numbers, times, bodies = unpack(seqs, tss, body)
            drop = max(excess - removed,
                       sum(1 for seq in numbers if cutoff is not None and seq <= cutoff))
            if drop > 0:
                rest = Chunk(list(numbers[drop:]), list(times[drop:]), bodies[drop:])
                _, first, new_last, new_count, packed, packed_ts, text = rest.row(point)
                writer.execute("UPDATE history SET seq = ?, last = ?, count = ?, seqs = ?, "
                               "tss = ?, body = ? WHERE id = ?",
                               (first, new_last, new_count, packed, packed_ts, text, row_id))
                removed += drop
                self._bytes -= len(body) - len(text) - drop
            break
        self._forget_rows(point, removed)

    def _forget_rows(self, point: str, removed: int) -> None:
        if removed:
            self._rows[point] -= removed
            if self._rows[point] <= 0:
                del self._rows[point]

    def _trim_bytes(self, writer: sqlite3.Connection, limit: int) -> None:
        """Drop the oldest history rows, of any point, while the history holds more than
        ``limit`` bytes of event JSON."""
        excess = self._bytes - limit
        if excess <= 0:
            return
        doomed: list[tuple[int]] = []
        oldest = writer.execute(
            "SELECT id, point, count, length(body) - count + 1 FROM history ORDER BY id")
        for row_id, point, count, size in oldest:
            if excess <= 0:
                break
            doomed.append((row_id,))
            self._forget_rows(point, count)
            self._bytes -= size
            excess -= size
        oldest.close()
        writer.executemany("DELETE FROM history WHERE id = ?", doomed)

    # --- on any thread -------------------------------------------------------------------------

    def _fresh(self, point: str) -> list[tuple[int, float, str]]:
        with self._lock:
            chunk = self._pending.get(point)
            return (list(zip(chunk.seqs, chunk.tss, chunk.bodies, strict=True))
                    if chunk is not None else [])

    def read(self, reader: sqlite3.Connection, point: str, *, since: float | None,
             until: float | None, limit: int, newest_first: bool) -> list[str]:
        """A point's events between two times, as their JSON bodies.

        The events still in memory are taken first, then the history rows: an event flushed
        in between is found in both and counted once.
        """
        fresh = self._fresh(point)
        order = "DESC" if newest_first else "ASC"
        rows = reader.execute(
            f"SELECT seqs, tss, body FROM history WHERE point = ? ORDER BY seq {order}",
            (point,))
        seen: set[int] = set()
        found: list[str] = []

        def take(events: Iterable[tuple[int, float, str]]) -> bool:
            """Add the events that match; whether ``limit`` is reached."""
            for seq, ts, body in events:
                if seq in seen or (since is not None and ts < since) or (
                        until is not None and ts > until):
                    continue
                seen.add(seq)
                found.append(body)
                if len(found) >= limit:
                    return True
            return False

        try:
            if newest_first and take(reversed(fresh)):
                return found
            for seqs, tss, body in rows:
                events = list(zip(*unpack(seqs, tss, body), strict=True))
                if take(reversed(events) if newest_first else events):
                    return found
            if not newest_first:
                take(fresh)
        finally:
            rows.close()
        return found

    def count(self, reader: sqlite3.Connection, point: str) -> int:
        """How many events of a point the history holds."""
        pending = {seq for seq, _, _ in self._fresh(point)}
        (count,) = reader.execute(
            "SELECT COALESCE(SUM(count), 0) FROM history WHERE point = ?", (point,)).fetchone()
        if pending:
            (last,) = reader.execute(
                "SELECT COALESCE(MAX(last), 0) FROM history WHERE point = ?",
                (point,)).fetchone()
            pending = {seq for seq in pending if seq > last}
        return int(count) + len(pending)
