"""The embedded store: SQLite in WAL mode holding last values, bounded history and the outbox.

All writes go through one thread owned by the store (SQLite allows one writer), in batches:
one transaction per batch, never one per event; a batch's outbox rows are written in the same
transaction as its history. Reads use a second connection on the caller's thread; WAL lets
them run while a write is in progress.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from bridge.core.model import Event
from bridge.errors import StoreError
from bridge.pipeline.outbox import Outbox, OutboxInsert

logger = logging.getLogger(__name__)

_Parameters = ParamSpec("_Parameters")
_Result = TypeVar("_Result")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS latest (
    point TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    point TEXT NOT NULL,
    ts REAL NOT NULL,
    received_at REAL NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS latest_mark (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS history_point_seq ON history (point, seq);
CREATE INDEX IF NOT EXISTS history_received_at ON history (received_at);
CREATE INDEX IF NOT EXISTS history_id ON history (id);
"""


@dataclass(frozen=True)
class Retention:
    """How much history is kept."""

    max_age: float
    """Seconds; older rows are pruned."""
    max_rows: int
    """Per point; the oldest rows beyond it are pruned."""


def event_to_json(event: Event) -> str:
    """The event's published JSON, compact (serialized once: a worker process may have done
    it already)."""
    return event.to_json()


def event_from_json(body: str) -> Event:
    """An event back from its published JSON."""
    return Event.from_json(body)


class Store:
    """Last values and bounded history of every point."""

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

    def __init__(self, path: Path, retention: Retention, outbox: Outbox | None = None) -> None:
        self.path = path
        self.retention = retention
        self.outbox = outbox
        """Events waiting for the sinks; ``None`` when no sink is configured."""
        self._executor: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._rows: Counter[str] = Counter()
        self._last_prune = 0.0
        self._latest: dict[str, tuple[str, float, str]] = {}
        """Last values not yet in the ``latest`` table (on the writer thread)."""
        self._last_latest = 0.0
        self.written = 0
        """Events written since open."""
        self._checkpointing: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()

    def open(self) -> None:
        """Create the database if needed and open both connections."""
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
        writer.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only power loss can undo
        # the last transactions.
        writer.execute("PRAGMA synchronous = NORMAL")
        if self.CHECKPOINT_EVERY is not None:
            writer.execute(f"PRAGMA wal_autocheckpoint = {self.FALLBACK_CHECKPOINT_PAGES}")
        writer.executescript(_SCHEMA)
        # A store from before latest_mark kept latest up to date with every batch.
        writer.execute("INSERT OR IGNORE INTO latest_mark (id, seq) "
                       "SELECT 1, COALESCE(MAX(seq), 0) FROM history")
        for point, count in writer.execute("SELECT point, COUNT(*) FROM history GROUP BY point"):
            self._rows[point] = count
        if self.outbox is not None:
            self.outbox.open(writer)
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
        """Store a batch of events, with their outbox rows, in one transaction, off the loop.

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
        inserted: OutboxInsert | None = None
        now = time.monotonic()
        with writer:
            writer.execute("BEGIN")
            if self.outbox is not None:
                inserted = self.outbox.insert(writer, events, bodies, force=force)
                del events[inserted.taken:]
            rows = [(event.point, event.ts, event.received_at, event.id, body)
                    for event, body in zip(events, bodies, strict=False)]
            writer.executemany(
                "INSERT INTO history (point, ts, received_at, id, body) VALUES (?, ?, ?, ?, ?)",
                rows)
            fresh = {point: (point, ts, body) for point, ts, _, _, body in rows}
            flush = now - self._last_latest >= self.LATEST_EVERY
            if flush:
                self._flush_latest(writer, {**self._latest, **fresh})
        # Only values of a committed batch may reach the latest table later.
        if flush:
            self._latest.clear()
            self._last_latest = now
        else:
            self._latest.update(fresh)
        sinks: frozenset[str] = frozenset()
        if inserted is not None and self.outbox is not None:
            self.outbox.committed(inserted)
            sinks = inserted.sinks
        self._rows.update(event.point for event in events)
        self.written += len(events)
        if now - self._last_prune >= self.PRUNE_EVERY:
            self._last_prune = now
            self._prune()
        return len(events), sinks

    @staticmethod
    def _flush_latest(writer: sqlite3.Connection,
                      values: dict[str, tuple[str, float, str]]) -> None:
        """Write ``values`` (every last value since the previous flush) to the ``latest``
        table, inside the caller's transaction, and move its mark to the newest history."""
        if not values:
            return
        writer.executemany(
            "INSERT INTO latest (point, ts, body) VALUES (?, ?, ?) "
            "ON CONFLICT (point) DO UPDATE SET ts = excluded.ts, body = excluded.body",
            list(values.values()))
        writer.execute("UPDATE latest_mark SET seq = (SELECT COALESCE(MAX(seq), 0) FROM history)")

    def _prune(self) -> None:
        writer = self._writer
        assert writer is not None
        cutoff = time.time() - self.retention.max_age
        limit = self.retention.max_rows
        with writer:
            writer.execute("BEGIN")
            # History after latest_mark holds last values the latest table does not have yet.
            self._flush_latest(writer, self._latest)
            # By arrival time: a device clock that is off must not wipe its own history.
            writer.execute("DELETE FROM history WHERE received_at < ?", (cutoff,))
            for point, count in list(self._rows.items()):
                if count <= limit:
                    continue
                writer.execute(
                    "DELETE FROM history WHERE point = ? AND seq <= ("
                    "SELECT seq FROM history WHERE point = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (point, point, limit))
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
            # One read transaction: the table and the history after its mark agree.
            reader.execute("BEGIN")
            bodies = dict(reader.execute("SELECT point, body FROM latest").fetchall())
            bodies.update(reader.execute(
                "SELECT point, body FROM history "
                "WHERE seq > (SELECT seq FROM latest_mark WHERE id = 1) ORDER BY seq"))
        return {point: event_from_json(body) for point, body in bodies.items()}

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
        """The history position (``seq``) of a stored event; ``None`` when it is not in the
        history (never stored here, or pruned). One lookup on the ``history_id`` index."""
        row = self._read().execute(
            "SELECT seq FROM history WHERE id = ? ORDER BY seq DESC LIMIT 1",
            (event_id,)).fetchone()
        return None if row is None else int(row[0])

    def history_after(self, seq: int, *, limit: int) -> list[tuple[int, str, str, str]]:
        """At most ``limit`` history rows stored after position ``seq``, in store order, as
        ``(seq, id, point, body)``: what an event stream resuming from ``seq`` replays."""
        rows = self._read().execute(
            "SELECT seq, id, point, body FROM history WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit)).fetchall()
        return [(int(row_seq), event_id, point, body) for row_seq, event_id, point, body in rows]
