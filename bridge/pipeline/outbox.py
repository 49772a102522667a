"""The outbox: what each sink has yet to deliver, kept as a cursor into the store's event log.

Every stored batch is one row of the store's event log (table ``batches``): the JSON of its
events, one per line, numbered by a ``seq`` that only ever grows. A sink's outbox is the events
of the log after its *cursor* that its selector takes. Storing an event costs the outbox no
write of its own, and confirming events costs one small update of the cursor per confirmation
batch instead of a delete per event. The store deletes log rows that every sink has passed.

Confirmations may come out of order (a refused message is published again later): the cursor
moves over a sink's events in order as far as they are confirmed; events confirmed past it are
remembered, so a new pass over the log (after a reconnect or a refusal) skips them.

Once committed, a batch's events are also handed to each sink in memory (its *feed*), so a sink
keeping up takes them from there without reading the log back; it reads the log after a
(re)connect or a refusal, or when its feed lost track (it overflowed while the sink was away).
The bound (events and bytes, per sink) is kept with an explicit policy: ``block`` stores only
the events that fit (the admission gate, ``bridge.pipeline.admission``, decides which and holds
the rest until a sink made room); ``drop_oldest`` moves the sink's cursor past its oldest events
to make room and counts them.

Methods taking a ``writer`` run on the store's writer thread (``Store.run_on_writer``); the
others run on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from bridge.core.model import Event
from bridge.core.sink import OutboxRoute, OutboxRow

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (
    sink TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
"""
"""A sink's cursor: every event of the log up to ``seq`` that the sink takes is confirmed."""

FEED_ROWS = 20_000
"""Rows a sink's feed holds at most; past that it lets go of them and the sink reads the
log until it caught up again."""


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """The bound of each sink's outbox and what happens when it is reached."""

    max_events: int
    max_bytes: int
    drop_oldest: bool = False
    """Move past the oldest events to make room; otherwise block (store only what fits)."""


@dataclass(slots=True)
class OutboxDepth:
    """What waits for one sink, and what was dropped since the store was opened."""

    events: int = 0
    bytes: int = 0
    dropped: int = 0


@dataclass(slots=True)
class _SinkState:
    """One configured sink's place in the log.

    ``lock`` guards ``feed``, ``feed_after``, ``passed``, ``confirmed``, and changes to
    ``cursor`` and ``depth``: the writer thread stores and reads, the event loop takes rows
    and records confirmations.
    """

    route: OutboxRoute
    cursor: int = 0
    depth: OutboxDepth = field(default_factory=OutboxDepth)
    feed: deque[OutboxRow] = field(default_factory=deque)
    feed_after: int | None = None
    """While not ``None``, the feed holds every event of the sink after this ``seq``;
    ``None``: it does not know (never caught up, or it overflowed)."""
    passed: OrderedDict[int, int] = field(default_factory=OrderedDict)
    """Events handed out in this pass over the log, in order, not yet behind the cursor:
    ``seq`` → size."""
    confirmed: set[int] = field(default_factory=set)
    """Events confirmed past the cursor."""
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True, slots=True)
class Drop:
    """Where ``drop_oldest`` moves a sink's cursor to make room, and what that drops."""

    cursor: int
    events: int
    bytes: int


@dataclass(slots=True)
class Admission:
    """Which events of one batch are stored and which sinks take each, decided on the event
    loop (``bridge.pipeline.admission``) before the batch goes to the store's writer."""

    taken: list[int]
    """The indexes of the events that may be stored, in order."""
    held: list[int] = field(default_factory=list)
    """The indexes of the events held back: a sink that takes them is full (``block``), or
    an earlier event of their point is held."""
    events: list[Event] = field(default_factory=list)
    """The taken events, in order."""
    bodies: list[str] = field(default_factory=list)
    """Their JSON."""
    routes: list[tuple[int, ...]] = field(default_factory=list)
    """For each taken event, the indexes of the sinks that take it."""
    addresses: list[tuple[str, ...]] = field(default_factory=list)
    """For each taken event, its address (routing key, topic) at each sink of ``routes``."""
    added: dict[str, list[int]] = field(default_factory=dict)
    """Per sink that takes events of the batch: ``[events, bytes]``."""
    dropped: dict[str, Drop] = field(default_factory=dict)
    """Per sink that loses events to ``drop_oldest`` to make room for the batch."""

    def log_entry(self) -> str:
        """The batch's ``sinks`` column: which sinks take how much of it."""
        return json.dumps(self.added, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class LogRow:
    """One event of the log, as a sink reads it back."""

    seq: int
    created: float
    body: str
    event: Event


def log_events(writer: sqlite3.Connection, after: int, *, sink: str | None = None
               ) -> Iterator[LogRow]:
    """The events of the log after ``seq`` ``after``, in order; with ``sink``, only from batches
    that hold events that sink takes."""
    cursor = writer.execute(
        "SELECT seq, created, sinks, body FROM batches WHERE last > ? ORDER BY seq", (after,))
    try:
        while True:
            batches = cursor.fetchmany(64)
            if not batches:
                return
            for first, created, sinks, body in batches:
                if sink is not None and sink not in json.loads(sinks):
                    continue
                for offset, line in enumerate(body.split("\n")):
                    seq = first + offset
                    if seq > after:
                        yield LogRow(seq, created, line, Event.from_json(line))
    finally:
        cursor.close()


class Outbox:
    """Every sink's cursor, bound and feed."""

    def __init__(self, limits: OutboxLimits, routes: Sequence[OutboxRoute]) -> None:
        self.limits = limits
        self.routes = tuple(routes)
        self._sinks = {route.sink: _SinkState(route) for route in self.routes}
        self._order = [self._sinks[route.sink] for route in self.routes]
        self.depths = {sink: state.depth for sink, state in self._sinks.items()}
        """Live depth per configured sink, kept by the writer thread."""
        self.others: dict[str, tuple[int, int]] = {}
        """Sinks with a cursor in the store that are not configured: ``(cursor, end)``, where
        ``end`` was the log's last ``seq`` when the store was opened. The store keeps their
        events up to ``end``."""
        self.arrivals = {route.sink: 0 for route in self.routes}
        """Counts the batches stored with events for each sink (on the event loop)."""
        self._moved: set[str] = set()
        self._moved_lock = threading.Lock()
        """Sinks whose cursor moved since it was last written (on the writer thread)."""
        self.room_listeners: list[Callable[[], None]] = []
        """Called on the event loop whenever a sink made room (the admission gate)."""
        self._signals = {route.sink: asyncio.Event() for route in self.routes}

    # --- on the writer thread ------------------------------------------------------------------

    def open(self, writer: sqlite3.Connection, last: int) -> None:
        """Create the table if needed, place every sink, and count what waits from an earlier
        run. ``last`` is the log's last ``seq``: a sink new to this store starts after it."""
        writer.executescript(SCHEMA)
        cursors = dict(writer.execute("SELECT sink, seq FROM cursors").fetchall())
        with writer:
            writer.execute("BEGIN")
            for sink, state in self._sinks.items():
                if sink not in cursors:
                    cursors[sink] = last
                    writer.execute("INSERT INTO cursors (sink, seq) VALUES (?, ?)", (sink, last))
                state.cursor = cursors[sink]
        for state in self._order:
            depth = state.depth
            for row in self._pending(writer, state, state.cursor):
                depth.events += 1
                depth.bytes += len(row.body.encode())
        for sink, seq in cursors.items():
            if sink in self._sinks or seq >= last:
                continue
            waiting = sum(1 for _ in log_events(writer, seq, sink=sink))
            if not waiting:
                continue
            self.others[sink] = (seq, last)
            logger.warning("the outbox holds %d events for sink %s, which is not configured "
                           "or not enabled; they are kept until it is", waiting, sink)

    @staticmethod
    def _pending(writer: sqlite3.Connection, state: _SinkState, after: int
                 ) -> Iterator[LogRow]:
        """The sink's events in the log after ``after``, confirmed ones included."""
        accepts = state.route.accepts
        for row in log_events(writer, after, sink=state.route.sink):
            if accepts(row.event):
                yield row

    def plan_drops(self, writer: sqlite3.Connection, admission: Admission, first: int
                   ) -> None:
        """Under ``drop_oldest``, find how far each sink's cursor must move past its oldest
        events for the batch of ``admission`` (to be stored from ``seq`` ``first``) to fit its
        bound, into ``admission.dropped``. Runs before the batch's transaction: it only reads
        the log, and the batch's own events may be among those dropped."""
        if not self.limits.drop_oldest:
            return
        for sink, (events, size) in admission.added.items():
            state = self._sinks[sink]
            depth = state.depth
            excess_events = depth.events + events - self.limits.max_events
            excess_bytes = depth.bytes + size - self.limits.max_bytes
            if excess_events <= 0 and excess_bytes <= 0:
                continue
            dropped = freed = 0
            cursor = state.cursor
            with state.lock:
                confirmed = set(state.confirmed)
            for seq, length in self._drop_candidates(writer, state, admission, first):
                if dropped >= excess_events and freed >= excess_bytes:
                    break
                cursor = seq
                if seq in confirmed:
                    continue
                dropped += 1
                freed += length
            if cursor != state.cursor:
                admission.dropped[sink] = Drop(cursor, dropped, freed)

    def _drop_candidates(self, writer: sqlite3.Connection, state: _SinkState,
                         admission: Admission, first: int) -> Iterator[tuple[int, int]]:
        """``(seq, bytes)`` of the sink's events after its cursor, the batch's included."""
        for row in self._pending(writer, state, state.cursor):
            yield row.seq, len(row.body.encode())
        index = self._order.index(state)
        for offset, taking in enumerate(admission.routes):
            if index in taking:
                yield first + offset, len(admission.bodies[offset].encode())

    def write_drops(self, writer: sqlite3.Connection, admission: Admission) -> None:
        """Write the cursors ``plan_drops`` moved, inside the batch's transaction (after
        ``save``); they move in memory once it is committed (``committed``)."""
        if admission.dropped:
            # A confirmation may have moved a cursor further meanwhile: it never goes back.
            writer.executemany("UPDATE cursors SET seq = ? WHERE sink = ?",
                               [(max(drop.cursor, self._sinks[sink].cursor), sink)
                                for sink, drop in admission.dropped.items()])

    def _apply_drops(self, admission: Admission) -> None:
        for sink, drop in admission.dropped.items():
            state = self._sinks[sink]
            with state.lock:
                if drop.cursor > state.cursor:
                    self._move_locked(state, drop.cursor)
                # Events of this batch may be among those dropped: its counts are added later.
                state.depth.events -= drop.events
                state.depth.bytes -= drop.bytes
                state.depth.dropped += drop.events

    def committed(self, admission: Admission, first: int, created: float) -> frozenset[str]:
        """The batch of ``admission`` is committed at ``seq`` ``first``: move the cursors it
        dropped, count it, and hand its rows to the sinks' feeds (with the addresses computed
        on the event loop). Returns the sinks that got events."""
        self._apply_drops(admission)
        if not admission.added:
            return frozenset()
        for sink, (count, size) in admission.added.items():
            state = self._sinks[sink]
            with state.lock:
                state.depth.events += count
                state.depth.bytes += size
        rows: dict[int, list[OutboxRow]] = {}
        following = {index for index, state in enumerate(self._order)
                     if state.feed_after is not None}
        if following:
            events, bodies = admission.events, admission.bodies
            for offset, (taking, addresses) in enumerate(
                    zip(admission.routes, admission.addresses, strict=True)):
                for index, address in zip(taking, addresses, strict=True):
                    if index not in following:
                        continue
                    event, body = events[offset], bodies[offset]
                    rows.setdefault(index, []).append(OutboxRow(
                        first + offset, event.id, event.source, event.point,
                        event.quality.value, event.ts, created, address,
                        len(body.encode()), body))
        for index, new in rows.items():
            state = self._order[index]
            drop = admission.dropped.get(state.route.sink)
            cutoff = drop.cursor if drop is not None else None
            with state.lock:
                if state.feed_after is None:
                    continue
                feed = state.feed
                if cutoff is not None:
                    while feed and feed[0].seq <= cutoff:
                        feed.popleft()
                    new = [row for row in new if row.seq > cutoff]
                feed.extend(new)
                if len(feed) > FEED_ROWS:
                    feed.clear()
                    state.feed_after = None
        return frozenset(admission.added)

    def read(self, writer: sqlite3.Connection, sink: str, after: int,
             limit: int) -> list[OutboxRow]:
        """The oldest ``limit`` events of ``sink`` after ``seq`` ``after`` not yet confirmed,
        in order. ``after`` at or before the cursor starts a new pass over the log.

        A read that comes back short has seen every event committed so far: from then on the
        sink's feed holds the events after it (``take``).
        """
        state = self._sinks[sink]
        route = state.route
        with state.lock:
            start = max(after, state.cursor)
            if after <= state.cursor:
                state.passed.clear()
            confirmed = set(state.confirmed)
        rows: list[OutboxRow] = []
        for logged in self._pending(writer, state, start):
            if logged.seq in confirmed:
                continue
            event = logged.event
            rows.append(OutboxRow(logged.seq, event.id, event.source, event.point,
                                  event.quality.value, event.ts, logged.created,
                                  route.address(event), len(logged.body.encode()), logged.body))
            if len(rows) >= limit:
                break
        with state.lock:
            for row in rows:
                state.passed[row.seq] = row.size
            if len(rows) < limit:
                state.feed.clear()
                state.feed_after = rows[-1].seq if rows else start
        return rows

    def confirm(self, sink: str, seqs: Sequence[int]) -> int:
        """The broker confirmed these events of ``sink``: move its cursor as far as its events
        are confirmed in order. Returns how many were still waiting (an event dropped while in
        flight may be confirmed late).

        Memory only, on the caller's thread: the cursor is written with the next stored batch
        (``save``); one that lags on disk only means confirmed events are published again
        after a crash.
        """
        state = self._sinks[sink]
        removed = freed = 0
        with state.lock:
            cursor = state.cursor
            passed = state.passed
            confirmed = state.confirmed
            for seq in seqs:
                size = passed.get(seq)
                if size is None or seq in confirmed:
                    continue
                confirmed.add(seq)
                removed += 1
                freed += size
            while passed:
                seq = next(iter(passed))
                if seq not in confirmed:
                    break
                del passed[seq]
                confirmed.discard(seq)
                cursor = seq
            state.depth.events -= removed
            state.depth.bytes -= freed
            if cursor != state.cursor:
                self._move_locked(state, cursor)
                with self._moved_lock:
                    self._moved.add(state.route.sink)
        return removed

    def save(self, writer: sqlite3.Connection) -> None:
        """Write the cursors moved since the last call, inside the caller's transaction."""
        with self._moved_lock:
            moved, self._moved = self._moved, set()
        if moved:
            writer.executemany("UPDATE cursors SET seq = ? WHERE sink = ?",
                               [(self._sinks[sink].cursor, sink) for sink in moved])

    def unsaved(self) -> None:
        """The transaction that was to write the moved cursors failed: write every cursor with
        the next one."""
        with self._moved_lock:
            self._moved.update(self._sinks)

    @staticmethod
    def _move_locked(state: _SinkState, cursor: int) -> None:
        state.cursor = cursor
        passed = state.passed
        while passed and next(iter(passed)) <= cursor:
            passed.popitem(last=False)
        state.confirmed = {seq for seq in state.confirmed if seq > cursor}

    def needed(self, dropped: Mapping[str, Drop] | None = None) -> int:
        """The lowest cursor of the configured sinks, with the moves ``dropped`` plans: the
        log after it must be kept."""
        dropped = dropped or {}
        return min((max(state.cursor, dropped[state.route.sink].cursor)
                    if state.route.sink in dropped else state.cursor
                    for state in self._order), default=1 << 62)

    # --- on the event loop ---------------------------------------------------------------------

    def oldest(self, reader: sqlite3.Connection, sink: str) -> float | None:
        """When the oldest event waiting for ``sink`` was stored."""
        state = self._sinks[sink]
        if not state.depth.events:
            return None
        with state.lock:
            confirmed = set(state.confirmed)
        for row in self._pending(reader, state, state.cursor):
            if row.seq not in confirmed:
                return row.created
        return None

    def take(self, sink: str, after: int, limit: int) -> list[OutboxRow] | None:
        """Like ``read``, from the sink's feed, without touching SQLite; ``None`` when the feed
        cannot tell (it does not reach back to ``after``): then ``read`` the log.

        Rows taken leave the feed: one connection of the sink takes them.
        """
        state = self._sinks[sink]
        with state.lock:
            if state.feed_after is None or after < state.feed_after:
                return None
            rows = state.feed
            while rows and rows[0].seq <= after:
                rows.popleft()
            taken = [rows.popleft() for _ in range(min(limit, len(rows)))]
            state.feed_after = taken[-1].seq if taken else after
            for row in taken:
                state.passed[row.seq] = row.size
            return taken

    def signal(self, sink: str) -> asyncio.Event:
        """Set whenever events for ``sink`` were stored; the sink waits on it and clears it."""
        return self._signals[sink]

    def stored(self, sinks: frozenset[str]) -> None:
        """Events for ``sinks`` were committed: count it and wake them."""
        for sink in sinks:
            self.arrivals[sink] += 1
            self._signals[sink].set()

    def made_room(self) -> None:
        """A sink's events were confirmed: tell the admission gate, which may retry what it
        holds back."""
        for listener in self.room_listeners:
            listener()

    def pending(self, connection: sqlite3.Connection, sink: str) -> list[OutboxRow]:
        """Every event waiting for ``sink`` (not confirmed), in order: for inspection and
        tests, on any connection."""
        state = self._sinks.get(sink)
        if state is None:
            return []
        route = state.route
        with state.lock:
            confirmed = set(state.confirmed)
        return [OutboxRow(row.seq, row.event.id, row.event.source, row.event.point,
                          row.event.quality.value, row.event.ts, row.created,
                          route.address(row.event), len(row.body.encode()), row.body)
                for row in self._pending(connection, state, state.cursor)
                if row.seq not in confirmed]
