"""The AMQP sink: publishes the outbox to an exchange with publisher confirms, pipelined.

Every connect declares the exchange and the configured topology, turns on publisher confirms,
then reads the outbox in ``seq`` order and publishes with at most ``window`` messages awaiting
confirmation. The broker confirms in order, often many messages with one ``multiple`` ack;
confirmed rows are deleted from the outbox in batches. A nack means the broker refused a message
(a full queue with ``overflow: reject-publish``, a quorum queue without a leader): the sink
stops taking new rows, lets what is in flight settle, waits ``retry`` (doubling while refusals
go on) and starts again from the oldest row left in the outbox. A lost connection ends ``run``;
the next one starts from the oldest row too, so what was in flight is published again and may
reach consumers twice (at-least-once; they de-duplicate on ``message_id``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pika
import pika.exceptions
import pika.spec

from bridge.core.model import Event
from bridge.core.payload import Template
from bridge.core.sink import EventSelector, OutboxRow, OutboxView, Sink, SinkContext
from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory
from protocols.amqp.connection import (
    AmqpSession,
    CoalescingConnection,
    ConnectionFactory,
    request,
)
from protocols.amqp.mapping import PROTOCOL
from protocols.amqp.sink_config import AmqpSinkConfig, QueueBinding

logger = logging.getLogger(__name__)

Result = TypeVar("Result")

CONTENT_TYPE = "application/json"
DELETE_BATCH = 500
"""Confirmed rows are deleted this many at a time, or sooner when there is nothing to publish."""
MIN_READ = 256
"""Rows read from the outbox at a time, at least (else ``window``)."""
MAX_RETRY = 60.0
"""Seconds, at most, between attempts to publish messages the broker keeps refusing."""
LATENCY_WEIGHT = 0.1
"""Weight of the newest sample in the confirm latency's moving average."""
MAX_KEY_BYTES = 255

_FIELDS: dict[str, Callable[[Event], str]] = {
    "source": lambda event: event.source,
    "point": lambda event: event.point,
    "protocol": lambda event: event.protocol,
    "quality": lambda event: event.quality.value,
    "bridge": lambda event: event.bridge,
    "unit": lambda event: event.unit or "",
}


def escape_word(value: str) -> str:
    """``value`` as exactly one routing-key word: ``%``, ``.``, ``*`` and ``#`` percent-encoded
    (``%25``, ``%2E``, ``%2A``, ``%23``), so it can be read back unambiguously."""
    return value.replace("%", "%25").replace(".", "%2E").replace("*", "%2A").replace("#", "%23")


def compile_routing_key(text: str) -> Callable[[Event], str]:
    """The routing key of an event, from a template such as ``{source}.{point}``.

    Each placeholder becomes one word (``escape_word``); a key longer than AMQP's 255 bytes
    is cut there.
    """
    template = Template.parse(text)
    getters = [(name, _tag(name.removeprefix("tags.")) if name.startswith("tags.")
                else _FIELDS[name]) for name in template.names]

    def routing_key(event: Event) -> str:
        key = template.expand({name: escape_word(get(event)) for name, get in getters})
        encoded = key.encode()
        if len(encoded) > MAX_KEY_BYTES:
            key = encoded[:MAX_KEY_BYTES].decode("utf-8", errors="ignore")
        return key

    return routing_key


def _tag(name: str) -> Callable[[Event], str]:
    def value(event: Event) -> str:
        return event.tags.get(name, "")

    return value


@dataclass(slots=True)
class _Sent:
    row: OutboxRow
    at: float
    """When it was published (monotonic)."""


class _Publishing(AmqpSession):
    """One connection's publishing state: messages in flight by delivery tag, and the outcome
    of those the broker settled."""

    def __init__(self, endpoint: str, *, step_timeout: float, wake: asyncio.Event,
                 sink: AmqpSink, status: EndpointStatus) -> None:
        super().__init__(endpoint, step_timeout=step_timeout)
        self.wake = wake
        self.sink = sink
        self.status = status
        self.in_flight: dict[int, _Sent] = {}
        self.next_tag = 1
        """The delivery tag of the next publish (confirm mode numbers them from 1)."""
        self.lowest = 1
        """No tag below this is in flight."""
        self.confirmed: list[int] = []
        """Outbox rows confirmed but not yet deleted."""
        self.refused: list[OutboxRow] = []
        self.refusing = False
        """The broker refused messages lately (the state is degraded until it accepts one)."""
        self.blocked = False
        self.reading: asyncio.Future[list[OutboxRow]] | None = None
        self.read_arrivals = 0
        """``outbox.arrivals`` when the current read started."""
        self.deleting: asyncio.Future[int] | None = None

    async def settle_outbox(self, outbox: OutboxView) -> None:
        """Finish the outbox work under way and delete what was confirmed: confirmed is
        confirmed, whatever ended the connection, and is not published again."""
        reading, deleting = self.reading, self.deleting
        self.reading = self.deleting = None
        for pending in (reading, deleting):
            if pending is not None:
                await pending
        if self.confirmed:
            confirmed, self.confirmed = self.confirmed, []
            await outbox.confirm(confirmed)

    def fail(self, error: ConnectorError) -> None:
        super().fail(error)
        self.wake.set()

    def publish(self, channel: Any, exchange: str, row: OutboxRow) -> None:
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=row.id,
            timestamp=max(0, int(row.ts)),
            app_id="fieldbridge",
            headers={"source": row.source, "point": row.point, "quality": row.quality},
        )
        try:
            channel.basic_publish(exchange, row.address, row.body.encode(), properties,
                                  mandatory=True)
        except pika.exceptions.AMQPError as exc:
            raise ConnectorError(self.endpoint, f"cannot publish: {exc!r}",
                                 ErrorCategory.TRANSIENT) from exc
        self.in_flight[self.next_tag] = _Sent(row, time.monotonic())
        self.next_tag += 1

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = range(self.lowest, tag + 1) if method.multiple else (tag,)
        in_flight = self.in_flight
        last: _Sent | None = None
        settled = 0
        for each in tags:
            sent = in_flight.pop(each, None)
            if sent is None:
                continue
            settled += 1
            last = sent
            if acked:
                self.confirmed.append(sent.row.seq)
            else:
                self.refused.append(sent.row)
        while self.lowest < self.next_tag and self.lowest not in in_flight:
            self.lowest += 1
        if last is not None:
            self.sink.settled(settled, acked, time.monotonic() - last.at, self.status)
        if acked and self.refusing and not self.refused:
            self.refusing = False
            if not self.blocked:
                self.status.up()
        self.wake.set()

    def on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.sink.unroutable(method.routing_key, self.status)

    def on_blocked(self, connection: Any, frame: Any) -> None:
        self.blocked = True
        reason = frame.method.reason or "resource alarm"
        self.status.degraded(f"the broker blocks publishing ({reason})", ErrorCategory.TRANSIENT)

    def on_unblocked(self, connection: Any, frame: Any) -> None:
        self.blocked = False
        if not self.refusing:
            self.status.up()


class AmqpSink(Sink):
    """Publishes every event of its outbox to one exchange."""

    def __init__(
        self,
        config: AmqpSinkConfig,
        *,
        bridge_id: str,
        connection_factory: ConnectionFactory = CoalescingConnection,
    ) -> None:
        super().__init__(sink_id=config.id, protocol=PROTOCOL, endpoint=config.endpoint(),
                         selector=EventSelector.of(config))
        self.config = config
        self.bridge_id = bridge_id
        self.routing_key = compile_routing_key(config.routing_key)
        self._warned_unroutable = False
        self._connection_factory = connection_factory

    def address(self, event: Event) -> str:
        """The event's routing key."""
        return self.routing_key(event)

    def details(self) -> dict[str, Any]:
        """Publish rate, confirm latency, what is in flight, and the window."""
        return {**super().details(), "window": self.config.window}

    def settled(self, count: int, acked: bool, latency: float, status: EndpointStatus) -> None:
        """The broker settled ``count`` messages (acked or refused)."""
        status.counters["confirmed" if acked else "nacked"] += count
        if acked:
            self.meter.add(count)
        average = self.confirm_latency
        self.confirm_latency = latency if average is None else (
            average + LATENCY_WEIGHT * (latency - average))

    def unroutable(self, routing_key: str, status: EndpointStatus) -> None:
        """The exchange had no binding for a message: RabbitMQ returned it, then confirmed it."""
        status.counters["unroutable"] += 1
        status.details["last_unroutable"] = {"routing_key": routing_key, "at": time.time()}
        if not self._warned_unroutable:
            self._warned_unroutable = True
            logger.warning("sink %s: no queue is bound for routing key %r; such messages are "
                           "dropped by the broker and counted as unroutable", self.id,
                           routing_key)

    async def run(self, context: SinkContext) -> None:
        """Connect, declare, and publish the outbox until cancelled or the connection is lost."""
        config = self.config
        status = context.status
        outbox = context.outbox
        session = _Publishing(self.endpoint, step_timeout=config.timeout,
                              wake=outbox.signal, sink=self, status=status)
        try:
            connection = await session.connect(
                config, self._connection_factory, f"fieldbridge {self.bridge_id} sink {self.id}",
                status=status)
            connection.add_on_connection_blocked_callback(session.on_blocked)
            connection.add_on_connection_unblocked_callback(session.on_unblocked)
            channel = await session.channel()
            await self._declare(session, channel)
            await session.call("enabling publisher confirms",
                               request(channel.confirm_delivery, session.on_confirm))
            channel.add_on_return_callback(session.on_return)
            status.up()
            await self._publish(session, channel, outbox, status)
        finally:
            status.counters["republished"] += len(session.in_flight)
            self.in_flight = 0
            try:
                await session.settle_outbox(outbox)
            finally:
                await session.close()

    async def _declare(self, session: AmqpSession, channel: Any) -> None:
        config = self.config
        exchange = config.exchange
        topology = config.topology
        exchanges = [(other.name, other.type, other.durable, other.arguments)
                     for other in topology.exchanges]
        if exchange.declare:
            exchanges.insert(0, (exchange.name, exchange.type, exchange.durable,
                                 exchange.arguments))
        for name, kind, durable, arguments in exchanges:
            await session.call(f"declaring exchange {name!r}", request(
                channel.exchange_declare, name, kind, durable=durable,
                arguments=arguments or None))
        for queue in topology.queues:
            await session.call(f"declaring queue {queue.name!r}", request(
                channel.queue_declare, queue.name, durable=queue.durable,
                arguments=queue.declare_arguments()))
            bindings = queue.bindings if queue.bindings is not None else [QueueBinding()]
            for binding in bindings:
                source = binding.exchange or exchange.name
                await session.call(
                    f"binding queue {queue.name!r} to exchange {source!r}", request(
                        channel.queue_bind, queue.name, source, routing_key=binding.routing_key,
                        arguments=binding.arguments or None))
        for link in topology.bindings:
            await session.call(
                f"binding exchange {link.destination!r} to {link.source!r}", request(
                    channel.exchange_bind, link.destination, link.source,
                    routing_key=link.routing_key, arguments=link.arguments or None))

    async def _publish(self, session: _Publishing, channel: Any, outbox: OutboxView,
                       status: EndpointStatus) -> None:
        """Publish the outbox in order, ``window`` messages ahead of the confirms.

        One loop drives everything: rows stored while it keeps up are taken from memory
        (``outbox.take``); other outbox reads, and deletions, run on the store's thread as
        futures while publishing goes on, and every completion (a read, a deletion, a broker
        confirm, rows stored) sets ``outbox.signal`` to wake it.
        """
        config = self.config
        window = config.window
        exchange = config.exchange.name
        limit = max(window, MIN_READ)
        signal = outbox.signal
        buffer: deque[OutboxRow] = deque()
        cursor = 0  # the last seq read on this connection; 0: from the oldest row
        read_at = -1  # outbox.arrivals when a read came back short: nothing new until it moves
        retry = config.retry
        in_flight = session.in_flight
        while True:
            # Cleared first: anything that happens from here on sets it again.
            signal.clear()
            if session.failure.done():
                raise session.failure.result()
            progressed = False
            reading = session.reading
            if reading is not None and reading.done():
                session.reading = None
                rows = reading.result()
                if rows:
                    cursor = rows[-1].seq
                    buffer.extend(rows)
                if len(rows) < limit:
                    read_at = session.read_arrivals
                progressed = True
            deleting = session.deleting
            if deleting is not None and deleting.done():
                session.deleting = None
                deleting.result()
                progressed = True
            if session.refused:
                if not in_flight and session.reading is None and session.deleting is None:
                    retry = await self._refused(session, outbox, status, retry)
                    buffer.clear()
                    cursor, read_at = 0, -1
                    continue
            else:
                if session.reading is None and len(buffer) < limit // 2:
                    taken = outbox.take(cursor, limit)
                    if taken:
                        cursor = taken[-1].seq
                        buffer.extend(taken)
                    elif taken is None and outbox.arrivals != read_at:
                        session.read_arrivals = outbox.arrivals
                        session.reading = self._wake_when_done(outbox.read(cursor, limit),
                                                               signal)
                while buffer and len(in_flight) < window:
                    session.publish(channel, exchange, buffer.popleft())
                    status.counters["published"] += 1
                    progressed = True
                self.in_flight = len(in_flight)
            if session.deleting is None and session.confirmed and (
                    len(session.confirmed) >= DELETE_BATCH or not progressed):
                confirmed, session.confirmed = session.confirmed, []
                session.deleting = self._wake_when_done(outbox.confirm(confirmed), signal)
                retry = config.retry
            if not progressed:
                await signal.wait()

    @staticmethod
    def _wake_when_done(future: asyncio.Future[Result], signal: asyncio.Event
                        ) -> asyncio.Future[Result]:
        future.add_done_callback(lambda _: signal.set())
        return future

    async def _refused(self, session: _Publishing, outbox: OutboxView, status: EndpointStatus,
                       retry: float) -> float:
        """Everything in flight is settled and some of it was refused: wait, then start over
        from the oldest row left. Returns the next delay."""
        confirmed, session.confirmed = session.confirmed, []
        await outbox.confirm(confirmed)
        count = len(session.refused)
        session.refused.clear()
        session.refusing = True
        status.counters["republished"] += count
        status.degraded(f"the broker refused {count} messages (nack; a full queue with "
                        f"overflow: reject-publish?); publishing them again in {retry:g}s",
                        ErrorCategory.TRANSIENT)
        await asyncio.wait((session.failure,), timeout=retry)
        return min(retry * 2, MAX_RETRY)
