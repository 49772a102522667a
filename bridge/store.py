"""The embedded store: SQLite in WAL mode holding last values and bounded history.

All writes go through one thread owned by the store (SQLite allows one writer), in batches:
one transaction per batch, never one per event. Reads use a second connection on the caller's
thread; WAL lets them run while a write is in progress.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.errors import BridgeError
from bridge.model import Event, Quality, parse_timestamp

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
CREATE INDEX IF NOT EXISTS history_point_seq ON history (point, seq);
CREATE INDEX IF NOT EXISTS history_received_at ON history (received_at);
CREATE INDEX IF NOT EXISTS history_id ON history (id);
"""


class StoreError(BridgeError):
    """The store cannot be opened or written."""


@dataclass(frozen=True)
class Retention:
    """How much history is kept."""

    max_age: float
    """Seconds; older rows are pruned."""
    max_rows: int
    """Per point; the oldest rows beyond it are pruned."""


def event_to_json(event: Event) -> str:
    """The event's documented JSON, compact."""
    return json.dumps(event.to_dict(), separators=(",", ":"), ensure_ascii=False)


def event_from_json(body: str) -> Event:
    """An event back from its JSON form."""
    data: dict[str, Any] = json.loads(body)
    return Event(
        id=data["id"],
        source=data["source"],
        point=data["point"],
        value=data["value"],
        unit=data["unit"],
        quality=Quality(data["quality"]),
        ts=parse_timestamp(data["ts"]),
        received_at=parse_timestamp(data["received_at"]),
        protocol=data["protocol"],
        bridge=data["bridge"],
        tags=data.get("tags") or {},
        reason=data.get("reason"),
    )


class Store:
    """Last values and bounded history of every point."""

    PRUNE_EVERY = 30.0
    """Seconds between retention passes."""

    def __init__(self, path: Path, retention: Retention) -> None:
        self.path = path
        self.retention = retention
        self._executor: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._rows: Counter[str] = Counter()
        self._last_prune = 0.0
        self.written = 0
        """Events written since open."""

    def open(self) -> None:
        """Create the database if needed and open both connections."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
            self._executor.submit(self._open_writer).result()
            self._reader = sqlite3.connect(self.path, check_same_thread=False)
            self._reader.execute("PRAGMA query_only = ON")
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc

    def _open_writer(self) -> None:
        writer = sqlite3.connect(self.path, isolation_level=None)
        writer.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only power loss can undo
        # the last transactions.
        writer.execute("PRAGMA synchronous = NORMAL")
        writer.executescript(_SCHEMA)
        for point, count in writer.execute("SELECT point, COUNT(*) FROM history GROUP BY point"):
            self._rows[point] = count
        self._writer = writer

    def close(self) -> None:
        """Close both connections and stop the writer thread."""
        if self._executor is not None:
            if self._writer is not None:
                self._executor.submit(self._writer.close).result()
                self._writer = None
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    async def write(self, events: Sequence[Event]) -> None:
        """Store a batch of events in one transaction, off the event loop."""
        if not events:
            return
        if self._executor is None:
            raise StoreError("store is not open")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._write, list(events))

    def _write(self, events: list[Event]) -> None:
        writer = self._writer
        assert writer is not None
        rows = [(event.point, event.ts, event.received_at, event.id, event_to_json(event))
                for event in events]
        latest: dict[str, tuple[str, float, str]] = {}
        for point, ts, _, _, body in rows:
            latest[point] = (point, ts, body)
        with writer:
            writer.execute("BEGIN")
            writer.executemany(
                "INSERT INTO history (point, ts, received_at, id, body) VALUES (?, ?, ?, ?, ?)",
                rows)
            writer.executemany(
                "INSERT INTO latest (point, ts, body) VALUES (?, ?, ?) "
                "ON CONFLICT (point) DO UPDATE SET ts = excluded.ts, body = excluded.body",
                list(latest.values()))
        for event in events:
            self._rows[event.point] += 1
        self.written += len(events)
        now = time.monotonic()
        if now - self._last_prune >= self.PRUNE_EVERY:
            self._last_prune = now
            self._prune()

    def _prune(self) -> None:
        writer = self._writer
        assert writer is not None
        cutoff = time.time() - self.retention.max_age
        limit = self.retention.max_rows
        with writer:
            writer.execute("BEGIN")
            # By arrival time: a device clock that is off must not wipe its own history.
            writer.execute("DELETE FROM history WHERE received_at < ?", (cutoff,))
            for point, count in list(self._rows.items()):
                if count <= limit:
                    continue
                writer.execute(
                    "DELETE FROM history WHERE point = ? AND seq <= ("
                    "SELECT seq FROM history WHERE point = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (point, point, limit))
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
        rows = self._read().execute("SELECT body FROM latest").fetchall()
        return {event.point: event for event in (event_from_json(body) for (body,) in rows)}

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
