"""The router: stores events in batches, settles acknowledgements, fans events out.

Sources hand in events through ``submit``; when more than ``max_pending`` events wait to be
stored, ``submit`` waits, so a fast source slows down instead of growing memory. Batches are
at least ``commit_interval`` apart: under load what arrives meanwhile is stored together. Storing a
batch writes its history and its outbox rows in one transaction; only then are its upstream
messages acknowledged, so an acknowledged message's events are always in the outbox. When a
sink's outbox is full under the ``block`` policy, the router stores what fits and waits for a
sink to make room: pending events pile up to ``max_pending`` and sources wait in ``submit``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bridge.core.model import Acknowledger, Event
from bridge.pipeline.store import Store

logger = logging.getLogger(__name__)

Listener = Callable[[Sequence[Event]], None]
"""Called on the event loop with each stored batch; must not block."""


Settlement = tuple[Acknowledger, str | None]
"""An upstream message to settle once the batch is stored: accept it, or reject it with a reason."""


@dataclass(slots=True)
class _Batch:
    events: Sequence[Event]
    settlements: Sequence[Settlement]


class Router:
    """Routes events from sources to the store and to listeners, in order."""

    def __init__(self, store: Store, *, max_pending: int = 20_000, max_batch: int = 5_000,
                 commit_interval: float = 0.0) -> None:
        self.store = store
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.commit_interval = commit_interval
        """Seconds, at least, from the start of one batch's write to the next (group commit)."""
        self.latest: dict[str, Event] = {}
        """The last event of every point, kept in memory for the API."""
        self.counters: Counter[str] = Counter()
        self._queue: deque[_Batch] = deque()
        self._pending = 0
        self._arrived = asyncio.Event()
        self._room = asyncio.Condition()
        self._listeners: list[Listener] = []
        self._closing = False

    def restore(self) -> None:
        """Load last values from the store (after a restart)."""
        self.latest.update(self.store.latest())

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every stored batch; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    @property
    def pending(self) -> int:
        """Events accepted but not yet stored."""
        return self._pending

    async def submit(
        self, events: Sequence[Event], settlements: Sequence[Settlement] = ()
    ) -> None:
        """Queue events for storing; upstream messages are settled, in order, once stored."""
        if not events and not settlements:
            return
        if self._pending >= self.max_pending:
            self.counters["backpressure_waits"] += 1
            async with self._room:
                await self._room.wait_for(lambda: self._pending < self.max_pending)
        self._queue.append(_Batch(events, settlements))
        self._pending += len(events)
        self._arrived.set()

    async def run(self) -> None:
        """Store queued events until cancelled; then store what is left.

        A batch being stored when the router is cancelled is finished first (it is shielded),
        so nothing a source handed in is lost at shutdown.
        """
        flushing: asyncio.Task[bool] | None = None
        loop = asyncio.get_running_loop()
        started = -self.commit_interval
        try:
            while True:
                await self._arrived.wait()
                # Group commit: while batches follow each other closely, gather what arrives
                # for the rest of the interval, so a busy store commits fewer, larger batches.
                delay = started + self.commit_interval - loop.time()
                if delay > 0 and self._pending < self.max_batch:
                    await asyncio.sleep(delay)
                started = loop.time()
                outbox = self.store.outbox
                generation = outbox.generation if outbox is not None else 0
                flushing = asyncio.create_task(self._flush(), name="router.flush")
                if await asyncio.shield(flushing) and outbox is not None:
                    self.counters["outbox_full_waits"] += 1
                    await outbox.wait_for_room(generation)
        finally:
            # Cancelled (shutdown): store what sources already handed in before returning,
            # beyond the outbox's bound if need be (sources are stopped: it cannot grow more).
            self._closing = True
            if flushing is not None:
                await asyncio.shield(flushing)
            while self._queue:
                await asyncio.shield(self._flush())

    async def _flush(self) -> bool:
        """Store, settle and announce one batch; whether the outbox was too full for all."""
        batches: list[_Batch] = []
        events: list[Event] = []
        while self._queue and len(events) < self.max_batch:
            batch = self._queue.popleft()
            batches.append(batch)
            events.extend(batch.events)
        if not self._queue:
            self._arrived.clear()
        stored = await self.store.write(events, force=self._closing)
        full = stored < len(events)
        settlements = self._requeue(batches, stored)
        del events[stored:]
        for event in events:
            self.latest[event.point] = event
        self.counters["events"] += len(events)
        self._pending -= len(events)
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
            listener(events)
        return full

    def _requeue(self, batches: list[_Batch], stored: int) -> list[Settlement]:
        """Put back what the store did not take; the settlements of the batches it stored.

        A batch stored in part keeps all its settlements until the rest of it is stored too.
        """
        settlements: list[Settlement] = []
        left = stored
        for index, batch in enumerate(batches):
            if len(batch.events) > left:
                rest = [_Batch(batch.events[left:], batch.settlements), *batches[index + 1:]]
                self._queue.extendleft(reversed(rest))
                self._arrived.set()
                break
            left -= len(batch.events)
            settlements.extend(batch.settlements)
        return settlements
