"""The AMQP source: consumes one queue over the shared connection (``connection.py``).

Every connect declares what the configuration asks for (dead-letter exchange and queue, the
queue, its bindings), sets the prefetch and starts one consumer with manual acknowledgement.
A message is acknowledged once its events are stored; one that cannot be mapped is rejected
without requeueing (dead-lettered when ``dead_letter`` is configured) or, without a
dead-letter exchange, acknowledged: it is counted either way and never redelivered forever.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pika.adapters.asyncio_connection import AsyncioConnection

from bridge.core.batching import ReadingBatcher
from bridge.core.model import Reading
from bridge.core.source import Source, SourceContext
from bridge.errors import ConnectorError, ErrorCategory
from protocols.amqp.config import AmqpBinding, AmqpSourceConfig
from protocols.amqp.connection import AmqpSession, ConnectionFactory
from protocols.amqp.mapping import PROTOCOL

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AmqpAcknowledger:
    """Settles one delivery on the channel it arrived on."""

    channel: Any
    delivery_tag: int
    dead_letter: bool
    """Reject to the queue's dead-letter exchange instead of acknowledging and dropping."""

    async def accept(self) -> None:
        """Acknowledge; after a lost channel the broker re-delivers the message instead."""
        if self.channel.is_open:
            self.channel.basic_ack(self.delivery_tag)

    async def reject(self, reason: str) -> None:
        """Dead-letter the message, or acknowledge it when there is nowhere to dead-letter."""
        if not self.channel.is_open:
            return
        if self.dead_letter:
            self.channel.basic_reject(self.delivery_tag, requeue=False)
        else:
            self.channel.basic_ack(self.delivery_tag)


class _Session(AmqpSession):
    """A consuming session: deliveries become a queue of readings."""

    def __init__(self, source_id: str, endpoint: str, *, dead_letter: bool,
                 step_timeout: float) -> None:
        super().__init__(endpoint, step_timeout=step_timeout)
        self.source_id = source_id
        self.dead_letter = dead_letter
        self.pending: deque[Reading] = deque()
        self.arrived = asyncio.Event()

    def fail(self, error: ConnectorError) -> None:
        super().fail(error)
        self.arrived.set()

    def on_cancel(self, frame: Any) -> None:
        self.fail(ConnectorError(self.endpoint, "the broker cancelled the consumer (queue "
                                 "deleted?)", ErrorCategory.TRANSIENT))

    def on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        headers = properties.headers or {}
        stamp = properties.timestamp
        self.pending.append(Reading(
            source=self.source_id,
            address=method.routing_key,
            value=body,
            received_at=time.time(),
            ts=float(stamp) if isinstance(stamp, int) and stamp > 0 else None,
            ack=AmqpAcknowledger(channel, method.delivery_tag, self.dead_letter),
            message_id=properties.message_id or None,
            meta={"exchange": method.exchange, "headers": headers,
                  "redelivered": method.redelivered,
                  "content_type": properties.content_type,
                  "message_id": properties.message_id},
        ))
        self.arrived.set()


class AmqpSource(Source):
    """Consumes one queue and hands each message on as a reading."""

    def __init__(
        self,
        config: AmqpSourceConfig,
        *,
        connection_factory: ConnectionFactory = AsyncioConnection,
    ) -> None:
        super().__init__(source_id=config.id, protocol=PROTOCOL, endpoint=config.endpoint())
        self.config = config
        self._connection_factory = connection_factory

    async def run(self, context: SourceContext) -> None:
        """Connect, declare, consume until cancelled or until the connection is lost."""
        config = self.config
        session = _Session(self.id, self.endpoint, dead_letter=config.dead_letter is not None,
                           step_timeout=config.timeout)
        try:
            await session.connect(config, self._connection_factory, f"fieldbridge {self.id}",
                                  status=context.status)
            channel = await session.channel()
            channel.add_on_cancel_callback(session.on_cancel)
            await self._declare(session, channel)
            channel.basic_consume(config.queue.name, session.on_message, auto_ack=False)
            context.status.up()
            await self._receive(session, context)
        finally:
            await session.close()

    async def _declare(self, session: _Session, channel: Any) -> None:
        config = self.config
        queue = config.queue
        dead_letter = config.dead_letter
        if dead_letter is not None and dead_letter.declare:
            await session.call(
                f"declaring dead-letter exchange {dead_letter.exchange!r}",
                lambda done: channel.exchange_declare(
                    dead_letter.exchange, exchange_type=dead_letter.exchange_type,
                    durable=True, callback=done))
            if dead_letter.queue is not None:
                dead_queue = dead_letter.queue
                await session.call(
                    f"declaring dead-letter queue {dead_queue!r}",
                    lambda done: channel.queue_declare(dead_queue, durable=True, callback=done))
                await session.call(
                    f"binding dead-letter queue {dead_queue!r}",
                    lambda done: channel.queue_bind(dead_queue, dead_letter.exchange,
                                                    routing_key=dead_letter.binding_key,
                                                    callback=done))
        if queue.declare:
            await session.call(
                f"declaring queue {queue.name!r}",
                lambda done: channel.queue_declare(
                    queue.name, durable=queue.durable, auto_delete=queue.auto_delete,
                    arguments=config.queue_arguments(), callback=done))
        else:
            await session.call(
                f"checking queue {queue.name!r}",
                lambda done: channel.queue_declare(queue.name, passive=True, callback=done))
        for binding in queue.bindings:
            await session.call(
                f"binding queue {queue.name!r} to exchange {binding.exchange!r}",
                functools.partial(_bind, channel, queue.name, binding))
        await session.call(
            "setting the prefetch",
            lambda done: channel.basic_qos(prefetch_count=config.prefetch, callback=done))

    async def _receive(self, session: _Session, context: SourceContext) -> None:
        pending = session.pending
        batcher = ReadingBatcher(context)
        while True:
            if session.failure.done():
                raise session.failure.result()
            if pending:
                reading = pending.popleft()
                await batcher.add(reading, more_waiting=bool(pending))
            else:
                # Deliveries arrive on this event loop: nothing can slip in between the
                # emptiness check and the clear.
                session.arrived.clear()
                await session.arrived.wait()


def _bind(channel: Any, queue: str, binding: AmqpBinding, done: Callable[[Any], None]) -> None:
    channel.queue_bind(queue, binding.exchange, routing_key=binding.routing_key,
                       arguments=binding.arguments or None, callback=done)
