"""Delivery: what a sink is handed to read its events from the outbox and confirm them.

``SinkOutbox`` is the outbox as one sink sees it in the daemon's process; a sink in a worker
process gets a view whose reads and deletions the daemon carries out (``bridge.pipeline.worker``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from bridge.core.sink import OutboxRow
from bridge.pipeline.outbox import Outbox
from bridge.pipeline.store import Store


class SinkOutbox:
    """One sink's view of the outbox: read its rows in order, delete them once confirmed."""

    def __init__(self, store: Store, sink: str) -> None:
        if store.outbox is None:
            raise ValueError("the store has no outbox")
        self.store = store
        self.outbox: Outbox = store.outbox
        self.sink = sink

    @property
    def signal(self) -> asyncio.Event:
        """Set when rows were stored for this sink. The sink waits on it, and may set it
        itself (from broker callbacks) to wake its one loop."""
        return self.outbox.signal(self.sink)

    @property
    def arrivals(self) -> int:
        """Batches stored with rows for this sink so far: unchanged since a read that came back
        short means there is nothing new to read."""
        return self.outbox.arrivals[self.sink]

    def read(self, after: int, limit: int) -> asyncio.Future[list[OutboxRow]]:
        """The oldest ``limit`` rows after ``seq`` ``after``, in order (a future: the read runs
        on the store's writer thread while the sink goes on publishing)."""
        return self.store.run_on_writer(self.outbox.read, self.sink, after, limit)

    def take(self, after: int, limit: int) -> list[OutboxRow] | None:
        """The oldest ``limit`` rows after ``seq`` ``after`` from the rows handed to this sink
        in memory as they were stored; ``None`` when those do not reach back to ``after`` (the
        first read of a connection, after a refusal, after the sink fell far behind): then
        ``read`` them."""
        return self.outbox.take(self.sink, after, limit)

    def confirm(self, seqs: Sequence[int]) -> asyncio.Future[int]:
        """Record rows the broker confirmed (the sink's cursor moves as far as its rows are
        confirmed in order), then wake a blocked router.

        A future of how many rows were still waiting (a dropped row may be confirmed late).
        """
        done = self.store.run_on_writer(self.outbox.confirm, self.sink, list(seqs))
        done.add_done_callback(self._made_room)
        return done

    def _made_room(self, done: asyncio.Future[int]) -> None:
        if not done.cancelled() and done.exception() is None:
            self.outbox.made_room()
