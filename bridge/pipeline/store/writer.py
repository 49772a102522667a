"""The store's writer: one thread owning SQLite's one write connection, the batch transaction,
the checkpoint thread, and the read connection the other parts of the store read on.

All writes go through the writer thread, in batches: one transaction per batch, never one per
event; a batch's event-log row (which is also every sink's outbox) is written in the same
transaction as its history. What goes in a batch, and which sinks take each event, is decided
on the event loop before it comes here (``bridge.pipeline.admission``): no sink code runs in a
transaction. Reads use a second connection on the caller's thread; WAL lets them run while a
write is in progress.

May import: ``bridge.errors``, ``bridge.core``, ``bridge.pipeline.outbox``,
``bridge.pipeline.admission`` and the other modules of ``bridge.pipeline.store``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, Literal, ParamSpec, TypeVar

from bridge.core.model import Event
from bridge.core.sink import OutboxRow
from bridge.errors import StoreError, StoreFullError
from bridge.pipeline.admission import admit
from bridge.pipeline.outbox import Admission, Outbox
from bridge.pipeline.store.eventlog import EventLog, Replay
from bridge.pipeline.store.history import History, Retention
from bridge.pipeline.store.latest import LatestRow, LatestValues
from bridge.pipeline.store.migrations import prepare
from bridge.pipeline.store.space import SpaceGuard, disk_problem

logger = logging.getLogger(__name__)

_Parameters = ParamSpec("_Parameters")
_Result = TypeVar("_Result")

SyncMode = Literal["full", "normal"]


class Store:
    """Last values, bounded history and the event log of every point."""

    PRUNE_EVERY = 30.0
    """Seconds between retention passes."""
    LATEST_EVERY = 5.0
    """Seconds between updates of the ``latest`` table (with a batch, in its transaction)."""
    CHECKPOINT_EVERY: float | None = 1.0
    """Seconds between checkpoints of the write-ahead log, at most, made by a thread of their
    own so the writer never waits for one (they copy pages and sync the files), and only after
    something was written (an idle store wakes no thread); ``None``: SQLite's own checkpoints,
    made by the writer whenever the log reaches 1,000 pages."""
    FALLBACK_CHECKPOINT_PAGES = 16_384
    """The writer still checkpoints when the log reaches this many pages (64 MiB), should the
    checkpoint thread fall behind."""

    def __init__(self, path: Path, retention: Retention, outbox: Outbox | None = None, *,
                 sync: SyncMode = "full", replay: Replay | None = None,
                 min_free: int = 64 << 20) -> None:
        self.path = path
        self.outbox = outbox
        """Events waiting for the sinks; ``None`` when no sink is configured."""
        self.sync: SyncMode = sync
        """``full``: every commit is on disk (fsync) before ``write`` returns, so before any
        upstream acknowledgement; ``normal``: a power cut may undo the last commits."""
        self.log = EventLog(replay or Replay())
        """The event log: stored batches, which are also every sink's outbox."""
        self._history = History(retention)
        self._latest = LatestValues()
        self._space = SpaceGuard(path.parent, min_free)
        self.problem: str | None = None
        """Why the store cannot write now (``disk full: ...``); ``None`` while it can."""
        self._executor: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._last_prune = 0.0
        self._last_latest = 0.0
        self._next = 1
        """The ``seq`` of the next event stored."""
        self.written = 0
        """Events written since open."""
        self._checkpointing: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        self._wrote = threading.Event()
        """Set by the writer after each commit: the log has pages to checkpoint."""

    @property
    def retention(self) -> Retention:
        """How much history is kept."""
        return self._history.retention

    @property
    def replay(self) -> Replay:
        """How much of the event log is kept for event streams that resume."""
        return self.log.replay

    @replay.setter
    def replay(self, value: Replay) -> None:
        self.log.replay = value

    @property
    def min_free(self) -> int:
        """Bytes of the disk kept free: below it the store refuses batches
        (``StoreFullError``) before SQLite runs out of room mid-transaction."""
        return self._space.min_free

    @min_free.setter
    def min_free(self, value: int) -> None:
        self._space.min_free = value

    # --- opening and closing -------------------------------------------------------------------

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
                self._wrote.clear()
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
        writer = sqlite3.connect(self.path, isolation_level=None)
        try:
            writer.execute("PRAGMA journal_mode = WAL")
            # In WAL mode FULL syncs the log at every commit; NORMAL survives a process crash
            # (kill -9) but a power cut can undo the last commits.
            writer.execute(f"PRAGMA synchronous = {self.sync.upper()}")
            if self.CHECKPOINT_EVERY is not None:
                writer.execute(f"PRAGMA wal_autocheckpoint = {self.FALLBACK_CHECKPOINT_PAGES}")
            prepare(writer, self.path)
            mark = self._latest.load(writer)
            logged = self.log.load(writer)
            (marked,) = writer.execute("SELECT COALESCE(MAX(seq), 0) FROM seq_marks").fetchone()
            last = max(logged, mark, marked)
            self._next = last + 1
            self._history.load(writer, mark)
            if self.outbox is not None:
                self.outbox.open(writer, last)
        except BaseException:
            writer.close()
            raise
        self._writer = writer

    def _checkpoint(self, every: float) -> None:
        """Copy the write-ahead log into the database at most every ``every`` seconds, once
        something was written (PASSIVE: never waits for the writer or the readers; what it
        cannot copy now it copies next time). With nothing written it sleeps without a timer."""
        connection = sqlite3.connect(self.path)
        try:
            while True:
                self._wrote.wait()
                if self._stop_checkpoints.wait(every):
                    break
                self._wrote.clear()
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
            self._wrote.set()
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
                self._flush_latest(writer, self._latest.waiting, self._next - 1)
                if self.outbox is not None:
                    self.outbox.save(writer)
            self._latest.waiting.clear()
            self._history.committed_all()
        except sqlite3.Error as exc:
            problem = disk_problem(exc)
            if problem is None:
                raise
            # Everything flushed here is in the event log too: the next start recovers it.
            logger.warning("store: %s at close; the last values and history are recovered "
                           "from the event log at the next start", problem)
        finally:
            writer.close()

    @property
    def is_open(self) -> bool:
        """Whether the store can be read and written."""
        return self._reader is not None and self._executor is not None

    # --- writing -------------------------------------------------------------------------------

    async def write(self, events: Sequence[Event], *, force: bool = False) -> int:
        """Store a batch of events in one transaction, off the loop: its history rows and one
        row of the event log, which is also every sink's outbox.

        Returns how many events were stored: all of them, except under the outbox's ``block``
        policy when a sink's outbox is full (``force``, at shutdown, stores them all).
        """
        admission = admit(self.outbox, events, force=force)
        await self.commit(admission)
        return len(admission.taken)

    async def commit(self, admission: Admission) -> None:
        """Store the events ``admission`` took, in one transaction on the writer thread; raise
        ``StoreFullError`` with nothing of them stored when the disk cannot take them."""
        if not admission.events:
            return
        if self._executor is None:
            raise StoreError("store is not open")
        loop = asyncio.get_running_loop()
        sinks = await loop.run_in_executor(self._executor, self._write, admission)
        if sinks and self.outbox is not None:
            self.outbox.stored(sinks)

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

    def _write(self, admission: Admission) -> frozenset[str]:
        """Store a batch, or raise ``StoreFullError`` with nothing of it stored (in the file or in
        memory) when the disk cannot take it; returns the sinks that got events."""
        self._check_space()
        first = self._next
        try:
            sinks = self._write_batch(admission)
        except (sqlite3.Error, OSError) as exc:
            problem = disk_problem(exc)
            if problem is None:
                raise
            self._undo(first)
            self.problem = problem
            raise StoreFullError(f"cannot write to the store {self.path}: {problem}") from exc
        self.problem = None
        return sinks

    def _check_space(self) -> None:
        """Raise ``StoreFullError`` when less than ``min_free`` bytes are left for the store
        (on the writer thread)."""
        if not self._space.due():
            return
        problem = self._space.problem(self._writer)
        if problem is not None:
            self.problem = problem
            raise StoreFullError(f"the store pauses: {problem}")

    def space_problem(self) -> str | None:
        """Whether the store is below its ``min_free`` reserve now: free space on its disk,
        and free pages inside the file that SQLite reuses first; ``None`` when it is not."""
        return self._space.problem(self._reader)

    def _undo(self, first: int) -> None:
        """Forget a batch from ``seq`` ``first`` whose transaction failed: its events in the
        pending chunks, and the cursors the outbox moved with it (written again next time)."""
        self._history.undo(first)
        if self.outbox is not None:
            self.outbox.unsaved()

    def _write_batch(self, admission: Admission) -> frozenset[str]:
        """Write one admitted batch in one transaction, then account for it in memory;
        returns the sinks that got events."""
        writer = self._writer
        assert writer is not None
        events, bodies = admission.events, admission.bodies
        first = self._next
        last = first + len(events) - 1
        created = time.time()
        now = time.monotonic()
        if self.outbox is not None:
            self.outbox.plan_drops(writer, admission, first)
        fresh: dict[str, LatestRow] = {event.point: (event.point, event.ts, body)
                                       for event, body in zip(events, bodies, strict=True)}
        full = self._history.add(
            (seq, event.point, event.ts, body)
            for seq, event, body in zip(itertools.count(first), events, bodies))
        flush = (now - self._last_latest >= self.LATEST_EVERY or self._history.pending_full)
        with writer:
            writer.execute("BEGIN")
            size = self.log.append(writer, first, created, admission.log_entry(), bodies)
            if self.outbox is not None:
                self.outbox.save(writer)
                self.outbox.write_drops(writer, admission)
            if flush:
                self._flush_latest(writer, {**self._latest.waiting, **fresh}, last)
            elif full:
                self._history.write_chunks(writer, full)
            self.log.trim(writer, time.time(), self._latest.mark, self.outbox,
                          admission.dropped)
        self._next = last + 1
        self.log.appended(first, last, size, created)
        # Only values of a committed batch may reach the latest table later.
        if flush:
            self._history.committed_all()
            self._latest.written(last)
            self._last_latest = now
        else:
            self._history.committed_chunks(full)
            self._latest.waiting.update(fresh)
        sinks = (self.outbox.committed(admission, first, created)
                 if self.outbox is not None else frozenset[str]())
        self.written += len(events)
        self._wrote.set()
        self._prune_when_due(now)
        return sinks

    def _flush_latest(self, writer: sqlite3.Connection, values: dict[str, LatestRow],
                      mark: int) -> bool:
        """Write every chunk in memory and ``values`` (every last value since the previous
        flush) to the ``latest`` table, and move its mark to ``mark``, inside the caller's
        transaction; whether there was anything to write."""
        if not values and not self._history.has_pending:
            return False
        self._history.write_all(writer)
        self._latest.write(writer, values, mark)
        return True

    # --- retention -----------------------------------------------------------------------------

    def _prune_when_due(self, now: float) -> None:
        if now - self._last_prune < self.PRUNE_EVERY:
            return
        self._last_prune = now
        try:
            self._prune()
        except sqlite3.Error as exc:
            # The batch is stored; retention is tried again at the next pass.
            problem = disk_problem(exc)
            if problem is None:
                raise
            logger.warning("store: retention pass failed: %s", problem)

    async def prune(self) -> None:
        """Apply retention now."""
        if self._executor is None:
            raise StoreError("store is not open")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._prune)

    def _prune(self) -> None:
        writer = self._writer
        assert writer is not None
        now = time.time()
        last = self._next - 1
        with writer:
            writer.execute("BEGIN")
            # The log after the mark holds last values and history the tables do not have yet.
            flushed = self._flush_latest(writer, self._latest.waiting, last)
            writer.execute("INSERT OR REPLACE INTO seq_marks (at, seq) VALUES (?, ?)",
                           (now, last))
            # By arrival time (the marks): a device clock that is off must not wipe its own
            # history.
            (cutoff,) = writer.execute("SELECT MAX(seq) FROM seq_marks WHERE at < ?",
                                       (now - self.retention.max_age,)).fetchone()
            if cutoff is not None:
                writer.execute("DELETE FROM seq_marks WHERE seq < ?", (cutoff,))
        if flushed:
            self._history.committed_all()
            self._latest.written(last)
        self._latest.waiting.clear()
        self._last_latest = time.monotonic()
        with writer:
            writer.execute("BEGIN")
            self._history.trim(writer, cutoff)
            if self.outbox is not None:
                self.outbox.save(writer)
            self.log.trim(writer, now, self._latest.mark, self.outbox)
        self._wrote.set()

    # --- reading -------------------------------------------------------------------------------

    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StoreError("store is not open")
        return self._reader

    def latest(self) -> dict[str, Event]:
        """The last stored event of every point."""
        return LatestValues.read(self._read())

    def history(self, point: str, *, since: float | None = None, until: float | None = None,
                limit: int = 1000, newest_first: bool = True) -> list[Event]:
        """A point's stored events between two times, newest first by default."""
        bodies = self.history_json(point, since=since, until=until, limit=limit,
                                   newest_first=newest_first)
        return [Event.from_json(body) for body in bodies]

    def history_json(self, point: str, *, since: float | None = None,
                     until: float | None = None, limit: int = 1000,
                     newest_first: bool = True) -> list[str]:
        """Like ``history``, as the stored JSON bodies (the API joins them unparsed)."""
        return self._history.read(self._read(), point, since=since, until=until,
                                      limit=limit, newest_first=newest_first)

    def history_count(self, point: str) -> int:
        """How many events of a point the history holds."""
        return self._history.count(self._read(), point)

    def history_seq(self, event_id: str) -> int | None:
        """The position (``seq``) of a stored event in the event log; ``None`` when the log
        no longer holds it (or it was never stored here)."""
        return self.log.seq_of(self._read(), event_id)

    def history_after(self, seq: int, *, limit: int) -> list[tuple[int, str, str, str]]:
        """At most ``limit`` events stored after position ``seq``, in store order, as
        ``(seq, id, point, body)``: what an event stream resuming from ``seq`` replays."""
        return [(row.seq, row.event.id, row.event.point, row.body)
                for row in itertools.islice(self.log.after(self._read(), seq), limit)]

    def outbox_rows(self, sink: str) -> list[OutboxRow]:
        """Every event waiting for ``sink``, in order (for inspection)."""
        if self.outbox is None:
            return []
        return self.outbox.pending(self._read(), sink)

    def outbox_oldest(self, sink: str) -> float | None:
        """When the oldest event waiting for ``sink`` was stored; ``None`` when none waits."""
        if self.outbox is None:
            return None
        return self.outbox.oldest(self._read(), sink)
