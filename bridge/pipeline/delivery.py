"""The delivery engine: one for every sink, in the daemon's process or in a worker's.

``SinkDelivery`` is the engine's own state for one sink and what the supervisor runs: each
run is one connection, which ``deliver`` drives over the sink's outbox. The sink (the
``bridge.core.sink.Sink`` contract) only connects, publishes batches, reports confirmations,
refusals and failures through its ``SinkContext``, and closes; the engine keeps the cursor,
the in-flight window, the retries and its figures (publish rate, confirm latency, in flight).
``SinkOutbox`` is the outbox as one sink's delivery sees it in the daemon's process; a sink in
a worker process gets a view whose reads and confirmations the daemon carries out
(``bridge.pipeline.worker``), and the same engine.

This module may import the core, the errors and the pipeline's outbox and store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec

from bridge.core.counters import CONFIRMED, NACKED, PUBLISHED, REPUBLISHED
from bridge.core.sink import BridgeView, OutboxRoute, OutboxRow, Sink
from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory
from bridge.pipeline.outbox import Outbox
from bridge.pipeline.store import Store


class OutboxView(Protocol):
    """What the engine needs of one sink's outbox: ``SinkOutbox`` in the daemon's process, a
    view whose reads and deletions the daemon carries out in a sink's worker process."""

    @property
    def signal(self) -> asyncio.Event:
        """Set when rows were stored for the sink (the engine sets it to wake itself)."""
        ...

    @property
    def arrivals(self) -> int:
        """Batches stored with rows for the sink so far."""
        ...

    def read(self, after: int, limit: int) -> asyncio.Future[list[OutboxRow]]:
        """The oldest ``limit`` rows after ``seq`` ``after``, in order."""
        ...

    def take(self, after: int, limit: int) -> list[OutboxRow] | None:
        """Like ``read``, from memory, or ``None``: then ``read``."""
        ...

    def confirm(self, seqs: Sequence[int]) -> asyncio.Future[int]:
        """Delete rows the broker confirmed."""
        ...


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

        A future of how many rows were still waiting (a dropped row may be confirmed late),
        already done: confirming is bookkeeping in memory, on the loop, with no hand-off to
        the store's thread (the cursor is written with the next stored batch).
        """
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done.set_result(self.outbox.confirm(self.sink, seqs))
        self.outbox.made_room()
        return done


MIN_READ = 256
"""Rows read from the outbox at a time, at least (else the sink's window)."""
CONFIRM_BATCH = 500
"""Confirmed rows are recorded this many at a time, or sooner when there is nothing to
publish."""
MAX_RETRY = 60.0
"""Seconds, at most, between attempts to publish rows the broker keeps refusing."""
LATENCY_WEIGHT = 0.1
"""Weight of the newest sample in the confirm latency's moving average."""

Result = TypeVar("Result")


@dataclass
class RateMeter:
    """Events per second over the last ``window`` seconds, from a running total."""

    window: float = 10.0
    total: int = 0
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, count: int, now: float | None = None) -> None:
        """Count ``count`` more events."""
        now = time.monotonic() if now is None else now
        self.total += count
        samples = self._samples
        if not samples or now - samples[-1][0] >= 1.0:
            samples.append((now, self.total))
        else:
            samples[-1] = (samples[-1][0], self.total)
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()

    def rate(self, now: float | None = None) -> float:
        """Events per second over the window (0 when idle)."""
        now = time.monotonic() if now is None else now
        samples = self._samples
        if not samples or now - samples[-1][0] >= self.window:
            return 0.0
        start_time, start_total = samples[0]
        span = max(now - start_time, 1.0)
        return (self.total - start_total) / span


class DeliveryFigures(msgspec.Struct, frozen=True):
    """What the engine measured of one sink's delivery, as the inventory and a worker's status
    report carry it."""

    publish_rate: float = 0.0
    """Deliveries the broker confirmed per second, lately."""
    confirm_latency: float | None = None
    """Seconds from publish to confirmation, as a moving average."""
    in_flight: int = 0
    """Published, not yet confirmed."""

    def details(self) -> dict[str, Any]:
        """The inventory's figures: publish rate, confirm latency, in flight."""
        latency = self.confirm_latency
        return {
            "publish_rate": round(self.publish_rate, 1),
            "confirm_latency_ms": round(latency * 1000, 2) if latency is not None else None,
            "in_flight": self.in_flight,
        }


@dataclass(frozen=True)
class DeliveryContext:
    """What the supervisor hands a sink's delivery: its status, its outbox and the bridge."""

    status: EndpointStatus
    outbox: OutboxView
    bridge: BridgeView | None = None
    """For the sinks that mirror the bridge; ``None`` in a sink's worker process."""


class SinkDelivery:
    """The engine's own state for one sink, across its connections, and what the supervisor
    runs for it: each ``run`` is one connection, delivered by ``deliver``."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.meter = RateMeter()
        """Deliveries the broker confirmed: the publish rate."""
        self.confirm_latency: float | None = None
        """Seconds from publish to confirmation, as a moving average."""
        self.in_flight = 0
        """Published, not yet confirmed."""

    @property
    def id(self) -> str:
        """The sink's id."""
        return self.sink.id

    def route(self) -> OutboxRoute:
        """How the store fills the sink's outbox."""
        return self.sink.route()

    def figures(self) -> DeliveryFigures:
        """Publish rate, confirm latency and what is in flight, now."""
        return DeliveryFigures(self.meter.rate(), self.confirm_latency, self.in_flight)

    def details(self) -> dict[str, Any]:
        """The inventory's live figures, then what the sink shows of itself."""
        return {**self.figures().details(), **self.sink.details()}

    def confirmed(self, count: int, latency: float) -> None:
        """The broker confirmed ``count`` rows, the last ``latency`` seconds after it was
        published."""
        self.meter.add(count)
        self.settled(latency)

    def settled(self, latency: float) -> None:
        """The broker answered a row ``latency`` seconds after it was published."""
        average = self.confirm_latency
        self.confirm_latency = latency if average is None else (
            average + LATENCY_WEIGHT * (latency - average))

    async def run(self, context: DeliveryContext) -> None:
        """Deliver the outbox through one connection of the sink until cancelled; raises
        ``ConnectorError`` when the connection fails or is lost."""
        await deliver(self, context)


class _Connection:
    """One connection's delivery state: rows in flight, and the outcome of those the broker
    settled. It is the ``SinkContext`` the sink reports to from its broker's callbacks."""

    def __init__(self, delivery: SinkDelivery, context: DeliveryContext) -> None:
        self.delivery = delivery
        self._status = context.status
        self._bridge = context.bridge
        self.wake = context.outbox.signal
        self.in_flight: dict[int, tuple[OutboxRow, float]] = {}
        """Published, not yet settled: ``seq`` → (row, when it was published)."""
        self.confirmed_seqs: list[int] = []
        """Confirmed, not yet recorded in the outbox."""
        self.refused_rows: list[OutboxRow] = []
        self.refusing = False
        """The broker refused rows lately (the state is degraded until it takes one)."""
        self.failure: ConnectorError | None = None
        self.lost = asyncio.Event()
        self.reading: asyncio.Future[list[OutboxRow]] | None = None
        self.read_arrivals = 0
        """``outbox.arrivals`` when the current read started."""
        self.confirming: asyncio.Future[int] | None = None

    @property
    def status(self) -> EndpointStatus:
        """The sink's state and counters."""
        return self._status

    @property
    def bridge(self) -> BridgeView | None:
        """The bridge, for the sinks that mirror it."""
        return self._bridge

    def sent(self, rows: Sequence[OutboxRow]) -> None:
        """``rows`` are being published."""
        now = time.monotonic()
        in_flight = self.in_flight
        for row in rows:
            in_flight[row.seq] = (row, now)
        self._status.counters.add(PUBLISHED, len(rows))

    def confirmed(self, seqs: Sequence[int]) -> None:
        """The broker took these rows."""
        settled = self._settle(seqs, self.confirmed_seqs.append, acked=True)
        if settled and self.refusing and not self.refused_rows:
            self.refusing = False
            if self.delivery.sink.ready():
                self._status.up()

    def refused(self, seqs: Sequence[int]) -> None:
        """The broker refused these rows."""
        self._settle(seqs, lambda seq: None, acked=False, keep=self.refused_rows)

    def _settle(self, seqs: Sequence[int], record: Callable[[int], None], *, acked: bool,
                keep: list[OutboxRow] | None = None) -> int:
        in_flight = self.in_flight
        last: float | None = None
        settled = 0
        for seq in seqs:
            sent = in_flight.pop(seq, None)
            if sent is None:
                continue
            settled += 1
            row, last = sent
            record(seq)
            if keep is not None:
                keep.append(row)
        if settled and last is not None:
            self._status.counters.add(CONFIRMED if acked else NACKED, settled)
            latency = time.monotonic() - last
            if acked:
                self.delivery.confirmed(settled, latency)
            else:
                self.delivery.settled(latency)
        self.wake.set()
        return settled

    def failed(self, error: ConnectorError) -> None:
        """The connection is lost (the first error wins)."""
        if self.failure is None:
            self.failure = error
        self.lost.set()
        self.wake.set()


async def deliver(delivery: SinkDelivery, context: DeliveryContext) -> None:
    """Deliver the outbox through one connection of ``delivery.sink`` until cancelled or the
    connection is lost.

    Rows are published in ``seq`` order with at most ``sink.window`` of them unconfirmed.
    One loop drives everything: rows stored while it keeps up are taken from memory
    (``outbox.take``); other outbox reads run on the store's thread, and the recording of
    confirmations in a worker process's daemon, as futures while publishing goes on, and
    every completion (a read, a recording, a broker's answer, rows stored) sets
    ``outbox.signal`` to wake it. A refusal
    stops new publishing until what is in flight settled, waits ``sink.retry`` (doubling
    while refusals go on) and starts again from the oldest row left. A lost connection ends
    it; the next one starts from the oldest row too, so what was in flight is published again
    and may reach consumers twice (at-least-once; they de-duplicate on the event id).
    """
    status, outbox, sink = context.status, context.outbox, delivery.sink
    connection = _Connection(delivery, context)
    try:
        await sink.connect(connection)
        if connection.failure is not None:
            raise connection.failure
        status.up()
        await _publish(delivery, connection, outbox)
    finally:
        status.counters.add(REPUBLISHED, len(connection.in_flight))
        delivery.in_flight = 0
        try:
            await _settle_outbox(connection, outbox)
        finally:
            await sink.close()


async def _publish(delivery: SinkDelivery, connection: _Connection, outbox: OutboxView) -> None:
    sink = delivery.sink
    window = sink.window
    limit = max(window, MIN_READ)
    signal = outbox.signal
    buffer: deque[OutboxRow] = deque()
    cursor = 0  # the last seq read on this connection; 0: from the oldest row
    read_at = -1  # outbox.arrivals when a read came back short: nothing new until it moves
    retry = sink.retry
    in_flight = connection.in_flight
    while True:
        # Cleared first: anything that happens from here on sets it again.
        signal.clear()
        if connection.failure is not None:
            raise connection.failure
        progressed = False
        reading = connection.reading
        if reading is not None and reading.done():
            connection.reading = None
            rows = reading.result()
            if rows:
                cursor = rows[-1].seq
                buffer.extend(rows)
            if len(rows) < limit:
                read_at = connection.read_arrivals
            progressed = True
        confirming = connection.confirming
        if confirming is not None and confirming.done():
            connection.confirming = None
            confirming.result()
            progressed = True
        if connection.refused_rows:
            if not in_flight and connection.reading is None and connection.confirming is None:
                retry = await _refused(sink, connection, outbox, retry)
                buffer.clear()
                cursor, read_at = 0, -1
                continue
        else:
            if connection.reading is None and len(buffer) < limit // 2:
                taken = outbox.take(cursor, limit)
                if taken:
                    cursor = taken[-1].seq
                    buffer.extend(taken)
                elif taken is None and outbox.arrivals != read_at:
                    connection.read_arrivals = outbox.arrivals
                    connection.reading = _wake_when_done(outbox.read(cursor, limit), signal)
            room = window - len(in_flight)
            if buffer and room > 0:
                batch = [buffer.popleft() for _ in range(min(room, len(buffer)))]
                connection.sent(batch)
                sink.publish(batch)
                progressed = True
            delivery.in_flight = len(in_flight)
        if connection.confirming is None and connection.confirmed_seqs and (
                len(connection.confirmed_seqs) >= CONFIRM_BATCH or not progressed):
            confirmed, connection.confirmed_seqs = connection.confirmed_seqs, []
            confirming = outbox.confirm(confirmed)
            if confirming.done():
                # Recorded on the loop already (the daemon's own outbox): no wake-up for it.
                confirming.result()
            else:
                connection.confirming = _wake_when_done(confirming, signal)
            retry = sink.retry
        if not progressed:
            await signal.wait()


def _wake_when_done(future: asyncio.Future[Result], signal: asyncio.Event
                    ) -> asyncio.Future[Result]:
    future.add_done_callback(lambda _: signal.set())
    return future


async def _refused(sink: Sink, connection: _Connection, outbox: OutboxView, retry: float) -> float:
    """Everything in flight is settled and some of it was refused: wait, then start over
    from the oldest row left. Returns the next delay."""
    confirmed, connection.confirmed_seqs = connection.confirmed_seqs, []
    await outbox.confirm(confirmed)
    count = len(connection.refused_rows)
    connection.refused_rows.clear()
    connection.refusing = True
    status = connection.status
    status.counters.add(REPUBLISHED, count)
    status.degraded(f"the broker refused {count} messages ({sink.refusal}); publishing them "
                    f"again in {retry:g}s", ErrorCategory.TRANSIENT)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(connection.lost.wait(), retry)
    return min(retry * 2, MAX_RETRY)


async def _settle_outbox(connection: _Connection, outbox: OutboxView) -> None:
    """Finish the outbox work under way and record what was confirmed: confirmed is
    confirmed, whatever ended the connection, and is not published again."""
    reading, confirming = connection.reading, connection.confirming
    connection.reading = connection.confirming = None
    for pending in (reading, confirming):
        if pending is not None:
            with contextlib.suppress(Exception):
                await pending
    if connection.confirmed_seqs:
        confirmed, connection.confirmed_seqs = connection.confirmed_seqs, []
        await outbox.confirm(confirmed)
