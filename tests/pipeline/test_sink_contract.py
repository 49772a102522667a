"""The sink contract and the delivery engine's own state for a sink.

A sink implements ``connect``, ``publish`` and ``close`` and reports through its
``SinkContext``; the engine (``SinkDelivery``) keeps the figures: what is in flight, the
confirm latency, the publish rate. Driven here over an outbox in memory, without a store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Literal

import pytest
from helpers.brokers import wait_until

from bridge.config.models import SinkBase
from bridge.core.model import Event, Quality, new_event_id
from bridge.core.sink import OutboxRow, Sink, SinkContext
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.pipeline.delivery import DeliveryContext, SinkDelivery


class MemoryConfig(SinkBase):
    """A sink that keeps what it is handed."""

    protocol: Literal["memory"]


class MemorySink(Sink):
    """Keeps the rows it is handed; confirms them on the next loop turn unless told not to."""

    window = 4

    def __init__(self, config: MemoryConfig, *, confirming: bool = True) -> None:
        super().__init__(config, endpoint="memory://")
        self.confirming = confirming
        self.published: list[OutboxRow] = []
        self.context: SinkContext | None = None

    async def connect(self, context: SinkContext) -> None:
        """Nothing to open."""
        self.context = context

    def publish(self, rows: Sequence[OutboxRow]) -> None:
        """Keep ``rows``; confirm them soon."""
        assert self.context is not None
        self.published.extend(rows)
        if self.confirming:
            asyncio.get_running_loop().call_soon(self.context.confirmed,
                                                 [row.seq for row in rows])

    async def close(self) -> None:
        """Nothing to close."""
        self.context = None

    def details(self) -> dict[str, Any]:
        """What the inventory shows of it beyond the engine's figures."""
        return {"kept": len(self.published)}


class MemoryOutbox:
    """One sink's outbox in memory: every row is there from the start."""

    def __init__(self, rows: Sequence[OutboxRow]) -> None:
        self.rows = list(rows)
        self.signal = asyncio.Event()
        self.arrivals = 1
        self.confirmed: list[int] = []

    def read(self, after: int, limit: int) -> asyncio.Future[list[OutboxRow]]:
        """The rows after ``after``."""
        done: asyncio.Future[list[OutboxRow]] = asyncio.get_running_loop().create_future()
        done.set_result([row for row in self.rows if row.seq > after][:limit])
        return done

    def take(self, after: int, limit: int) -> list[OutboxRow] | None:
        """Never from memory: always ``read``."""
        return None

    def confirm(self, seqs: Sequence[int]) -> asyncio.Future[int]:
        """Record the confirmed rows."""
        self.confirmed.extend(seqs)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done.set_result(len(seqs))
        return done


def make_rows(count: int) -> list[OutboxRow]:
    """``count`` rows of events of one point."""
    now = time.time()
    rows = []
    for seq in range(1, count + 1):
        event = Event(id=new_event_id(), source="plant", point="boiler.t", value=float(seq),
                      unit=None, quality=Quality.GOOD, ts=now, received_at=now,
                      protocol="memory", bridge="edge", tags={})
        body = event.to_json()
        rows.append(OutboxRow(seq, event.id, event.source, event.point, "good", now, now, "",
                              len(body), body))
    return rows


def status() -> EndpointStatus:
    """A fresh sink status."""
    return EndpointStatus(name="memory", kind="sink", protocol="memory", endpoint="memory://")


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel a delivery and wait for it to end."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_engine_delivers_a_sink_and_keeps_the_figures_itself() -> None:
    sink = MemorySink(MemoryConfig(id="memory", protocol="memory"))
    outbox = MemoryOutbox(make_rows(10))
    delivery = SinkDelivery(sink)
    task = asyncio.create_task(delivery.run(DeliveryContext(status(), outbox)),
                               name="test.delivery")
    try:
        await wait_until(lambda: len(outbox.confirmed) == 10, 5.0, "every row confirmed")
        assert [row.seq for row in sink.published] == list(range(1, 11))
        assert delivery.meter.total == 10
        assert delivery.confirm_latency is not None
        details = delivery.details()
        assert list(details) == ["publish_rate", "confirm_latency_ms", "in_flight", "kept"]
        assert details["in_flight"] == 0
        assert details["confirm_latency_ms"] is not None
        assert details["kept"] == 10
        # The figures are the engine's: nothing is written onto the sink.
        assert {"in_flight", "meter", "confirm_latency"}.isdisjoint(vars(sink))
    finally:
        await stop(task)


async def test_what_is_in_flight_is_counted_by_the_engine_up_to_the_window() -> None:
    sink = MemorySink(MemoryConfig(id="memory", protocol="memory"), confirming=False)
    outbox = MemoryOutbox(make_rows(10))
    delivery = SinkDelivery(sink)
    sink_status = status()
    task = asyncio.create_task(delivery.run(DeliveryContext(sink_status, outbox)),
                               name="test.delivery")
    try:
        await wait_until(lambda: delivery.in_flight == MemorySink.window, 5.0,
                         "a full window in flight")
        assert sink_status.state is ConnectionState.UP
        assert len(sink.published) == MemorySink.window
        assert delivery.figures().in_flight == MemorySink.window
        assert outbox.confirmed == []
    finally:
        await stop(task)
    # Ended: nothing is in flight any more; what was is published again next time.
    assert delivery.in_flight == 0
    assert sink_status.counters["republished"] == MemorySink.window


def test_a_sink_takes_what_its_configuration_selects_and_needs_no_address() -> None:
    config = MemoryConfig(id="memory", protocol="memory", points=["boiler.*"])
    sink = MemorySink(config)
    assert (sink.id, sink.protocol) == ("memory", "memory")
    route = sink.route()
    (row,) = make_rows(1)
    event = Event.from_json(row.body)
    assert route.sink == "memory"
    assert route.accepts(event)
    assert not route.accepts(Event.from_json(row.body.replace("boiler.t", "pump.t")))
    assert route.address(event) == ""
