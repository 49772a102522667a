"""The embedded store: SQLite in WAL mode holding last values, bounded history and the outbox.

All writes go through one thread owned by the store (SQLite allows one writer), in batches:
one transaction per batch, never one per event; a batch's outbox rows are written in the same
transaction as its history. Reads use a second connection on the caller's thread; WAL lets
them run while a write is in progress.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from bridge.core.model import Event
from bridge.core.sink import OutboxRow
from bridge.errors import StoreError
from bridge.pipeline.outbox import Admission, Outbox, log_events

logger = logging.getLogger(__name__)

_Parameters = ParamSpec("_Parameters")
_Result = TypeVar("_Result")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS latest (
    point TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS latest_mark (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    point TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (point, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    last INTEGER NOT NULL,
    created REAL NOT NULL,
    sinks TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seq_marks (
    at REAL PRIMARY KEY,
    seq INTEGER NOT NULL
);
"""
"""``history`` is clustered by point: a point's rows sit together in ``seq`` order, and storing
an event is one B-tree insert. ``batches`` is the event log, one row per stored batch (its
first and last ``seq``, when it was stored, how many events and bytes each sink takes, and the
events' JSON one per line): the sinks' outbox, the replay of event streams and the last values
not yet in ``latest`` all read it. ``seq_marks`` notes the last ``seq`` at each retention pass,
so history is pruned by age with ``seq`` ranges."""

SCHEMA_VERSION = 2
"""``PRAGMA user_version`` of the layout above. Version 1 (no ``user_version``) kept history in a
rowid table with three indexes and the outbox as one row per event and sink; it is migrated
when opened."""

LOG_BATCH = 5_000
"""Events per log row when an old outbox is migrated."""

SyncMode = Literal["full", "normal"]


@dataclass(frozen=True)
class Retention:
    """How much history is kept."""

    max_age: float
    """Seconds; older rows are pruned."""
    max_rows: int
    """Per point; the oldest rows beyond it are pruned."""


@dataclass(frozen=True)
class Replay:
    """How much of the event log is kept for event streams that resume (``Last-Event-ID``),
    beyond what the sinks still need."""

    max_bytes: int = 64 << 20
    max_age: float = 3600.0


def event_to_json(event: Event) -> str:
    """The event's published JSON, compact (serialized once: a worker process may have done
    it already)."""
    return event.to_json()


def event_from_json(body: str) -> Event:
    """An event back from its published JSON."""
    return Event.from_json(body)


@dataclass(slots=True)
class _LogBatch:
    first: int
    last: int
    size: int
    created: float


class Store:
    """Last values, bounded history and the event log of every point."""

    PRUNE_EVERY = 30.0
    """Seconds between retention passes."""
    LATEST_EVERY = 5.0
    """Seconds between updates of the ``latest`` table (with a batch, in its transaction)."""
    CHECKPOINT_EVERY: float | None = 1.0
    """Seconds between checkpoints of the write-ahead log, made by a thread of their own so the
    writer never waits for one (they copy pages and sync the files); ``None``: SQLite's own
    checkpoints, made by the writer whenever the log reaches 1,000 pages."""
    FALLBACK_CHECKPOINT_PAGES = 16_384
    """The writer still checkpoints when the log reaches this many pages (64 MiB), should the
    checkpoint thread fall behind."""

    def __init__(self, path: Path, retention: Retention, outbox: Outbox | None = None, *,
                 sync: SyncMode = "full", replay: Replay | None = None) -> None:
        self.path = path
        self.retention = retention
        self.outbox = outbox
        """Events waiting for the sinks; ``None`` when no sink is configured."""
        self.sync: SyncMode = sync
        """``full``: every commit is on disk (fsync) before ``write`` returns, so before any
        upstream acknowledgement; ``normal``: a power cut may undo the last commits."""
        self.replay = replay or Replay()
        self._executor: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._rows: Counter[str] = Counter()
        self._last_prune = 0.0
        self._latest: dict[str, tuple[str, float, str]] = {}
        """Last values not yet in the ``latest`` table (on the writer thread)."""
        self._last_latest = 0.0
        self._mark = 0
        """The ``seq`` up to which the ``latest`` table is complete (on the writer thread)."""
        self._next = 1
        """The ``seq`` of the next event stored."""
        self._log: deque[_LogBatch] = deque()
        """The event log's batches, oldest first (on the writer thread)."""
        self._log_bytes = 0
        self.written = 0
        """Events written since open."""
        self._checkpointing: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()

    def open(self) -> None:
        """Create the database if needed (or migrate an older one) and open both
        connections."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
            self._executor.submit(self._open_writer).result()
            self._reader = sqlite3.connect(self.path, check_same_thread=False)
            self._reader.execute("PRAGMA query_only = ON")
            if self.CHECKPOINT_EVERY is not None:
                self._stop_checkpoints.clear()
                self._checkpointing = threading.Thread(
                    target=self._checkpoint, args=(self.CHECKPOINT_EVERY,),
                    name="store-checkpoint", daemon=True)
                self._checkpointing.start()
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc

    def _open_writer(self) -> None:
        writer = sqlite3.connect(self.path, isolation_level=None)
        try:
            writer.execute("PRAGMA journal_mode = WAL")
            # In WAL mode FULL syncs the log at every commit; NORMAL survives a process crash
            # (kill -9) but a power cut can undo the last commits.
            writer.execute(f"PRAGMA synchronous = {self.sync.upper()}")
            if self.CHECKPOINT_EVERY is not None:
                writer.execute(f"PRAGMA wal_autocheckpoint = {self.FALLBACK_CHECKPOINT_PAGES}")
            (version,) = writer.execute("PRAGMA user_version").fetchone()
            if version < SCHEMA_VERSION and _has_column(writer, "history", "id"):
                migrate_v1(writer)
            elif version > SCHEMA_VERSION:
                raise StoreError(f"the store {self.path} was written by a newer release "
                                 f"(layout {version}; this release reads {SCHEMA_VERSION})")
            writer.executescript(_SCHEMA)
            writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            writer.execute("INSERT OR IGNORE INTO latest_mark (id, seq) VALUES (1, 0)")
            (self._mark,) = writer.execute("SELECT seq FROM latest_mark").fetchone()
            for first, last, size, created in writer.execute(
                    "SELECT seq, last, length(body), created FROM batches ORDER BY seq"):
                self._log.append(_LogBatch(first, last, size, created))
                self._log_bytes += size
            (marked,) = writer.execute("SELECT COALESCE(MAX(seq), 0) FROM seq_marks").fetchone()
            last = max(self._log[-1].last if self._log else 0, self._mark, marked)
            self._next = last + 1
            for point, count in writer.execute(
                    "SELECT point, COUNT(*) FROM history GROUP BY point"):
                self._rows[point] = count
            if self.outbox is not None:
                self.outbox.open(writer, last)
        except BaseException:
            writer.close()
            raise
        self._writer = writer

    def _checkpoint(self, every: float) -> None:
        """Copy the write-ahead log into the database every ``every`` seconds (PASSIVE: never
        waits for the writer or the readers; what it cannot copy now it copies next time)."""
        connection = sqlite3.connect(self.path)
        try:
            while not self._stop_checkpoints.wait(every):
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    # Busy or short of disk: the writer's fallback checkpoint still bounds the
                    # log, and the next pass tries again.
                    logger.debug("store checkpoint failed", exc_info=True)
        finally:
            connection.close()

    def close(self) -> None:
        """Close both connections and stop the writer and checkpoint threads."""
        if self._checkpointing is not None:
            self._stop_checkpoints.set()
            self._checkpointing.join()
            self._checkpointing = None
        if self._executor is not None:
            if self._writer is not None:
                self._executor.submit(self._close_writer).result()
                self._writer = None
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _close_writer(self) -> None:
        writer = self._writer
        assert writer is not None
        try:
            with writer:
                writer.execute("BEGIN")
                self._flush_latest(writer, self._latest)
            self._latest.clear()
        finally:
            writer.close()

    async def write(self, events: Sequence[Event], *, force: bool = False) -> int:
        """Store a batch of events in one transaction, off the loop: its history rows and one
        row of the event log, which is also every sink's outbox.

        Returns how many events were stored: all of them, except under the outbox's ``block``
        policy when a sink's outbox is full, where it is the prefix that fit (``force``, at
        shutdown, stores them all).
        """
        if not events:
            return 0
        if self._executor is None:
            raise StoreError("store is not open")
        loop = asyncio.get_running_loop()
        count, sinks = await loop.run_in_executor(self._executor, self._write, list(events),
                                                  force)
        if sinks and self.outbox is not None:
            self.outbox.stored(sinks)
        return count

    def run_on_writer(
        self,
        function: Callable[Concatenate[sqlite3.Connection, _Parameters], _Result],
        *args: _Parameters.args,
        **kwargs: _Parameters.kwargs,
    ) -> asyncio.Future[_Result]:
        """Run ``function(writer, ...)`` on the writer thread, between two batches; await the
        future for its result."""
        if self._executor is None or self._writer is None:
            raise StoreError("store is not open")
        writer = self._writer
        return asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: function(writer, *args, **kwargs))

    def outbox_oldest(self, sink: str) -> float | None:
        """When the oldest event waiting for ``sink`` was stored; ``None`` when none waits."""
        if self.outbox is None:
            return None
        return self.outbox.oldest(self._read(), sink)

    def _write(self, events: list[Event], force: bool) -> tuple[int, frozenset[str]]:
        writer = self._writer
        assert writer is not None
        bodies = [event_to_json(event) for event in events]
        outbox = self.outbox
        admission = (outbox.admit(events, bodies, force=force) if outbox is not None
                     else Admission(len(events)))
        del events[admission.taken:]
        del bodies[admission.taken:]
        if not events:
            return 0, frozenset()
        first = self._next
        last = first + len(events) - 1
        created = time.time()
        now = time.monotonic()
        text = "\n".join(bodies)
        rows = [(event.point, seq, event.ts, body)
                for seq, event, body in zip(range(first, last + 1), events, bodies, strict=True)]
        fresh = {point: (point, ts, body) for point, _, ts, body in rows}
        flush = now - self._last_latest >= self.LATEST_EVERY
        with writer:
            writer.execute("BEGIN")
            writer.execute("INSERT INTO batches (seq, last, created, sinks, body) "
                           "VALUES (?, ?, ?, ?, ?)",
                           (first, last, created, admission.log_entry(), text))
            writer.executemany("INSERT INTO history (point, seq, ts, body) VALUES (?, ?, ?, ?)",
                               rows)
            if outbox is not None:
                outbox.trim(writer, admission)
            if flush:
                self._flush_latest(writer, {**self._latest, **fresh}, last)
            self._trim_log(writer, time.time())
        self._next = last + 1
        self._log.append(_LogBatch(first, last, len(text), created))
        self._log_bytes += len(text)
        # Only values of a committed batch may reach the latest table later.
        if flush:
            self._latest.clear()
            self._last_latest = now
            self._mark = last
        else:
            self._latest.update(fresh)
        sinks: frozenset[str] = frozenset()
        if outbox is not None:
            sinks = outbox.committed(admission, first, created, events, bodies)
        self._rows.update(event.point for event in events)
        self.written += len(events)
        if now - self._last_prune >= self.PRUNE_EVERY:
            self._last_prune = now
            self._prune()
        return len(events), sinks

    def _trim_log(self, writer: sqlite3.Connection, now: float) -> None:
        """Delete the oldest batches of the event log that no sink needs any more, that the
        ``latest`` table covers, and that are beyond what event streams may replay; inside the
        caller's transaction. The newest batch always stays: it holds the last ``seq``."""
        log = self._log
        if len(log) < 2:
            return
        replay = self.replay
        needed = self.outbox.needed() if self.outbox is not None else 1 << 62
        others = list(self.outbox.others.values()) if self.outbox is not None else []
        keep = min(needed, self._mark)
        old = now - replay.max_age
        cutoff: int | None = None
        while len(log) > 1:
            batch = log[0]
            if batch.last > keep or (self._log_bytes - batch.size < replay.max_bytes
                                     and batch.created >= old):
                break
            log.popleft()
            self._log_bytes -= batch.size
            if any(batch.last > seq and batch.first <= end for seq, end in others):
                # Kept for a sink that is not configured now; it stays out of the count.
                continue
            cutoff = batch.first
            if others:
                writer.execute("DELETE FROM batches WHERE seq = ?", (batch.first,))
                cutoff = None
        if cutoff is not None:
            writer.execute("DELETE FROM batches WHERE seq <= ? AND last <= ?", (cutoff, keep))

    def _flush_latest(self, writer: sqlite3.Connection,
                      values: dict[str, tuple[str, float, str]], last: int | None = None) -> None:
        """Write ``values`` (every last value since the previous flush) to the ``latest``
        table, inside the caller's transaction, and move its mark to ``last`` (default: the
        newest stored event)."""
        if not values:
            return
        writer.executemany(
            "INSERT INTO latest (point, ts, body) VALUES (?, ?, ?) "
            "ON CONFLICT (point) DO UPDATE SET ts = excluded.ts, body = excluded.body",
            list(values.values()))
        writer.execute("UPDATE latest_mark SET seq = ?",
                       (self._next - 1 if last is None else last,))

    def _prune(self) -> None:
        writer = self._writer
        assert writer is not None
        now = time.time()
        limit = self.retention.max_rows
        with writer:
            writer.execute("BEGIN")
            # The log after the mark holds last values the latest table does not have yet.
            self._flush_latest(writer, self._latest)
            if self._latest:
                self._mark = self._next - 1
            writer.execute("INSERT OR REPLACE INTO seq_marks (at, seq) VALUES (?, ?)",
                           (now, self._next - 1))
            # By arrival time (the marks): a device clock that is off must not wipe its own
            # history.
            (cutoff,) = writer.execute("SELECT MAX(seq) FROM seq_marks WHERE at < ?",
                                       (now - self.retention.max_age,)).fetchone()
            points = list(self._rows)
            if cutoff is not None:
                writer.executemany("DELETE FROM history WHERE point = ? AND seq <= ?",
                                   [(point, cutoff) for point in points])
                writer.execute("DELETE FROM seq_marks WHERE seq < ?", (cutoff,))
            for point, count in list(self._rows.items()):
                if count <= limit:
                    continue
                writer.execute(
                    "DELETE FROM history WHERE point = ? AND seq <= ("
                    "SELECT seq FROM history WHERE point = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (point, point, limit))
            self._trim_log(writer, now)
        self._latest.clear()
        self._last_latest = time.monotonic()
        self._rows = Counter(dict(
            writer.execute("SELECT point, COUNT(*) FROM history GROUP BY point").fetchall()))

    async def prune(self) -> None:
        """Apply retention now."""
        if self._executor is None:
            raise StoreError("store is not open")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._prune)

    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StoreError("store is not open")
        return self._reader

    def latest(self) -> dict[str, Event]:
        """The last stored event of every point."""
        reader = self._read()
        with reader:
            # One read transaction: the table and the log after its mark agree.
            reader.execute("BEGIN")
            (mark,) = reader.execute("SELECT seq FROM latest_mark WHERE id = 1").fetchone()
            events = {point: event_from_json(body) for point, body in
                      reader.execute("SELECT point, body FROM latest")}
            for row in log_events(reader, mark):
                events[row.event.point] = row.event
        return events

    @property
    def is_open(self) -> bool:
        """Whether the store can be read and written."""
        return self._reader is not None and self._executor is not None

    def history(
        self,
        point: str,
        *,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        newest_first: bool = True,
    ) -> list[Event]:
        """A point's stored events between two times, newest first by default."""
        bodies = self.history_json(point, since=since, until=until, limit=limit,
                                   newest_first=newest_first)
        return [event_from_json(body) for body in bodies]

    def history_json(
        self,
        point: str,
        *,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        newest_first: bool = True,
    ) -> list[str]:
        """Like ``history``, as the stored JSON bodies (the API joins them unparsed)."""
        clauses = ["point = ?"]
        arguments: list[Any] = [point]
        if since is not None:
            clauses.append("ts >= ?")
            arguments.append(since)
        if until is not None:
            clauses.append("ts <= ?")
            arguments.append(until)
        order = "DESC" if newest_first else "ASC"
        arguments.append(limit)
        rows = self._read().execute(
            f"SELECT body FROM history WHERE {' AND '.join(clauses)} "
            f"ORDER BY seq {order} LIMIT ?", arguments).fetchall()
        return [body for (body,) in rows]

    def history_count(self, point: str) -> int:
        """How many history rows a point has."""
        row = self._read().execute("SELECT COUNT(*) FROM history WHERE point = ?",
                                   (point,)).fetchone()
        return int(row[0])

    def history_seq(self, event_id: str) -> int | None:
        """The position (``seq``) of a stored event in the event log; ``None`` when the log
        no longer holds it (or it was never stored here)."""
        needle = f'"id":{json.dumps(event_id)}'
        row = self._read().execute(
            "SELECT seq, body FROM batches WHERE instr(body, ?) > 0 ORDER BY seq DESC LIMIT 1",
            (needle,)).fetchone()
        if row is None:
            return None
        first, body = row
        for offset, line in enumerate(body.split("\n")):
            if needle in line:
                return int(first) + offset
        return None

    def history_after(self, seq: int, *, limit: int) -> list[tuple[int, str, str, str]]:
        """At most ``limit`` events stored after position ``seq``, in store order, as
        ``(seq, id, point, body)``: what an event stream resuming from ``seq`` replays."""
        rows: list[tuple[int, str, str, str]] = []
        for row in log_events(self._read(), seq):
            rows.append((row.seq, row.event.id, row.event.point, row.body))
            if len(rows) >= limit:
                break
        return rows

    def outbox_rows(self, sink: str) -> list[OutboxRow]:
        """Every event waiting for ``sink``, in order (for inspection)."""
        if self.outbox is None:
            return []
        return self.outbox.pending(self._read(), sink)


def _has_column(connection: sqlite3.Connection, table: str, column: str) -> bool:
    return any(row[1] == column for row in connection.execute(f"PRAGMA table_info({table})"))


def migrate_v1(writer: sqlite3.Connection) -> None:
    """Turn a store of layout 1 into layout 2, in one transaction: the history keeps its
    ``seq``s, last values not yet in ``latest`` are written there, and the outbox rows of each
    sink become batches of the event log that only that sink takes, after its cursor."""
    logger.info("migrating the store to layout %d", SCHEMA_VERSION)
    with writer:
        writer.execute("BEGIN")
        writer.execute("CREATE TABLE IF NOT EXISTS latest ("
                       "point TEXT PRIMARY KEY, ts REAL NOT NULL, body TEXT NOT NULL)")
        mark = 0
        if _has_table(writer, "latest_mark"):
            row = writer.execute("SELECT seq FROM latest_mark WHERE id = 1").fetchone()
            mark = int(row[0]) if row is not None else 0
        writer.execute(
            "INSERT INTO latest (point, ts, body) "
            "SELECT point, ts, body FROM history WHERE seq > ? ORDER BY seq "
            "ON CONFLICT (point) DO UPDATE SET ts = excluded.ts, body = excluded.body", (mark,))
        writer.execute("CREATE TABLE history_v2 ("
                       "point TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, "
                       "body TEXT NOT NULL, PRIMARY KEY (point, seq)) WITHOUT ROWID")
        writer.execute("INSERT INTO history_v2 (point, seq, ts, body) "
                       "SELECT point, seq, ts, body FROM history")
        writer.execute("CREATE TABLE IF NOT EXISTS seq_marks ("
                       "at REAL PRIMARY KEY, seq INTEGER NOT NULL)")
        writer.execute("INSERT OR REPLACE INTO seq_marks (at, seq) "
                       "SELECT MAX(received_at), MAX(seq) FROM history "
                       "GROUP BY CAST(received_at / 60 AS INTEGER)")
        (last,) = writer.execute("SELECT COALESCE(MAX(seq), 0) FROM history").fetchone()
        if _has_table(writer, "sqlite_sequence"):
            row = writer.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'history'").fetchone()
            if row is not None:
                last = max(last, int(row[0]))
        writer.execute("DROP TABLE history")
        writer.execute("ALTER TABLE history_v2 RENAME TO history")
        writer.execute("CREATE TABLE IF NOT EXISTS batches ("
                       "seq INTEGER PRIMARY KEY, last INTEGER NOT NULL, created REAL NOT NULL, "
                       "sinks TEXT NOT NULL, body TEXT NOT NULL)")
        writer.execute("CREATE TABLE IF NOT EXISTS cursors ("
                       "sink TEXT PRIMARY KEY, seq INTEGER NOT NULL)")
        if _has_table(writer, "outbox"):
            start = last
            sinks = [sink for (sink,) in writer.execute(
                "SELECT DISTINCT sink FROM outbox ORDER BY sink").fetchall()]
            for sink in sinks:
                writer.execute("INSERT OR REPLACE INTO cursors (sink, seq) VALUES (?, ?)",
                               (sink, start))
                rows = writer.execute("SELECT created, size, body FROM outbox WHERE sink = ? "
                                      "ORDER BY seq", (sink,))
                while chunk := rows.fetchmany(LOG_BATCH):
                    first = last + 1
                    last += len(chunk)
                    writer.execute(
                        "INSERT INTO batches (seq, last, created, sinks, body) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (first, last, min(created for created, _, _ in chunk),
                         json.dumps({sink: [len(chunk), sum(size for _, size, _ in chunk)]},
                                    separators=(",", ":")),
                         "\n".join(body for _, _, body in chunk)))
            writer.execute("DROP TABLE outbox")
        writer.execute("CREATE TABLE IF NOT EXISTS latest_mark ("
                       "id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL)")
        writer.execute("INSERT OR REPLACE INTO latest_mark (id, seq) VALUES (1, ?)", (last,))
        writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _has_table(connection: sqlite3.Connection, name: str) -> bool:
    return connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                              (name,)).fetchone() is not None
