"""Admission: the outbox's ``block`` policy in one place, on the event loop.

Before a batch goes to the store's writer, ``admit`` decides which of its events are stored
and which sinks take each, running the sinks' selectors and address (routing key) functions
here, so no sink code runs inside the store's transaction. Under ``block`` an event that a full
sink takes is held back, with every later event of its point. The ``AdmissionGate`` keeps the
batches held back for the router, in order, and tells it when to try them again: once a sink
made room since they were held, or when the router is closing.

May import: ``bridge.core`` and ``bridge.pipeline.outbox``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from bridge.core.model import Event, Settlement
from bridge.pipeline.outbox import Admission, Outbox, OutboxDepth


@dataclass(slots=True)
class Batch:
    """Events a source handed in together, and the upstream messages to settle once they are
    all stored."""

    events: Sequence[Event]
    settlements: Sequence[Settlement]


def admit(outbox: Outbox | None, events: Sequence[Event], *, force: bool = False,
          held_points: Collection[str] = ()) -> Admission:
    """Which events of a batch are stored now, which sinks take each and at which address.

    With the ``block`` policy (unless ``force``) an event that a full sink takes is held back,
    and so is every later event of its point and of ``held_points`` (points with events held
    from earlier batches), so each point's events are stored in order; the other events, for
    sinks with room, are stored. A sink with an empty outbox always takes one event, however
    large.
    """
    if outbox is None or not outbox.routes:
        return Admission(list(range(len(events))), events=list(events),
                         bodies=[event.to_json() for event in events])
    limits = outbox.limits
    block = not (limits.drop_oldest or force)
    routes = outbox.routes
    depths = [outbox.depths[route.sink] for route in routes]
    added = [[0, 0] for _ in routes]
    admission = Admission([])
    holding = set(held_points) if block else set()
    for position, event in enumerate(events):
        if holding and event.point in holding:
            admission.held.append(position)
            continue
        taking = tuple(index for index, route in enumerate(routes) if route.accepts(event))
        body = event.to_json()
        if taking:
            size = len(body.encode())
            if block and any(_full(outbox, depths[index], added[index], size)
                             for index in taking):
                holding.add(event.point)
                admission.held.append(position)
                continue
            for index in taking:
                extra = added[index]
                extra[0] += 1
                extra[1] += size
        admission.taken.append(position)
        admission.events.append(event)
        admission.bodies.append(body)
        admission.routes.append(taking)
        admission.addresses.append(tuple(routes[index].address(event) for index in taking))
    admission.added = {route.sink: extra
                       for route, extra in zip(routes, added, strict=True) if extra[0]}
    return admission


def _full(outbox: Outbox, depth: OutboxDepth, added: list[int], size: int) -> bool:
    """Whether a sink has no room for an event of ``size`` bytes after ``added``."""
    limits = outbox.limits
    waiting = depth.events + added[0]
    return waiting > 0 and (waiting >= limits.max_events
                            or depth.bytes + added[1] + size > limits.max_bytes)


class AdmissionGate:
    """Decides, for the router, what of each batch is stored now, and keeps what is held
    back for a full sink until a sink made room."""

    def __init__(self, outbox: Outbox | None, *, max_held: int,
                 wake: Callable[[], None]) -> None:
        self.outbox = outbox
        self.max_held = max_held
        """Events of one source held back, at most, before the source waits."""
        self.generation = 0
        """Counts the times a sink made room."""
        self._wake = wake
        self._held: deque[Batch] = deque()
        """Batches with events held back, oldest first."""
        self._held_points: set[str] = set()
        self._held_sources: Counter[str] = Counter()
        self._held_generation = -1
        if outbox is not None:
            outbox.room_listeners.append(self.made_room)

    def made_room(self) -> None:
        """A sink's events were confirmed: wake the router to retry what is held back (with
        nothing held back, the router is not woken for it)."""
        self.generation += 1
        if self._held:
            self._wake()

    @property
    def holding(self) -> bool:
        """Whether batches are held back."""
        return bool(self._held)

    @property
    def held_events(self) -> int:
        """Events held back, of every source."""
        return sum(self._held_sources.values())

    def source_has_room(self, source: str) -> bool:
        """Whether ``source`` has fewer than ``max_held`` events held back."""
        return self._held_sources[source] < self.max_held

    def retry_due(self, closing: bool) -> bool:
        """Whether held batches are to be tried again: a sink made room since they were held,
        or the router is ``closing``."""
        return bool(self._held) and (closing or self.generation != self._held_generation)

    def release(self) -> list[Batch]:
        """Every held batch, oldest first, to be tried again ahead of new ones."""
        batches = list(self._held)
        self._held.clear()
        self._held_points.clear()
        self._held_sources.clear()
        return batches

    def admit(self, events: Sequence[Event], *, closing: bool) -> Admission:
        """``admit`` for the router: new events of points held back wait behind them, and at
        shutdown (``closing``) everything is stored, beyond the bound if need be."""
        return admit(self.outbox, events, force=closing, held_points=self._held_points)

    def hold_back(self, batches: Sequence[Batch], admission: Admission, generation: int
                  ) -> tuple[list[Event], list[Settlement]]:
        """Keep what ``admission`` held of ``batches`` (admitted while the gate was at
        ``generation``); returns the stored events, in order, and the settlements of the
        batches stored whole: a batch with events held back keeps all its settlements until
        they are stored too."""
        if not admission.held:
            return admission.events, [settlement for batch in batches
                                      for settlement in batch.settlements]
        self._held_generation = generation
        holding = set(admission.held)
        settlements: list[Settlement] = []
        position = 0
        for batch in batches:
            kept: list[Event] = []
            for event in batch.events:
                if position in holding:
                    kept.append(event)
                position += 1
            if kept:
                self._held.append(Batch(kept, batch.settlements))
                self._held_points.update(event.point for event in kept)
                self._held_sources.update(event.source for event in kept)
            else:
                settlements.extend(batch.settlements)
        return admission.events, settlements
