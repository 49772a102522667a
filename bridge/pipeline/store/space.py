"""The disk-space guard: tells when the store's disk is full, over quota or failing, and keeps
a reserve of free space so SQLite never runs out of room in the middle of a transaction.

May import: the standard library only.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path

SPACE_EVERY = 1.0
"""Seconds between two looks at the free space, while it is well above the reserve."""


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


def readable_size(count: float) -> str:
    """A byte count as people read it (``12.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


class SpaceGuard:
    """Keeps ``min_free`` bytes of the store's disk free."""

    def __init__(self, directory: Path, min_free: int) -> None:
        self.directory = directory
        self.min_free = min_free
        """Bytes of the disk kept free: below it the store refuses batches before SQLite runs
        out of room mid-transaction; ``0`` turns the guard off."""
        self._looked_at = -SPACE_EVERY
        self._free = 0

    def due(self) -> bool:
        """Whether the writer should look at the free space before the next batch: the last
        look is old, or found space short."""
        if self.min_free <= 0:
            return False
        return (time.monotonic() - self._looked_at >= SPACE_EVERY
                or self._free < 2 * self.min_free)

    def problem(self, connection: sqlite3.Connection | None) -> str | None:
        """Whether the store is below its reserve now: free space on its disk, and free pages
        inside the file (read on ``connection``) that SQLite reuses first; ``None`` when it is
        not."""
        if self.min_free <= 0:
            return None
        stat = os.statvfs(self.directory)
        free = stat.f_bavail * stat.f_frsize
        if free < 2 * self.min_free and connection is not None:
            (pages,) = connection.execute("PRAGMA freelist_count").fetchone()
            (page_size,) = connection.execute("PRAGMA page_size").fetchone()
            free += pages * page_size
        # Also read by the writer: the next batch looks again when space is short.
        self._free = free
        self._looked_at = time.monotonic()
        if free >= self.min_free:
            return None
        return (f"disk full: {readable_size(free)} free for {self.directory}, below "
                f"store.min_free ({readable_size(self.min_free)})")
