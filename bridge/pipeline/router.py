"""The router: stores events in batches, settles acknowledgements, fans events out.

Sources hand in events through ``submit``; when more than ``max_pending`` events wait to be
stored, ``submit`` waits, so a fast source slows down instead of growing memory. Group commit:
a batch goes to the store's writer as soon as the writer is free, with no timer in between;
while a commit is in flight, what arrives gathers into the next batch. So at a low rate every
event is committed at once, and under load a batch is bounded by size (``max_batch``) and by
age (the time one commit takes). Storing a batch writes its history and its event-log row in
one transaction; only then are its upstream messages acknowledged, so an acknowledged
message's events are always in the outbox (and on disk under ``store.sync: full``).

Under the ``block`` policy, the router asks its admission gate (``bridge.pipeline.admission``)
what of each batch is stored: the gate holds back the events that a full sink takes, in order,
with every later event of their points, and has them tried again once a sink made room; the
rest are stored. A source whose held events reach ``max_held`` waits in ``submit``; the others
go on. When the store cannot write (its disk is full), the batch is tried again with backoff
until it can, and the sources wait in ``submit`` meanwhile: nothing is acknowledged upstream
that is not stored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence

from bridge.core.counters import (
    BACKPRESSURE_WAITS,
    EVENTS,
    NOT_STORED,
    OUTBOX_FULL_WAITS,
    SETTLE_ERRORS,
    STORE_FULL_WAITS,
    Counts,
)
from bridge.core.model import Event, Settlement
from bridge.errors import StoreFullError
from bridge.pipeline.admission import AdmissionGate, Batch
from bridge.pipeline.outbox import Admission
from bridge.pipeline.store import Store

logger = logging.getLogger(__name__)

Listener = Callable[[Sequence[Event]], None]
"""Called on the event loop with each stored batch; must not block."""


RETRY_FIRST = 0.25
"""Seconds before a batch the store could not write is tried again (doubling)."""
RETRY_MAX = 5.0
"""Seconds between tries at most, so writing resumes soon after space returns."""

__all__ = ["Listener", "Router", "Settlement"]


class Router:
    """Routes events from sources to the store and to listeners, in order."""

    def __init__(self, store: Store, *, max_pending: int = 20_000, max_batch: int = 5_000,
                 commit_interval: float = 0.0, max_held: int | None = None) -> None:
        self.store = store
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.commit_interval = commit_interval
        """Seconds, at least, from the start of one batch's write to the next; 0 (the default):
        the next batch goes as soon as the writer is free."""
        self.latest: dict[str, Event] = {}
        """The last event of every point, kept in memory for the API."""
        self.counters = Counts()
        self._queue: deque[Batch] = deque()
        self._queued = 0
        self._arrived = asyncio.Event()
        self.gate = AdmissionGate(
            store.outbox, wake=self._arrived.set,
            max_held=max_held if max_held is not None else max(1, max_pending // 4))
        """What of each batch is stored now, and what waits for a full sink."""
        self._room = asyncio.Condition()
        self._listeners: list[Listener] = []
        self._closing = False
        self._stopping = asyncio.Event()
        """Set at shutdown: a batch waiting for the store to have room gives up."""

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
        return self._queued + self.gate.held_events

    def _has_room(self, source: str | None) -> bool:
        return self._queued < self.max_pending and (
            source is None or self.gate.source_has_room(source))

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
            self.counters.add(BACKPRESSURE_WAITS)
            async with self._room:
                await self._room.wait_for(lambda: self._has_room(source))
        self._queue.append(Batch(events, settlements))
        self._queued += len(events)
        self._arrived.set()

    async def run(self) -> None:
        """Store queued events until cancelled; then store what is left.

        The batches are stored by one task of their own for the router's lifetime (no task
        per batch); cancelling ``run`` lets it finish the batch it is storing, so nothing a
        source handed in is lost at shutdown, unless the store cannot write then: what is left
        is given up, unacknowledged upstream.
        """
        committing = asyncio.create_task(self._commit_batches(), name="router.commit")
        try:
            await asyncio.shield(committing)
        finally:
            # Cancelled (shutdown): the task stores what sources already handed in before it
            # returns, beyond the outbox's bound if need be (sources are stopped: it cannot
            # grow more).
            self._closing = True
            self._stopping.set()
            self._arrived.set()
            await committing

    async def _commit_batches(self) -> None:
        """Hand the writer one batch after another, each as soon as the previous one is
        committed; at shutdown (``_closing``) store what is left."""
        loop = asyncio.get_running_loop()
        started = -self.commit_interval
        writing = True
        while not self._closing:
            if not self._queue and not self.gate.retry_due(False):
                # Nothing to store: sleep until a source hands in events, a sink makes room
                # for what is held back, or shutdown (no timer).
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self.commit_interval:
                # An optional floor between commits (``store.commit_interval``).
                delay = started + self.commit_interval - loop.time()
                if delay > 0 and self._queued < self.max_batch:
                    await asyncio.sleep(delay)
                started = loop.time()
            writing = await self._flush()
            if not writing:  # the store cannot write and the router is stopping
                break
        while writing and (self._queue or self.gate.holding):
            writing = await self._flush()
        if not writing:
            self._abandon([*self.gate.release(), *self._queue])
            self._queue.clear()
            self._queued = 0

    async def _flush(self) -> bool:
        """Store, settle and announce one batch; ``False`` when the store could not write it
        and the router is stopping (the batch is given up, unsettled).

        Batches held back for a full sink are tried again first, once a sink made room since;
        until then, new events of their points are held behind them.
        """
        generation = self.gate.generation
        batches, fresh = self._gather()
        # Still pending while being stored: they leave the count once the write returns.
        try:
            admission = await self._store(batches)
        finally:
            self._queued -= fresh
        if admission is None:
            return False
        stored, settlements = self.gate.hold_back(batches, admission, generation)
        if admission.held:
            self.counters.add(OUTBOX_FULL_WAITS)
        for event in stored:
            self.latest[event.point] = event
        self.counters.add(EVENTS, len(stored))
        async with self._room:
            self._room.notify_all()
        await self._settle(settlements)
        for listener in list(self._listeners):
            listener(stored)
        return True

    def _gather(self) -> tuple[list[Batch], int]:
        """The next batches to store: the held ones when they are due, then queued ones up to
        ``max_batch`` events; and how many of their events are new from the queue."""
        batches = self.gate.release() if self.gate.retry_due(self._closing) else []
        count = sum(len(batch.events) for batch in batches)
        fresh = 0
        while self._queue and count + fresh < self.max_batch:
            batch = self._queue.popleft()
            batches.append(batch)
            fresh += len(batch.events)
        return batches, fresh

    async def _store(self, batches: list[Batch]) -> Admission | None:
        """Admit and store the events of ``batches``; while the store cannot write, try again
        with backoff. ``None`` when the router stops before it could (the batches are given
        up, unsettled)."""
        events = [event for batch in batches for event in batch.events]
        delay = RETRY_FIRST
        while True:
            try:
                admission = self.gate.admit(events, closing=self._closing)
                await self.store.commit(admission)
                break
            except StoreFullError as exc:
                if delay == RETRY_FIRST:
                    self.counters.add(STORE_FULL_WAITS)
                    logger.error("%s; sources wait and nothing is acknowledged upstream until "
                                 "it can write again", exc)
                if self._stopping.is_set():
                    self._abandon(batches)
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, RETRY_MAX)
        if delay != RETRY_FIRST:
            logger.warning("the store writes again")
        return admission

    async def _settle(self, settlements: Sequence[Settlement]) -> None:
        """Accept or reject the upstream messages of the stored batches, in order."""
        for ack, reason in settlements:
            try:
                if reason is None:
                    await ack.accept()
                else:
                    await ack.reject(reason)
            except Exception:
                # The upstream connection may be gone; it will redeliver. One failed settle
                # must not stop the router.
                self.counters.add(SETTLE_ERRORS)
                logger.exception("cannot settle an upstream message")

    def _abandon(self, batches: Sequence[Batch]) -> None:
        """At shutdown, with the store unable to write: give up on ``batches``, unsettled (an
        upstream that redelivers, as MQTT QoS 1/2 and AMQP do, sends them again)."""
        count = sum(len(batch.events) for batch in batches)
        if count:
            self.counters.add(NOT_STORED, count)
            logger.error("%d events not stored at shutdown: %s; their upstream messages are "
                         "not acknowledged", count, self.store.problem or "the store cannot write")
