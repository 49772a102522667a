"""The outbox: events kept in the store for the sinks until the broker confirmed them.

The store's writer thread adds the rows in the same transaction as history and last values,
one row per (sink, event), so each sink reads its own rows in ``seq`` order and deletes them
once they are confirmed. The bound (events and bytes, per sink) is kept with an explicit policy:
``block`` stores only the events that fit and has the router wait until a sink made room;
``drop_oldest`` deletes the oldest rows to make room and counts them.

Methods taking a ``writer`` run on the store's writer thread (``Store.run_on_writer``); the
others run on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bridge.model import Event

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


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """The bound of each sink's outbox and what happens when it is reached."""

    max_events: int
    max_bytes: int
    drop_oldest: bool = False
    """Delete the oldest rows to make room; otherwise block (store only what fits)."""


@dataclass(frozen=True, slots=True)
class OutboxRoute:
    """Which events one sink takes, and the address (routing key) each is published to."""

    sink: str
    accepts: Callable[[Event], bool]
    address: Callable[[Event], str]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One event waiting for one sink."""

    seq: int
    id: str
    source: str
    point: str
    quality: str
    ts: float
    created: float
    """When the row was stored (POSIX seconds)."""
    address: str
    size: int
    """Bytes of ``body`` (UTF-8)."""
    body: str
    """The event's documented JSON."""


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
               *, force: bool = False) -> tuple[int, frozenset[str]]:
        """Add rows for ``events`` inside the caller's transaction.

        Returns how many events (a prefix) were taken, and the sinks that got rows. With the
        ``block`` policy that prefix ends at the first event a sink has no room for, unless
        ``force``; a sink with an empty outbox always takes one event, however large.
        """
        limits = self.limits
        block = not (limits.drop_oldest or force)
        created = time.time()
        added = {route.sink: OutboxDepth() for route in self.routes}
        rows: list[tuple[object, ...]] = []
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
                rows.append((route.sink, event.id, event.source, event.point,
                             event.quality.value, event.ts, created, route.address(event), size,
                             body))
            taken += 1
        writer.executemany(f"INSERT INTO outbox (sink, {_COLUMNS.removeprefix('seq, ')}) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        touched = []
        for sink, extra in added.items():
            if extra.events:
                depth = self.depths[sink]
                depth.events += extra.events
                depth.bytes += extra.bytes
                touched.append(sink)
                if limits.drop_oldest:
                    self._trim(writer, sink, depth)
        return taken, frozenset(touched)

    def _full(self, sink: str, added: OutboxDepth, size: int) -> bool:
        """Whether ``sink`` has no room for an event of ``size`` bytes after ``added``."""
        depth = self.depths[sink]
        waiting = depth.events + added.events
        return waiting > 0 and (waiting >= self.limits.max_events
                                or depth.bytes + added.bytes + size > self.limits.max_bytes)

    def _trim(self, writer: sqlite3.Connection, sink: str, depth: OutboxDepth) -> None:
        excess_events = depth.events - self.limits.max_events
        excess_bytes = depth.bytes - self.limits.max_bytes
        if excess_events <= 0 and excess_bytes <= 0:
            return
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

    def read(self, writer: sqlite3.Connection, sink: str, after: int,
             limit: int) -> list[OutboxRow]:
        """The oldest ``limit`` rows of ``sink`` after ``seq`` ``after``, in order."""
        return [OutboxRow(*row) for row in writer.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE sink = ? AND seq > ? ORDER BY seq LIMIT ?",
            (sink, after, limit))]

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
