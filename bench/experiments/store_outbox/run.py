"""Store → outbox → AMQP sink in one process, without a broker: events/s, CPU per event and
the latency from ``Store.write`` to the sink publishing an event.

The sink is the real ``AmqpSink`` on a fake connection (handed to it as its connection
factory) whose channel confirms every publish at once (one ``multiple`` ack per loop turn), so
what is measured is the store, the outbox and the sink's own work.
Run: ``python -m bench.experiments.store_outbox.run``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika.spec

from bridge.core.model import Event, Quality, new_event_id
from bridge.core.status import EndpointStatus
from bridge.pipeline.delivery import DeliveryContext, SinkDelivery, SinkOutbox, deliver
from bridge.pipeline.outbox import Outbox, OutboxLimits
from bridge.pipeline.store import Retention, Store, SyncMode
from protocols.amqp.sink import AmqpSink
from protocols.amqp.sink_config import AmqpSinkConfig

Callback = Callable[..., Any]


class _ConfirmFrame:
    def __init__(self, tag: int) -> None:
        self.method = pika.spec.Basic.Ack(delivery_tag=tag, multiple=True)


class _Channel:
    """Confirms what was published, once per loop turn, like a fast broker."""

    def __init__(self, published: dict[str, float]) -> None:
        self.published = published
        self.tag = 0
        self.scheduled = False
        self.on_confirm: Callback | None = None

    def add_on_close_callback(self, callback: Callback) -> None:
        """Never closes."""

    def add_on_return_callback(self, callback: Callback) -> None:
        """Returns nothing: every message is routed."""

    def exchange_declare(self, *args: Any, callback: Callback, **kwargs: Any) -> None:
        asyncio.get_running_loop().call_soon(callback, None)

    def confirm_delivery(self, on_confirm: Callback, *, callback: Callback) -> None:
        self.on_confirm = on_confirm
        asyncio.get_running_loop().call_soon(callback, None)

    def basic_publish(self, exchange: str, key: str, body: bytes, properties: Any,
                      mandatory: bool) -> None:
        self.tag += 1
        self.published[properties.message_id] = time.perf_counter()
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._confirm)

    def _confirm(self) -> None:
        self.scheduled = False
        assert self.on_confirm is not None
        self.on_confirm(_ConfirmFrame(self.tag))


class _Connection:
    """Opens at once and hands out the one channel."""

    def __init__(self, channel: _Channel, *, on_open_callback: Callback,
                 on_close_callback: Callback, custom_ioloop: asyncio.AbstractEventLoop,
                 **kwargs: Any) -> None:
        self.loop = custom_ioloop
        self.the_channel = channel
        self.on_close = on_close_callback
        self.is_closed = self.is_closing = False
        custom_ioloop.call_soon(on_open_callback, self)

    def add_on_connection_blocked_callback(self, callback: Callback) -> None:
        """Never blocked."""

    def add_on_connection_unblocked_callback(self, callback: Callback) -> None:
        """Never blocked."""

    def channel(self, on_open_callback: Callback) -> None:
        self.loop.call_soon(on_open_callback, self.the_channel)

    def close(self) -> None:
        self.is_closed = True
        self.loop.call_soon(self.on_close, self, ConnectionError("closed"))


def fake_broker_sink(config: AmqpSinkConfig, channel: _Channel) -> AmqpSink:
    """The real AMQP sink, connecting to a fake broker."""

    def connect(**kwargs: Any) -> Any:
        return _Connection(channel, **kwargs)

    return AmqpSink(config, bridge_id="edge", connection_factory=connect)


def make_event(index: int) -> Event:
    now = time.time()
    device = f"dev{index % 100}"
    return Event(id=new_event_id(), source=device, point=f"{device}.p{index % 20}",
                 value=float(index), unit="degC", quality=Quality.GOOD, ts=now, received_at=now,
                 protocol="modbus", bridge="edge", tags={"site": "north"})


async def run(total: int, batch: int, rate: float | None, sink_on: bool,
              sync: SyncMode) -> dict[str, float]:
    config = AmqpSinkConfig.model_validate({"id": "rabbit", "protocol": "amqp"})
    published: dict[str, float] = {}
    sink = fake_broker_sink(config, _Channel(published))
    with tempfile.TemporaryDirectory() as directory:
        outbox = Outbox(OutboxLimits(max_events=1_000_000, max_bytes=1 << 30),
                        [sink.route()] if sink_on else [])
        store = Store(Path(directory) / "fb.db", Retention(max_age=3600, max_rows=1000), outbox,
                      sync=sync)
        store.open()
        written: dict[str, float] = {}
        status = EndpointStatus(name="rabbit", kind="sink", protocol="amqp", endpoint="fake")
        task = None
        if sink_on:
            context = DeliveryContext(status=status, outbox=SinkOutbox(store, "rabbit"))
            task = asyncio.create_task(deliver(SinkDelivery(sink), context))
        events = [make_event(index) for index in range(total)]
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, total, batch):
            chunk = events[start:start + batch]
            at = time.perf_counter()
            for event in chunk:
                written[event.id] = at
            if rate is not None:
                due = wall + (start + batch) / rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                at = time.perf_counter()
                for event in chunk:
                    written[event.id] = at
            await store.write(chunk)
        if sink_on:
            # The depth is kept by the store's thread: polled, as a consumer would.
            while len(published) < total or outbox.depths["rabbit"].events:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        store.close()
    latencies = sorted((published[key] - written[key]) * 1000 for key in published)
    result = {"events/s": total / wall, "cpu us/event": cpu / total * 1e6,
              "cpu share": cpu / wall}
    if latencies:
        result["p50 ms"] = statistics.median(latencies)
        result["p99 ms"] = latencies[int(len(latencies) * 0.99) - 1]
    return result


def main() -> None:
    """Run once and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rate", type=float, default=None, help="events/s (paced)")
    parser.add_argument("--no-sink", action="store_true")
    parser.add_argument("--sync", choices=["full", "normal"], default="full",
                        help="store.sync (default full)")
    parser.add_argument("--writer-checkpoints", action="store_true",
                        help="let the writer checkpoint (SQLite's default), not a thread")
    options = parser.parse_args()
    if options.writer_checkpoints:
        Store.CHECKPOINT_EVERY = None
    result = asyncio.run(run(options.events, options.batch, options.rate, not options.no_sink,
                             options.sync))
    print(" ".join(f"{key}={value:,.2f}" for key, value in result.items()))


if __name__ == "__main__":
    main()
