"""The store's layout and its migrations: the tables of the current layout, and the steps that
turn a store written by an older release into it, each in one transaction.

May import: the standard library and ``bridge.pipeline.store.history`` (the chunk format).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

from bridge.errors import StoreError
from bridge.pipeline.store.history import CHUNK_EVENTS, INSERT_CHUNK, Chunk, ChunkRow

logger = logging.getLogger(__name__)

SCHEMA = """
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
log. ``batches`` is the event log (``bridge.pipeline.store.eventlog``). ``seq_marks`` notes
the last ``seq`` at each retention pass, so history is pruned by age with ``seq`` ranges."""

SCHEMA_VERSION = 3
"""``PRAGMA user_version`` of the layout above. Version 1 (no ``user_version``) kept history in a
rowid table with three indexes and the outbox as one row per event and sink; version 2 one
history row per event. Both are migrated when opened."""

LOG_BATCH = 5_000
"""Events per log row when an old outbox is migrated."""

def prepare(writer: sqlite3.Connection, path: Path) -> None:
    """Bring the store on ``writer`` to the current layout: migrate an older one, create the
    tables of a new one; ``StoreError`` when a newer release wrote it."""
    (version,) = writer.execute("PRAGMA user_version").fetchone()
    if version < 2 and has_column(writer, "history", "received_at"):
        migrate_v1(writer)
        version = 2
    if version == 2:
        migrate_v2(writer)
    elif version > SCHEMA_VERSION:
        raise StoreError(f"the store {path} was written by a newer release "
                         f"(layout {version}; this release reads {SCHEMA_VERSION})")
    writer.executescript(SCHEMA)
    writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def has_column(connection: sqlite3.Connection, table: str, column: str) -> bool:
    """Whether ``table`` has ``column``."""
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
        if has_table(writer, "latest_mark"):
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
        if has_table(writer, "sqlite_sequence"):
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
        if has_table(writer, "outbox"):
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
        rows: list[ChunkRow] = []
        chunk = Chunk()
        current: str | None = None
        events = writer.execute("SELECT point, seq, ts, body FROM history_rows "
                                "ORDER BY point, seq")
        for point, seq, ts, body in events:
            if current is not None and (point != current or len(chunk.seqs) >= CHUNK_EVENTS):
                rows.append(chunk.row(current))
                chunk = Chunk()
                if len(rows) >= 1000:
                    writer.executemany(INSERT_CHUNK, rows)
                    rows.clear()
            current = point
            chunk.add(seq, ts, body)
        if current is not None:
            rows.append(chunk.row(current))
        writer.executemany(INSERT_CHUNK, rows)
        writer.execute("DROP TABLE history_rows")
        writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def has_table(connection: sqlite3.Connection, name: str) -> bool:
    """Whether the database has a table called ``name``."""
    return connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                              (name,)).fetchone() is not None
