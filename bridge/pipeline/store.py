"""The embedded store: SQLite in WAL mode holding last values, bounded history and the outbox.

All writes go through one thread owned by the store (SQLite allows one writer), in batches:
one transaction per batch, never one per event; a batch's outbox rows are written in the same
transaction as its history. Reads use a second connection on the caller's thread; WAL lets
them run while a write is in progress.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sqlite3
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, Literal, ParamSpec, TypeVar

from bridge.core.model import Event
from bridge.core.sink import OutboxRow
from bridge.errors import StoreError, StoreFullError
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
    id INTEGER PRIMARY KEY,
    point TEXT NOT NULL,
    seq INTEGER NOT NULL,
    last INTEGER NOT NULL,
    count INTEGER NOT NULL,
    seqs BLOB NOT NULL,
    tss BLOB NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_point ON history (point, seq);
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
"""``history`` holds each point's events in chunks: one row per point and flush (every
``LATEST_EVERY`` seconds, or when the point has ``CHUNK_EVENTS`` waiting), with the events'
``seq``s and times packed and their JSON one per line, so storing an event costs a share of one
row, not a row and its index entries. What is not in a chunk yet is in memory and in the event
log. ``batches`` is the event log, one row per stored batch (its
first and last ``seq``, when it was stored, how many events and bytes each sink takes, and the
events' JSON one per line): the sinks' outbox, the replay of event streams and the last values
not yet in ``latest`` all read it. ``seq_marks`` notes the last ``seq`` at each retention pass,
so history is pruned by age with ``seq`` ranges."""

SCHEMA_VERSION = 3
"""``PRAGMA user_version`` of the layout above. Version 1 (no ``user_version``) kept history in a
rowid table with three indexes and the outbox as one row per event and sink; version 2 one
history row per event. Both are migrated when opened."""

CHUNK_EVENTS = 128
"""A point's events written as one history row at most (sooner at each flush)."""
PENDING_BYTES = 8 << 20
"""Event JSON waiting in memory for its history rows, at most: past it every point is
flushed."""

LOG_BATCH = 5_000
"""Events per log row when an old outbox is migrated."""

SPACE_EVERY = 1.0
"""Seconds between two looks at the free space, while it is well above the reserve."""

SyncMode = Literal["full", "normal"]


@dataclass(frozen=True)
class Retention:
    """How much history is kept."""

    max_age: float
    """Seconds; older rows are pruned."""
    max_rows: int
    """Per point; the oldest rows beyond it are pruned."""
    max_bytes: int | None = None
    """Event JSON of all points together; the oldest history beyond it is pruned."""


def disk_problem(exc: BaseException) -> str | None:
    """Why a write failed when the disk is to blame (full, over quota or failing), as the
    status reports it; ``None`` for any other failure."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
            return "disk full"
        if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
            return f"disk error: {exc}"
        return None
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    if isinstance(exc, OSError) and exc.errno == errno.EIO:
        return f"disk error: {exc.strerror}"
    return None


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


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
class _Chunk:
    """A point's events not yet in a history row."""

    seqs: list[int] = field(default_factory=list)
    tss: list[float] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)

    def row(self, point: str) -> tuple[str, int, int, int, bytes, bytes, str]:
        """The history row of these events."""
        return (point, self.seqs[0], self.seqs[-1], len(self.seqs),
                array("q", self.seqs).tobytes(), array("d", self.tss).tobytes(),
                "\n".join(self.bodies))


_INSERT_CHUNK = ("INSERT INTO history (point, seq, last, count, seqs, tss, body) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)")


def _unpack(seqs: bytes, tss: bytes, body: str) -> tuple[array[int], array[float], list[str]]:
    return array("q", seqs), array("d", tss), body.split("\n")


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
                 sync: SyncMode = "full", replay: Replay | None = None,
                 min_free: int = 64 << 20) -> None:
        self.path = path
        self.retention = retention
        self.outbox = outbox
        """Events waiting for the sinks; ``None`` when no sink is configured."""
        self.sync: SyncMode = sync
        """``full``: every commit is on disk (fsync) before ``write`` returns, so before any
        upstream acknowledgement; ``normal``: a power cut may undo the last commits."""
        self.replay = replay or Replay()
        self.min_free = min_free
        """Bytes of the disk kept free: below it the store refuses batches (``StoreFullError``)
        before SQLite runs out of room mid-transaction."""
        self.problem: str | None = None
        """Why the store cannot write now (``disk full: ...``); ``None`` while it can."""
        self._space_at = -SPACE_EVERY
        self._free = 0
        self._history_bytes = 0
        """Characters of event JSON in history rows, not counting the newlines between them
        (on the writer thread)."""
        self._executor: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._rows: Counter[str] = Counter()
        self._last_prune = 0.0
        self._latest: dict[str, tuple[str, float, str]] = {}
        """Last values not yet in the ``latest`` table (on the writer thread)."""
        self._last_latest = 0.0
        self._mark = 0
        """The ``seq`` up to which the ``latest`` table and the history rows are complete (on
        the writer thread)."""
        self._pending: dict[str, _Chunk] = {}
        """Each point's events not yet in a history row; ``_pending_lock`` guards it (readers
        of the history take a copy)."""
        self._pending_lock = threading.Lock()
        self._pending_bytes = 0
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
            problem = disk_problem(exc)
            if problem is not None:
                self.problem = problem
                raise StoreFullError(f"cannot open store {self.path}: {problem}") from exc
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self.problem = None

    def _open_writer(self) -> None:
        self._rows.clear()
        self._log.clear()
        self._log_bytes = 0
        self._pending.clear()
        self._pending_bytes = 0
        self._latest.clear()
        writer = sqlite3.connect(self.path, isolation_level=None)
        try:
            writer.execute("PRAGMA journal_mode = WAL")
            # In WAL mode FULL syncs the log at every commit; NORMAL survives a process crash
            # (kill -9) but a power cut can undo the last commits.
            writer.execute(f"PRAGMA synchronous = {self.sync.upper()}")
            if self.CHECKPOINT_EVERY is not None:
                writer.execute(f"PRAGMA wal_autocheckpoint = {self.FALLBACK_CHECKPOINT_PAGES}")
            (version,) = writer.execute("PRAGMA user_version").fetchone()
            if version < 2 and _has_column(writer, "history", "received_at"):
                migrate_v1(writer)
                version = 2
            if version == 2:
                migrate_v2(writer)
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
            # The size of the history reads every row whole: only when it is bounded.
            sizes = "SUM(length(body) - count + 1)" if self.retention.max_bytes is not None else "0"
            self._history_bytes = 0
            for point, count, size in writer.execute(
                    f"SELECT point, SUM(count), {sizes} FROM history GROUP BY point"):
                self._rows[point] = count
                self._history_bytes += size
            self._recover_pending(writer)
            if self.outbox is not None:
                self.outbox.open(writer, last)
        except BaseException:
            writer.close()
            raise
        self._writer = writer

    def _recover_pending(self, writer: sqlite3.Connection) -> None:
        """The events after the mark that no history row holds (the daemon stopped before
        writing them), back from the event log."""
        written: dict[str, int] = {}
        for row in log_events(writer, self._mark):
            point = row.event.point
            if point not in written:
                (last,) = writer.execute("SELECT COALESCE(MAX(last), 0) FROM history "
                                         "WHERE point = ?", (point,)).fetchone()
                written[point] = last
            if row.seq > written[point]:
                self._add_pending(point, row.seq, row.event.ts, row.body)

    def _add_pending(self, point: str, seq: int, ts: float, body: str) -> _Chunk:
        chunk = self._pending.get(point)
        if chunk is None:
            chunk = self._pending[point] = _Chunk()
        chunk.seqs.append(seq)
        chunk.tss.append(ts)
        chunk.bodies.append(body)
        self._pending_bytes += len(body)
        return chunk

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
                if self.outbox is not None:
                    self.outbox.save(writer)
            self._latest.clear()
            self._committed_flush()
        except sqlite3.Error as exc:
            problem = disk_problem(exc)
            if problem is None:
                raise
            # Everything flushed here is in the event log too: the next start recovers it.
            logger.warning("store: %s at close; the last values and history are recovered "
                           "from the event log at the next start", problem)
        finally:
            writer.close()

    async def write(self, events: Sequence[Event], *, force: bool = False) -> int:
        """Store a batch of events in one transaction, off the loop: its history rows and one
        row of the event log, which is also every sink's outbox.

        Returns how many events were stored: all of them, except under the outbox's ``block``
        policy when a sink's outbox is full (``hold`` tells which; ``force``, at shutdown,
        stores them all).
        """
        return len((await self.hold(events, force=force)).taken)

    async def hold(self, events: Sequence[Event], *, force: bool = False,
                   held_points: Collection[str] = ()) -> Admission:
        """Like ``write``: which events were stored (``taken``) and which held back
        (``held``: a sink that takes them is full, or an earlier event of their point, or of
        ``held_points``, was held)."""
        if not events:
            return Admission([])
        if self._executor is None:
            raise StoreError("store is not open")
        loop = asyncio.get_running_loop()
        admission, sinks = await loop.run_in_executor(
            self._executor, self._write, list(events), force, held_points)
        if sinks and self.outbox is not None:
            self.outbox.stored(sinks)
        return admission

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

    def _write(self, events: list[Event], force: bool, held_points: Collection[str] = ()
               ) -> tuple[Admission, frozenset[str]]:
        """Store a batch, or raise ``StoreFullError`` with nothing of it stored (in the file or in
        memory) when the disk cannot take it."""
        self._check_space()
        first = self._next
        try:
            result = self._write_batch(events, force, held_points)
        except (sqlite3.Error, OSError) as exc:
            problem = disk_problem(exc)
            if problem is None:
                raise
            self._undo(first)
            self.problem = problem
            raise StoreFullError(f"cannot write to the store {self.path}: {problem}") from exc
        self.problem = None
        return result

    def _check_space(self) -> None:
        """Raise ``StoreFullError`` when less than ``min_free`` bytes are left for the store
        (on the writer thread)."""
        if self.min_free <= 0:
            return
        if (time.monotonic() - self._space_at < SPACE_EVERY
                and self._free >= 2 * self.min_free):
            return
        problem = self.space_problem(self._writer)
        if problem is not None:
            self.problem = problem
            raise StoreFullError(f"the store pauses: {problem}")

    def space_problem(self, connection: sqlite3.Connection | None = None) -> str | None:
        """Whether the store is below its ``min_free`` reserve now: free space on its disk,
        and free pages inside the file that SQLite reuses first; ``None`` when it is not."""
        if self.min_free <= 0:
            return None
        stat = os.statvfs(self.path.parent)
        free = stat.f_bavail * stat.f_frsize
        connection = connection or self._reader
        if free < 2 * self.min_free and connection is not None:
            (pages,) = connection.execute("PRAGMA freelist_count").fetchone()
            (page_size,) = connection.execute("PRAGMA page_size").fetchone()
            free += pages * page_size
        # Also read by the writer: the next batch looks again when space is short.
        self._free = free
        self._space_at = time.monotonic()
        if free >= self.min_free:
            return None
        return (f"disk full: {_size(free)} free for {self.path.parent}, below "
                f"store.min_free ({_size(self.min_free)})")

    def _undo(self, first: int) -> None:
        """Forget a batch from ``seq`` ``first`` whose transaction failed: its events in the
        pending chunks, and the cursors the outbox moved with it (written again next time)."""
        with self._pending_lock:
            for point in list(self._pending):
                chunk = self._pending[point]
                while chunk.seqs and chunk.seqs[-1] >= first:
                    chunk.seqs.pop()
                    chunk.tss.pop()
                    self._pending_bytes -= len(chunk.bodies.pop())
                if not chunk.seqs:
                    del self._pending[point]
        if self.outbox is not None:
            self.outbox.unsaved()

    def _write_batch(self, events: list[Event], force: bool, held_points: Collection[str]
                     ) -> tuple[Admission, frozenset[str]]:
        writer = self._writer
        assert writer is not None
        bodies = [event_to_json(event) for event in events]
        outbox = self.outbox
        admission = (outbox.admit(events, bodies, force=force, held_points=held_points)
                     if outbox is not None else Admission(list(range(len(events)))))
        if admission.held:
            events = [events[index] for index in admission.taken]
            bodies = [bodies[index] for index in admission.taken]
        if not events:
            return admission, frozenset()
        first = self._next
        last = first + len(events) - 1
        created = time.time()
        now = time.monotonic()
        text = "\n".join(bodies)
        fresh: dict[str, tuple[str, float, str]] = {}
        full: list[str] = []
        with self._pending_lock:
            for seq, event, body in zip(range(first, last + 1), events, bodies, strict=True):
                point = event.point
                fresh[point] = (point, event.ts, body)
                if len(self._add_pending(point, seq, event.ts, body).seqs) == CHUNK_EVENTS:
                    full.append(point)
        flush = (now - self._last_latest >= self.LATEST_EVERY
                 or self._pending_bytes >= PENDING_BYTES)
        with writer:
            writer.execute("BEGIN")
            writer.execute("INSERT INTO batches (seq, last, created, sinks, body) "
                           "VALUES (?, ?, ?, ?, ?)",
                           (first, last, created, admission.log_entry(), text))
            if outbox is not None:
                outbox.trim(writer, admission)
                outbox.save(writer)
            if flush:
                self._flush_latest(writer, {**self._latest, **fresh}, last)
            elif full:
                writer.executemany(_INSERT_CHUNK,
                                   [self._pending[point].row(point) for point in full])
            self._trim_log(writer, time.time())
        if flush:
            self._committed_flush()
        elif full:
            self._committed_chunks(full)
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
        self.written += len(events)
        if now - self._last_prune >= self.PRUNE_EVERY:
            self._last_prune = now
            try:
                self._prune()
            except sqlite3.Error as exc:
                # The batch is stored; retention is tried again at the next pass.
                problem = disk_problem(exc)
                if problem is None:
                    raise
                logger.warning("store: retention pass failed: %s", problem)
        return admission, sinks

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
        if not values and not self._pending:
            return
        if self._pending:
            writer.executemany(_INSERT_CHUNK, [chunk.row(point)
                                               for point, chunk in self._pending.items()])
        writer.executemany(
            "INSERT INTO latest (point, ts, body) VALUES (?, ?, ?) "
            "ON CONFLICT (point) DO UPDATE SET ts = excluded.ts, body = excluded.body",
            list(values.values()))
        writer.execute("UPDATE latest_mark SET seq = ?",
                       (self._next - 1 if last is None else last,))

    def _committed_flush(self) -> None:
        """Every pending chunk is in a committed history row now."""
        with self._pending_lock:
            for point, chunk in self._pending.items():
                self._rows[point] += len(chunk.seqs)
            self._history_bytes += self._pending_bytes
            self._pending.clear()
            self._pending_bytes = 0

    def _committed_chunks(self, points: Sequence[str]) -> None:
        """The full chunks of ``points`` are in committed history rows now."""
        with self._pending_lock:
            for point in points:
                chunk = self._pending.pop(point)
                self._rows[point] += len(chunk.seqs)
                size = sum(len(body) for body in chunk.bodies)
                self._pending_bytes -= size
                self._history_bytes += size

    def _prune(self) -> None:
        writer = self._writer
        assert writer is not None
        now = time.time()
        limit = self.retention.max_rows
        with writer:
            writer.execute("BEGIN")
            # The log after the mark holds last values and history the tables do not have yet.
            flushed = bool(self._latest or self._pending)
            self._flush_latest(writer, self._latest)
            writer.execute("INSERT OR REPLACE INTO seq_marks (at, seq) VALUES (?, ?)",
                           (now, self._next - 1))
            # By arrival time (the marks): a device clock that is off must not wipe its own
            # history.
            (cutoff,) = writer.execute("SELECT MAX(seq) FROM seq_marks WHERE at < ?",
                                       (now - self.retention.max_age,)).fetchone()
            if cutoff is not None:
                writer.execute("DELETE FROM seq_marks WHERE seq < ?", (cutoff,))
        if flushed:
            self._mark = self._next - 1
            self._committed_flush()
        self._latest.clear()
        self._last_latest = time.monotonic()
        with writer:
            writer.execute("BEGIN")
            for point in list(self._rows):
                self._trim_history(writer, point, cutoff, limit)
            if self.retention.max_bytes is not None:
                self._trim_bytes(writer, self.retention.max_bytes)
            if self.outbox is not None:
                self.outbox.save(writer)
            self._trim_log(writer, now)

    def _trim_history(self, writer: sqlite3.Connection, point: str, cutoff: int | None,
                      limit: int) -> None:
        """Drop a point's events up to ``seq`` ``cutoff`` and its oldest beyond ``limit``,
        inside the caller's transaction: whole rows, and the one row that straddles the line
        rewritten without them."""
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
                self._history_bytes -= len(body) - count + 1
                continue
            numbers, times, bodies = _unpack(seqs, tss, body)
            drop = max(excess - removed,
                       sum(1 for seq in numbers if cutoff is not None and seq <= cutoff))
            if drop > 0:
                rest = _Chunk(list(numbers[drop:]), list(times[drop:]), bodies[drop:])
                _, first, new_last, new_count, packed, packed_ts, text = rest.row(point)
                writer.execute("UPDATE history SET seq = ?, last = ?, count = ?, seqs = ?, "
                               "tss = ?, body = ? WHERE id = ?",
                               (first, new_last, new_count, packed, packed_ts, text, row_id))
                removed += drop
                self._history_bytes -= len(body) - len(text) - drop
            break
        self._forget_rows(point, removed)

    def _forget_rows(self, point: str, removed: int) -> None:
        if removed:
            self._rows[point] -= removed
            if self._rows[point] <= 0:
                del self._rows[point]

    def _trim_bytes(self, writer: sqlite3.Connection, limit: int) -> None:
        """Drop the oldest history rows, of any point, while the history holds more than
        ``limit`` bytes of event JSON; inside the caller's transaction."""
        excess = self._history_bytes - limit
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
            self._history_bytes -= size
            excess -= size
        oldest.close()
        writer.executemany("DELETE FROM history WHERE id = ?", doomed)

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
        """Like ``history``, as the stored JSON bodies (the API joins them unparsed).

        The events still in memory are taken first, then the history rows: an event flushed
        in between is found in both and counted once.
        """
        with self._pending_lock:
            chunk = self._pending.get(point)
            fresh = (list(zip(chunk.seqs, chunk.tss, chunk.bodies, strict=True))
                     if chunk is not None else [])
        order = "DESC" if newest_first else "ASC"
        rows = self._read().execute(
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
                events = list(zip(*_unpack(seqs, tss, body), strict=True))
                if take(reversed(events) if newest_first else events):
                    return found
            if not newest_first:
                take(fresh)
        finally:
            rows.close()
        return found

    def history_count(self, point: str) -> int:
        """How many events of a point the history holds."""
        with self._pending_lock:
            chunk = self._pending.get(point)
            pending = set(chunk.seqs) if chunk is not None else set()
        (count,) = self._read().execute(
            "SELECT COALESCE(SUM(count), 0) FROM history WHERE point = ?", (point,)).fetchone()
        if pending:
            (last,) = self._read().execute(
                "SELECT COALESCE(MAX(last), 0) FROM history WHERE point = ?",
                (point,)).fetchone()
            pending = {seq for seq in pending if seq > last}
        return int(count) + len(pending)

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
    """Turn a store of layout 1 into layout 2 (``migrate_v2`` follows), in one transaction:
    the history keeps its ``seq``s, last values not yet in ``latest`` are written there, and the
    outbox rows of each sink become batches of the event log that only that sink takes, after
    its cursor."""
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
        writer.execute("PRAGMA user_version = 2")


def migrate_v2(writer: sqlite3.Connection) -> None:
    """Turn a store of layout 2 into layout 3, in one transaction: each point's history rows
    become chunks of up to ``CHUNK_EVENTS`` events."""
    logger.info("migrating the store's history to layout %d", SCHEMA_VERSION)
    with writer:
        writer.execute("BEGIN")
        writer.execute("ALTER TABLE history RENAME TO history_rows")
        writer.execute("CREATE TABLE history (id INTEGER PRIMARY KEY, point TEXT NOT NULL, "
                       "seq INTEGER NOT NULL, last INTEGER NOT NULL, count INTEGER NOT NULL, "
                       "seqs BLOB NOT NULL, tss BLOB NOT NULL, body TEXT NOT NULL)")
        writer.execute("CREATE INDEX history_point ON history (point, seq)")
        rows: list[tuple[str, int, int, int, bytes, bytes, str]] = []
        chunk = _Chunk()
        current: str | None = None
        events = writer.execute("SELECT point, seq, ts, body FROM history_rows "
                                "ORDER BY point, seq")
        for point, seq, ts, body in events:
            if current is not None and (point != current or len(chunk.seqs) >= CHUNK_EVENTS):
                rows.append(chunk.row(current))
                chunk = _Chunk()
                if len(rows) >= 1000:
                    writer.executemany(_INSERT_CHUNK, rows)
                    rows.clear()
            current = point
            chunk.seqs.append(seq)
            chunk.tss.append(ts)
            chunk.bodies.append(body)
        if current is not None:
            rows.append(chunk.row(current))
        writer.executemany(_INSERT_CHUNK, rows)
        writer.execute("DROP TABLE history_rows")
        writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _has_table(connection: sqlite3.Connection, name: str) -> bool:
    return connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                              (name,)).fetchone() is not None
