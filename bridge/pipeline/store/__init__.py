"""The embedded store: SQLite in WAL mode holding last values, bounded history and the event log
that is also every sink's outbox.

``writer`` owns the write thread and the batch transaction (``Store``); ``eventlog`` the log of
stored batches, its trimming, lookups and catch-up reads; ``history`` the history chunks and
retention; ``latest`` the table of last values; ``space`` the disk-space guard; ``migrations``
the layout and the steps from older ones.

May import: ``bridge.errors``, ``bridge.core``, ``bridge.pipeline.outbox`` and
``bridge.pipeline.admission``.
"""

from bridge.pipeline.store.eventlog import EventLog, Replay
from bridge.pipeline.store.history import CHUNK_EVENTS, Retention
from bridge.pipeline.store.migrations import SCHEMA_VERSION, migrate_v1, migrate_v2
from bridge.pipeline.store.space import disk_problem
from bridge.pipeline.store.writer import Store, SyncMode

__all__ = [
    "CHUNK_EVENTS",
    "SCHEMA_VERSION",
    "EventLog",
    "Replay",
    "Retention",
    "Store",
    "SyncMode",
    "disk_problem",
    "migrate_v1",
    "migrate_v2",
]
