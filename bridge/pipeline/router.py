"""The router: stores events in batches, settles acknowledgements, fans events out.

Sources hand in events through ``submit``; when more than ``max_pending`` events wait to be
stored, ``submit`` waits, so a fast source slows down instead of growing memory. Batches are
at least ``commit_interval`` apart: under load what arrives meanwhile is stored together. Storing a
batch writes its history and its event-log row in one transaction; only then are its upstream
messages acknowledged, so an acknowledged message's events are always in the outbox. Under the
``block`` policy, events that a full sink takes are held back here, in order, with every later
event of their points, and tried again once a sink made room; the rest are stored. A source
whose held events reach ``max_held`` waits in ``submit``; the others go on. When the store
cannot write (its disk is full), the batch is tried again with backoff until it can, and the
sources wait in ``submit`` meanwhile: nothing is acknowledged upstream that is not stored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bridge.core.model import Event, Settlement
from bridge.errors import StoreFullError
from bridge.pipeline.store import Store

logger = logging.getLogger(__name__)

Listener = Callable[[Sequence[Event]], None]
"""Called on the event loop with each stored batch; must not block."""


RETRY_FIRST = 0.25
"""Seconds before a batch the store could not write is tried again (doubling)."""
RETRY_MAX = 5.0
"""Seconds between tries at most, so writing resumes soon after space returns."""


@dataclass(slots=True)
class _Batch:
    events: Sequence[Event]
    settlements: Sequence[Settlement]


class Router:
    """Routes events from sources to the store and to listeners, in order."""

    def __init__(self, store: Store, *, max_pending: int = 20_000, max_batch: int = 5_000,
                 commit_interval: float = 0.0, max_held: int | None = None) -> None:
        self.store = store
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.max_held = max_held if max_held is not None else max(1, max_pending // 4)
        """Events of one source held back for full sinks, at most, before the source waits."""
        self.commit_interval = commit_interval
        """Seconds, at least, from the start of one batch's write to the next (group commit)."""
        self.latest: dict[str, Event] = {}
        """The last event of every point, kept in memory for the API."""
        self.counters: Counter[str] = Counter()
        self._queue: deque[_Batch] = deque()
        self._queued = 0
        self._held: deque[_Batch] = deque()
        """Batches with events a full sink holds back, oldest first."""
        self._held_points: set[str] = set()
        self._held_sources: Counter[str] = Counter()
        self._held_generation = -1
        self._arrived = asyncio.Event()
        self._room = asyncio.Condition()
        self._listeners: list[Listener] = []
        self._closing = False
        self._stopping = asyncio.Event()
        """Set at shutdown: a batch waiting for the store to have room gives up."""
        if store.outbox is not None:
            store.outbox.room_listeners.append(self._arrived.set)

    def restore(self) -> None:
        """Load last values from the store (after a restart)."""
        self.latest.update(self.store.latest())

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every stored batch; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    @property
    def pending(self) -> int:
        """Events accepted but not yet stored (held back ones included)."""
        return self._queued + sum(self._held_sources.values())

    def _has_room(self, source: str | None) -> bool:
        return self._queued < self.max_pending and (
            source is None or self._held_sources[source] < self.max_held)

    async def submit(
        self, events: Sequence[Event], settlements: Sequence[Settlement] = ()
    ) -> None:
        """Queue events for storing; upstream messages are settled, in order, once stored.

        Waits while ``max_pending`` events wait to be stored, or while ``max_held`` of this
        source's events are held back for a full sink (other sources go on).
        """
        if not events and not settlements:
            return
        source = events[0].source if events else None
        if not self._has_room(source):
            self.counters["backpressure_waits"] += 1
            async with self._room:
                await self._room.wait_for(lambda: self._has_room(source))
        self._queue.append(_Batch(events, settlements))
        self._queued += len(events)
        self._arrived.set()

    async def run(self) -> None:
        """Store queued events until cancelled; then store what is left.

        A batch being stored when the router is cancelled is finished first (it is shielded),
        so nothing a source handed in is lost at shutdown, unless the store cannot write then:
        what is left is given up, unacknowledged upstream.
        """
        flushing: asyncio.Task[bool] | None = None
        loop = asyncio.get_running_loop()
        started = -self.commit_interval
        try:
            while True:
                await self._arrived.wait()
                if not self._queue and not self._retry_due():
                    # Woken by a sink that made room while nothing is held back for it.
                    self._arrived.clear()
                    continue
                # Group commit: while batches follow each other closely, gather what arrives
                # for the rest of the interval, so a busy store commits fewer, larger batches.
                delay = started + self.commit_interval - loop.time()
                if delay > 0 and self._queued < self.max_batch:
                    await asyncio.sleep(delay)
                started = loop.time()
                flushing = asyncio.create_task(self._flush(), name="router.flush")
                await asyncio.shield(flushing)
        finally:
            # Cancelled (shutdown): store what sources already handed in before returning,
            # beyond the outbox's bound if need be (sources are stopped: it cannot grow more).
            self._closing = True
            self._stopping.set()
            writing = await asyncio.shield(flushing) if flushing is not None else True
            while writing and (self._queue or self._held):
                writing = await asyncio.shield(self._flush())
            if not writing:
                self._abandon([*self._held, *self._queue])
                self._held.clear()
                self._queue.clear()
                self._queued = 0

    async def _flush(self) -> bool:
        """Store, settle and announce one batch; ``False`` when the store could not write it
        and the router is stopping (the batch is given up, unsettled).

        Batches held back for a full sink are tried again first, once a sink made room since;
        until then, new events of their points are held behind them. While the store cannot
        write, the batch is tried again with backoff.
        """
        outbox = self.store.outbox
        generation = outbox.generation if outbox is not None else 0
        batches: list[_Batch] = []
        retry = self._retry_due()
        if retry:
            batches.extend(self._held)
            self._held.clear()
            self._held_points.clear()
            self._held_sources.clear()
        events: list[Event] = [event for batch in batches for event in batch.events]
        fresh = 0
        while self._queue and len(events) < self.max_batch:
            batch = self._queue.popleft()
            batches.append(batch)
            events.extend(batch.events)
            fresh += len(batch.events)
        if not self._queue:
            self._arrived.clear()
        # Still pending while being stored: they leave the count once the write returns.
        delay = RETRY_FIRST
        while True:
            try:
                admission = await self.store.hold(events, force=self._closing,
                                                  held_points=self._held_points)
                break
            except StoreFullError as exc:
                if delay == RETRY_FIRST:
                    self.counters["store_full_waits"] += 1
                    logger.error("%s; sources wait and nothing is acknowledged upstream until "
                                 "it can write again", exc)
                if self._stopping.is_set():
                    self._queued -= fresh
                    self._abandon(batches)
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, RETRY_MAX)
            except BaseException:
                self._queued -= fresh
                raise
        self._queued -= fresh
        if delay != RETRY_FIRST:
            logger.warning("the store writes again")
        stored, settlements = self._sort(batches, events, admission.held)
        if admission.held:
            self.counters["outbox_full_waits"] += 1
            self._held_generation = generation
        for event in stored:
            self.latest[event.point] = event
        self.counters["events"] += len(stored)
        async with self._room:
            self._room.notify_all()
        for ack, reason in settlements:
            try:
                if reason is None:
                    await ack.accept()
                else:
                    await ack.reject(reason)
            except Exception:
                # The upstream connection may be gone; it will redeliver. One failed settle
                # must not stop the router.
                self.counters["settle_errors"] += 1
                logger.exception("cannot settle an upstream message")
        for listener in list(self._listeners):
            listener(stored)
        return True

    def _retry_due(self) -> bool:
        """Whether held batches are to be tried again: a sink made room since they were held,
        or the router is closing."""
        outbox = self.store.outbox
        generation = outbox.generation if outbox is not None else 0
        return bool(self._held) and (self._closing or generation != self._held_generation)

    def _abandon(self, batches: Sequence[_Batch]) -> None:
        """At shutdown, with the store unable to write: give up on ``batches``, unsettled (an
        upstream that redelivers, as MQTT QoS 1/2 and AMQP do, sends them again)."""
        count = sum(len(batch.events) for batch in batches)
        if count:
            self.counters["not_stored"] += count
            logger.error("%d events not stored at shutdown: %s; their upstream messages are "
                         "not acknowledged", count, self.store.problem or "the store cannot write")

    def _sort(self, batches: list[_Batch], events: list[Event], held: Sequence[int]
              ) -> tuple[list[Event], list[Settlement]]:
        """The stored events, in order, and the settlements of the batches stored whole; a
        batch with events held back keeps all its settlements until they are stored too."""
        if not held:
            return events, [settlement for batch in batches for settlement in batch.settlements]
        holding = set(held)
        stored: list[Event] = []
        settlements: list[Settlement] = []
        position = 0
        for batch in batches:
            kept: list[Event] = []
            for event in batch.events:
                (kept if position in holding else stored).append(event)
                position += 1
            if kept:
                self._held.append(_Batch(kept, batch.settlements))
                self._held_points.update(event.point for event in kept)
                self._held_sources.update(event.source for event in kept)
            else:
                settlements.extend(batch.settlements)
        return stored, settlements
