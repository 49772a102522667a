"""The delivery engine: one for every sink, in the daemon's process or in a worker's.

``deliver`` drives a ``BrokerSink`` over its outbox: the sink only connects, publishes batches,
reports confirmations, refusals and failures, and closes. ``SinkOutbox`` is the outbox as one
sink sees it in the daemon's process; a sink in a worker process gets a view whose reads and
confirmations the daemon carries out (``bridge.pipeline.worker``), and the same engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

from bridge.core.sink import BrokerSink, OutboxRow, OutboxView, SinkContext
from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory
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


class _Link:
    """One connection's delivery state: rows in flight, and the outcome of those the broker
    settled. The sink reports to it from its broker's callbacks."""

    def __init__(self, sink: BrokerSink, status: EndpointStatus, wake: asyncio.Event) -> None:
        self.sink = sink
        self._status = status
        self.wake = wake
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

    def sent(self, rows: Sequence[OutboxRow]) -> None:
        """``rows`` are being published."""
        now = time.monotonic()
        in_flight = self.in_flight
        for row in rows:
            in_flight[row.seq] = (row, now)
        self._status.counters["published"] += len(rows)

    def confirmed(self, seqs: Sequence[int]) -> None:
        """The broker took these rows."""
        settled = self._settle(seqs, self.confirmed_seqs.append, acked=True)
        if settled and self.refusing and not self.refused_rows:
            self.refusing = False
            if self.sink.ready():
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
            sink = self.sink
            self._status.counters["confirmed" if acked else "nacked"] += settled
            if acked:
                sink.meter.add(settled)
            latency = time.monotonic() - last
            average = sink.confirm_latency
            sink.confirm_latency = latency if average is None else (
                average + LATENCY_WEIGHT * (latency - average))
        self.wake.set()
        return settled

    def failed(self, error: ConnectorError) -> None:
        """The connection is lost (the first error wins)."""
        if self.failure is None:
            self.failure = error
        self.lost.set()
        self.wake.set()


async def deliver(sink: BrokerSink, context: SinkContext) -> None:
    """Deliver the outbox through one connection of ``sink`` until cancelled or the
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
    status, outbox = context.status, context.outbox
    link = _Link(sink, status, outbox.signal)
    try:
        await sink.connect(link)
        if link.failure is not None:
            raise link.failure
        status.up()
        await _publish(sink, link, outbox)
    finally:
        status.counters["republished"] += len(link.in_flight)
        sink.in_flight = 0
        try:
            await _settle_outbox(link, outbox)
        finally:
            await sink.close()


async def _publish(sink: BrokerSink, link: _Link, outbox: OutboxView) -> None:
    window = sink.window
    limit = max(window, MIN_READ)
    signal = outbox.signal
    buffer: deque[OutboxRow] = deque()
    cursor = 0  # the last seq read on this connection; 0: from the oldest row
    read_at = -1  # outbox.arrivals when a read came back short: nothing new until it moves
    retry = sink.retry
    in_flight = link.in_flight
    while True:
        # Cleared first: anything that happens from here on sets it again.
        signal.clear()
        if link.failure is not None:
            raise link.failure
        progressed = False
        reading = link.reading
        if reading is not None and reading.done():
            link.reading = None
            rows = reading.result()
            if rows:
                cursor = rows[-1].seq
                buffer.extend(rows)
            if len(rows) < limit:
                read_at = link.read_arrivals
            progressed = True
        confirming = link.confirming
        if confirming is not None and confirming.done():
            link.confirming = None
            confirming.result()
            progressed = True
        if link.refused_rows:
            if not in_flight and link.reading is None and link.confirming is None:
                retry = await _refused(sink, link, outbox, retry)
                buffer.clear()
                cursor, read_at = 0, -1
                continue
        else:
            if link.reading is None and len(buffer) < limit // 2:
                taken = outbox.take(cursor, limit)
                if taken:
                    cursor = taken[-1].seq
                    buffer.extend(taken)
                elif taken is None and outbox.arrivals != read_at:
                    link.read_arrivals = outbox.arrivals
                    link.reading = _wake_when_done(outbox.read(cursor, limit), signal)
            room = window - len(in_flight)
            if buffer and room > 0:
                batch = [buffer.popleft() for _ in range(min(room, len(buffer)))]
                link.sent(batch)
                sink.publish(batch)
                progressed = True
            sink.in_flight = len(in_flight)
        if link.confirming is None and link.confirmed_seqs and (
                len(link.confirmed_seqs) >= CONFIRM_BATCH or not progressed):
            confirmed, link.confirmed_seqs = link.confirmed_seqs, []
            link.confirming = _wake_when_done(outbox.confirm(confirmed), signal)
            retry = sink.retry
        if not progressed:
            await signal.wait()


def _wake_when_done(future: asyncio.Future[Result], signal: asyncio.Event
                    ) -> asyncio.Future[Result]:
    future.add_done_callback(lambda _: signal.set())
    return future


async def _refused(sink: BrokerSink, link: _Link, outbox: OutboxView, retry: float) -> float:
    """Everything in flight is settled and some of it was refused: wait, then start over
    from the oldest row left. Returns the next delay."""
    confirmed, link.confirmed_seqs = link.confirmed_seqs, []
    await outbox.confirm(confirmed)
    count = len(link.refused_rows)
    link.refused_rows.clear()
    link.refusing = True
    status = link.status
    status.counters["republished"] += count
    status.degraded(f"the broker refused {count} messages ({sink.refusal}); publishing them "
                    f"again in {retry:g}s", ErrorCategory.TRANSIENT)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(link.lost.wait(), retry)
    return min(retry * 2, MAX_RETRY)


async def _settle_outbox(link: _Link, outbox: OutboxView) -> None:
    """Finish the outbox work under way and record what was confirmed: confirmed is
    confirmed, whatever ended the connection, and is not published again."""
    reading, confirming = link.reading, link.confirming
    link.reading = link.confirming = None
    for pending in (reading, confirming):
        if pending is not None:
            with contextlib.suppress(Exception):
                await pending
    if link.confirmed_seqs:
        confirmed, link.confirmed_seqs = link.confirmed_seqs, []
        await outbox.confirm(confirmed)
