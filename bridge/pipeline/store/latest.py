"""The ``latest`` table: each point's last value, written every few seconds with a batch (not
with every one), and its mark, the ``seq`` up to which the table and the history rows are
complete; what comes after the mark is read back from the event log.

May import: the standard library, ``bridge.core`` and ``bridge.pipeline.store.eventlog``.
"""

from __future__ import annotations

import sqlite3

from bridge.core.model import Event
from bridge.pipeline.store.eventlog import EventLog

LatestRow = tuple[str, float, str]
"""A row of ``latest``: point, time, the event's JSON."""


class LatestValues:
    """The last values not yet in the ``latest`` table, and its mark (on the writer thread)."""

    def __init__(self) -> None:
        self.waiting: dict[str, LatestRow] = {}
        """Last values of committed batches not yet in the table."""
        self.mark = 0
        """The ``seq`` up to which the table and the history rows are complete."""

    def load(self, writer: sqlite3.Connection) -> int:
        """Read the mark at open (and create it in a new store); returns it."""
        self.waiting.clear()
        writer.execute("INSERT OR IGNORE INTO latest_mark (id, seq) VALUES (1, 0)")
        (self.mark,) = writer.execute("SELECT seq FROM latest_mark").fetchone()
        return self.mark

    @staticmethod
    def write(writer: sqlite3.Connection, values: dict[str, LatestRow], mark: int) -> None:
        """Write ``values`` to the table and move its mark to ``mark``, inside the caller's
        transaction."""
        writer.executemany(
            "INSERT INTO latest (point, ts, body) VALUES (?, ?, ?) "
            "ON CONFLICT (point) DO UPDATE SET ts = excluded.ts, body = excluded.body",
            list(values.values()))
        writer.execute("UPDATE latest_mark SET seq = ?", (mark,))

    def written(self, mark: int) -> None:
        """The values waiting are in the table up to ``mark`` now (committed)."""
        self.waiting.clear()
        self.mark = mark

    @staticmethod
    def read(reader: sqlite3.Connection) -> dict[str, Event]:
        """The last stored event of every point: the table, then the log after its mark."""
        with reader:
            # One read transaction: the table and the log after its mark agree.
            reader.execute("BEGIN")
            (mark,) = reader.execute("SELECT seq FROM latest_mark WHERE id = 1").fetchone()
            events = {point: Event.from_json(body) for point, body in
                      reader.execute("SELECT point, body FROM latest")}
            for row in EventLog.after(reader, mark):
                events[row.event.point] = row.event
        return events
