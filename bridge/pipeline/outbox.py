"""The outbox: events kept in the store for the sinks until the broker confirmed them.

The store's writer thread adds the rows in the same transaction as history and last values,
one row per (sink, event), so each sink reads its own rows in ``seq`` order and deletes them
once they are confirmed. Once committed, the rows are also handed to each sink in memory (its
*feed*), so a sink keeping up takes them from there without reading them back from SQLite; it
reads the table after a (re)connect or a refusal, or when its feed lost track (it overflowed
while the sink was away). The bound (events and bytes, per sink) is kept with an explicit policy:
``block`` stores only the events that fit and has the router wait until a sink made room;
``drop_oldest`` deletes the oldest rows to make room and counts them.

Methods taking a ``writer`` run on the store's writer thread (``Store.run_on_writer``); the
others run on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from bridge.core.model import Event
from bridge.core.sink import OutboxRoute, OutboxRow

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sink TEXT NOT NULL,
    id TEXT NOT NULL,
    source TEXT NOT NULL,
    point TEXT NOT NULL,
    quality TEXT NOT NULL,
    ts REAL NOT NULL,
    created REAL NOT NULL,
    address TEXT NOT NULL,
    size INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_sink_seq ON outbox (sink, seq);
"""
"""``AUTOINCREMENT``: a ``seq`` is never reused, even once every row is deleted, so a sink's
cursor only ever moves forward."""

_COLUMNS = "seq, id, source, point, quality, ts, created, address, size, body"
_DELETE_CHUNK = 500
"""Rows deleted per statement (each is one SQL parameter)."""
FEED_ROWS = 20_000
"""Rows a sink's feed holds at most; past that it lets go of them and the sink reads the
table until it caught up again."""


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """The bound of each sink's outbox and what happens when it is reached."""

    max_events: int
    max_bytes: int
    drop_oldest: bool = False
    """Delete the oldest rows to make room; otherwise block (store only what fits)."""


@dataclass(slots=True)
class _Feed:
    """Rows of one sink committed since it last caught up, in ``seq`` order.

    While ``after`` is not ``None`` the feed holds every row of the sink left in the table with
    a ``seq`` above it; ``None``: it does not know (never caught up, or it overflowed). The
    writer thread adds to it, the event loop takes from it: ``lock`` guards both.
    """

    rows: deque[OutboxRow] = field(default_factory=deque)
    after: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(slots=True)
class OutboxInsert:
    """What one batch put in the outbox, handed from ``insert`` to ``committed``."""

    taken: int
    """Events (a prefix of the batch) that got their rows."""
    sinks: frozenset[str] = frozenset()
    """The sinks that got rows."""
    rows: dict[str, list[OutboxRow]] = field(default_factory=dict)
    """The new rows of each sink whose feed takes them."""
    dropped: dict[str, int] = field(default_factory=dict)
    """The highest ``seq`` ``drop_oldest`` deleted, per sink that lost rows."""


@dataclass(slots=True)
class OutboxDepth:
    """What waits for one sink, and what was dropped since the store was opened."""

    events: int = 0
    bytes: int = 0
    dropped: int = 0


class Outbox:
    """The outbox table and its bound."""

    def __init__(self, limits: OutboxLimits, routes: Sequence[OutboxRoute]) -> None:
        self.limits = limits
        self.routes = tuple(routes)
        self.depths = {route.sink: OutboxDepth() for route in self.routes}
        """Live depth per configured sink, kept by the writer thread."""
        self.generation = 0
        """Counts the times a sink made room (on the event loop)."""
        self.arrivals = {route.sink: 0 for route in self.routes}
        """Counts the batches stored with rows for each sink (on the event loop)."""
        self._room = asyncio.Event()
        self._signals = {route.sink: asyncio.Event() for route in self.routes}
        self._feeds = {route.sink: _Feed() for route in self.routes}

    # --- on the writer thread ------------------------------------------------------------------

    def open(self, writer: sqlite3.Connection) -> None:
        """Create the table if needed and count what waits from an earlier run."""
        writer.executescript(SCHEMA)
        for sink, events, size in writer.execute(
                "SELECT sink, COUNT(*), COALESCE(SUM(size), 0) FROM outbox GROUP BY sink"):
            depth = self.depths.get(sink)
            if depth is None:
                logger.warning("the outbox holds %d events for sink %s, which is not configured "
                               "or not enabled; they are kept until it is", events, sink)
                continue
            depth.events, depth.bytes = events, size

    def insert(self, writer: sqlite3.Connection, events: Sequence[Event], bodies: Sequence[str],
               *, force: bool = False) -> OutboxInsert:
        """Add rows for ``events`` inside the caller's transaction; pass the result to
        ``committed`` once the transaction is committed.

        Takes a prefix of ``events``: with the ``block`` policy it ends at the first event a sink
        has no room for, unless ``force``; a sink with an empty outbox always takes one event,
        however large.
        """
        if not self.routes:
            return OutboxInsert(len(events))
        limits = self.limits
        block = not (limits.drop_oldest or force)
        created = time.time()
        added = {route.sink: OutboxDepth() for route in self.routes}
        parameters: list[tuple[str, str, str, str, str, float, float, str, int, str]] = []
        taken = 0
        for event, body in zip(events, bodies, strict=True):
            size = len(body.encode())
            routes = [route for route in self.routes if route.accepts(event)]
            if block and any(self._full(route.sink, added[route.sink], size) for route in routes):
                break
            for route in routes:
                extra = added[route.sink]
                extra.events += 1
                extra.bytes += size
                parameters.append((route.sink, event.id, event.source, event.point,
                                   event.quality.value, event.ts, created, route.address(event),
                                   size, body))
            taken += 1
        if not parameters:
            return OutboxInsert(taken)
        result = OutboxInsert(taken, frozenset(
            sink for sink, extra in added.items() if extra.events))
        writer.executemany(f"INSERT INTO outbox (sink, {_COLUMNS.removeprefix('seq, ')}) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", parameters)
        # One writer and AUTOINCREMENT: the rows just inserted got consecutive seqs ending at
        # the last rowid.
        (last,) = writer.execute("SELECT last_insert_rowid()").fetchone()
        # Only this thread switches a feed between following and not: no lock needed to ask.
        following = {sink for sink in result.sinks if self._feeds[sink].after is not None}
        seq = last - len(parameters)
        for sink, event_id, source, point, quality, ts, _, address, size, body in parameters:
            seq += 1
            if sink in following:
                result.rows.setdefault(sink, []).append(OutboxRow(
                    seq, event_id, source, point, quality, ts, created, address, size, body))
        for sink, extra in added.items():
            if extra.events:
                depth = self.depths[sink]
                depth.events += extra.events
                depth.bytes += extra.bytes
                if limits.drop_oldest:
                    cutoff = self._trim(writer, sink, depth)
                    if cutoff is not None:
                        result.dropped[sink] = cutoff
        return result

    def committed(self, inserted: OutboxInsert) -> None:
        """The transaction of ``inserted`` is committed: hand its rows to the sinks' feeds."""
        for sink, rows in inserted.rows.items():
            feed = self._feeds[sink]
            with feed.lock:
                if feed.after is None:
                    continue
                cutoff = inserted.dropped.get(sink)
                if cutoff is not None:
                    while feed.rows and feed.rows[0].seq <= cutoff:
                        feed.rows.popleft()
                feed.rows.extend(row for row in rows if cutoff is None or row.seq > cutoff)
                if len(feed.rows) > FEED_ROWS:
                    feed.rows.clear()
                    feed.after = None

    def _full(self, sink: str, added: OutboxDepth, size: int) -> bool:
        """Whether ``sink`` has no room for an event of ``size`` bytes after ``added``."""
        depth = self.depths[sink]
        waiting = depth.events + added.events
        return waiting > 0 and (waiting >= self.limits.max_events
                                or depth.bytes + added.bytes + size > self.limits.max_bytes)

    def _trim(self, writer: sqlite3.Connection, sink: str, depth: OutboxDepth) -> int | None:
        """Drop the oldest rows beyond the bound; the highest ``seq`` dropped, if any."""
        excess_events = depth.events - self.limits.max_events
        excess_bytes = depth.bytes - self.limits.max_bytes
        if excess_events <= 0 and excess_bytes <= 0:
            return None
        dropped = freed = 0
        cutoff: int | None = None
        cursor = writer.execute("SELECT seq, size FROM outbox WHERE sink = ? ORDER BY seq",
                                (sink,))
        try:
            while dropped < excess_events or freed < excess_bytes:
                rows = cursor.fetchmany(max(excess_events - dropped, 256))
                if not rows:
                    break
                for seq, size in rows:
                    if dropped >= excess_events and freed >= excess_bytes:
                        break
                    dropped += 1
                    freed += size
                    cutoff = seq
        finally:
            cursor.close()
        if cutoff is not None:
            writer.execute("DELETE FROM outbox WHERE sink = ? AND seq <= ?", (sink, cutoff))
            depth.events -= dropped
            depth.bytes -= freed
            depth.dropped += dropped
        return cutoff

    def read(self, writer: sqlite3.Connection, sink: str, after: int,
             limit: int) -> list[OutboxRow]:
        """The oldest ``limit`` rows of ``sink`` after ``seq`` ``after``, in order.

        A read that comes back short has seen every row committed so far: from then on the
        sink's feed holds the rows after it (``take``).
        """
        rows = [OutboxRow(*row) for row in writer.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE sink = ? AND seq > ? ORDER BY seq LIMIT ?",
            (sink, after, limit))]
        feed = self._feeds.get(sink)
        if feed is not None and len(rows) < limit:
            with feed.lock:
                feed.rows.clear()
                feed.after = rows[-1].seq if rows else after
        return rows

    def delete(self, writer: sqlite3.Connection, sink: str, seqs: Sequence[int]) -> int:
        """Delete confirmed rows of ``sink`` in one transaction; returns how many were there.

        Rows already gone (dropped while in flight) are skipped, so the depth stays exact.
        """
        removed = freed = 0
        with writer:
            writer.execute("BEGIN")
            for start in range(0, len(seqs), _DELETE_CHUNK):
                chunk = seqs[start:start + _DELETE_CHUNK]
                sizes = writer.execute(
                    f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(chunk))}) "
                    "RETURNING size", chunk).fetchall()
                removed += len(sizes)
                freed += sum(size for (size,) in sizes)
        depth = self.depths[sink]
        depth.events -= removed
        depth.bytes -= freed
        return removed

    # --- on the event loop ---------------------------------------------------------------------

    def oldest(self, reader: sqlite3.Connection, sink: str) -> float | None:
        """When the oldest row waiting for ``sink`` was stored."""
        row = reader.execute("SELECT created FROM outbox WHERE sink = ? ORDER BY seq LIMIT 1",
                             (sink,)).fetchone()
        return None if row is None else float(row[0])

    def take(self, sink: str, after: int, limit: int) -> list[OutboxRow] | None:
        """Like ``read``, from the sink's feed, without touching SQLite; ``None`` when the feed
        cannot tell (it does not reach back to ``after``): then ``read`` the table.

        Rows taken leave the feed: one connection of the sink takes them.
        """
        feed = self._feeds[sink]
        with feed.lock:
            if feed.after is None or after < feed.after:
                return None
            rows = feed.rows
            while rows and rows[0].seq <= after:
                rows.popleft()
            taken = [rows.popleft() for _ in range(min(limit, len(rows)))]
            feed.after = taken[-1].seq if taken else after
            return taken

    def signal(self, sink: str) -> asyncio.Event:
        """Set whenever rows for ``sink`` were stored; the sink waits on it and clears it."""
        return self._signals[sink]

    def stored(self, sinks: frozenset[str]) -> None:
        """Rows for ``sinks`` were committed: count it and wake them."""
        for sink in sinks:
            self.arrivals[sink] += 1
            self._signals[sink].set()

    def made_room(self) -> None:
        """A sink deleted rows: wake a router waiting for room."""
        self.generation += 1
        self._room.set()

    async def wait_for_room(self, generation: int) -> None:
        """Wait until a sink made room after ``generation`` (taken before the write that found
        the outbox full, so no deletion in between is missed)."""
        while self.generation == generation:
            self._room.clear()
            await self._room.wait()
