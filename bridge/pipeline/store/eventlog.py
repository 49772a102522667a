"""The event log: table ``batches``, one row per stored batch (its first and last ``seq``, when
it was stored, how many events and bytes each sink takes, and the events' JSON one per line).

The sinks' outbox, the replay of event streams and the last values not yet in ``latest`` all
read it. The log owns its rows, their trimming (what no sink, no replay and no ``latest`` mark
needs any more), the lookup of an event's ``seq`` and the catch-up reads after a ``seq``.
``append`` and ``trim`` run on the store's writer thread, inside the caller's transaction; the
reads run on any connection.

May import: the standard library and ``bridge.pipeline.outbox`` (its cursors and log rows).
"""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from bridge.pipeline.outbox import Drop, LogRow, Outbox, log_events


@dataclass(frozen=True)
class Replay:
    """How much of the event log is kept for event streams that resume (``Last-Event-ID``),
    beyond what the sinks still need."""

    max_bytes: int = 64 << 20
    max_age: float = 3600.0


@dataclass(slots=True)
class _LogBatch:
    first: int
    last: int
    size: int
    created: float


class EventLog:
    """The rows of the event log, oldest first, as the writer thread knows them."""

    def __init__(self, replay: Replay) -> None:
        self.replay = replay
        self._batches: deque[_LogBatch] = deque()
        self._bytes = 0

    def load(self, writer: sqlite3.Connection) -> int:
        """Read the log's rows at open; returns its last ``seq`` (0 when it is empty)."""
        self._batches.clear()
        self._bytes = 0
        for first, last, size, created in writer.execute(
                "SELECT seq, last, length(body), created FROM batches ORDER BY seq"):
            self._batches.append(_LogBatch(first, last, size, created))
            self._bytes += size
        return self._batches[-1].last if self._batches else 0

    def append(self, writer: sqlite3.Connection, first: int, created: float, sinks: str,
               bodies: list[str]) -> int:
        """Insert one batch of events from ``seq`` ``first``; returns its size. Call
        ``appended`` once the transaction is committed."""
        text = "\n".join(bodies)
        writer.execute("INSERT INTO batches (seq, last, created, sinks, body) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (first, first + len(bodies) - 1, created, sinks, text))
        return len(text)

    def appended(self, first: int, last: int, size: int, created: float) -> None:
        """The batch ``append`` inserted is committed."""
        self._batches.append(_LogBatch(first, last, size, created))
        self._bytes += size

    def trim(self, writer: sqlite3.Connection, now: float, mark: int, outbox: Outbox | None,
             dropped: Mapping[str, Drop] | None = None) -> None:
        """Delete the oldest batches that no sink needs any more (their cursors moved as
        ``dropped`` plans), that the ``latest`` table covers (up to ``mark``), and that are
        beyond what event streams may replay. The newest batch always stays: it holds the
        last ``seq``."""
        log = self._batches
        if len(log) < 2:
            return
        replay = self.replay
        needed = outbox.needed(dropped) if outbox is not None else 1 << 62
        others = list(outbox.others.values()) if outbox is not None else []
        keep = min(needed, mark)
        old = now - replay.max_age
        cutoff: int | None = None
        while len(log) > 1:
            batch = log[0]
            if batch.last > keep or (self._bytes - batch.size < replay.max_bytes
                                     and batch.created >= old):
                break
            log.popleft()
            self._bytes -= batch.size
            if any(batch.last > seq and batch.first <= end for seq, end in others):
                # Kept for a sink that is not configured now; it stays out of the count.
                continue
            cutoff = batch.first
            if others:
                writer.execute("DELETE FROM batches WHERE seq = ?", (batch.first,))
                cutoff = None
        if cutoff is not None:
            writer.execute("DELETE FROM batches WHERE seq <= ? AND last <= ?", (cutoff, keep))

    @staticmethod
    def after(connection: sqlite3.Connection, seq: int) -> Iterator[LogRow]:
        """The events logged after ``seq``, in order (catch-up reads)."""
        return log_events(connection, seq)

    @staticmethod
    def seq_of(connection: sqlite3.Connection, event_id: str) -> int | None:
        """The position (``seq``) of an event in the log; ``None`` when the log no longer
        holds it (or it was never stored here)."""
        needle = f'"id":{json.dumps(event_id)}'
        row = connection.execute(
            "SELECT seq, body FROM batches WHERE instr(body, ?) > 0 ORDER BY seq DESC LIMIT 1",
            (needle,)).fetchone()
        if row is None:
            return None
        first, body = row
        for offset, line in enumerate(body.split("\n")):
            if needle in line:
                return int(first) + offset
        return None
