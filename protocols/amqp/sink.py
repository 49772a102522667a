"""The AMQP sink: publishes to an exchange with publisher confirms.

Every connect declares the exchange and the configured topology and turns on publisher
confirms. The delivery engine (``bridge.pipeline.delivery``) then hands it rows in ``seq``
order with at most ``window`` awaiting confirmation; the broker confirms in order, often many
messages with one ``multiple`` ack, which the sink turns back into rows for the engine. A nack
means the broker refused a message (a full queue with ``overflow: reject-publish``, a quorum
queue without a leader): the engine publishes it again, in order, after ``retry``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions
import pika.spec

from bridge.core.counters import UNROUTABLE
from bridge.core.model import Event
from bridge.core.sink import OutboxRow, Sink, SinkContext, compile_address
from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory
from protocols.amqp.connection import (
    AmqpSession,
    ConnectionFactory,
    request,
)
from protocols.amqp.pika_adapter import CoalescingConnection
from protocols.amqp.sink_config import AmqpSinkConfig, QueueBinding

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
MAX_KEY_BYTES = 255


def escape_word(value: str) -> str:
    """``value`` as exactly one routing-key word: ``%``, ``.``, ``*`` and ``#`` percent-encoded
    (``%25``, ``%2E``, ``%2A``, ``%23``), so it can be read back unambiguously."""
    return value.replace("%", "%25").replace(".", "%2E").replace("*", "%2A").replace("#", "%23")


def compile_routing_key(text: str) -> Callable[[Event], str]:
    """The routing key of an event, from a template such as ``{source}.{point}``.

    Each placeholder becomes one word (``escape_word``); a key longer than AMQP's 255 bytes
    is cut there.
    """
    address = compile_address(text, escape_word)

    def routing_key(event: Event) -> str:
        key = address(event)
        encoded = key.encode()
        if len(encoded) > MAX_KEY_BYTES:
            key = encoded[:MAX_KEY_BYTES].decode("utf-8", errors="ignore")
        return key

    return routing_key


class _Publishing(AmqpSession):
    """One connection's publishing state: the ``seq`` of each delivery tag in flight."""

    def __init__(self, endpoint: str, *, step_timeout: float, context: SinkContext,
                 sink: AmqpSink) -> None:
        super().__init__(endpoint, step_timeout=step_timeout)
        self.context = context
        self.sink = sink
        self.tags: dict[int, int] = {}
        """Delivery tag → outbox ``seq``, while in flight."""
        self.next_tag = 1
        """The delivery tag of the next publish (confirm mode numbers them from 1)."""
        self.lowest = 1
        """No tag below this is in flight."""
        self.publishing: Any = None
        """The channel publishing runs on, in confirm mode."""

    def fail(self, error: ConnectorError) -> None:
        super().fail(error)
        self.context.failed(error)

    def publish(self, exchange: str, row: OutboxRow) -> None:
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=row.id,
            timestamp=max(0, int(row.ts)),
            app_id="fieldbridge",
            headers={"source": row.source, "point": row.point, "quality": row.quality},
        )
        try:
            self.publishing.basic_publish(exchange, row.address, row.body.encode(), properties,
                                       mandatory=True)
        except pika.exceptions.AMQPError as exc:
            raise ConnectorError(self.endpoint, f"cannot publish: {exc!r}",
                                 ErrorCategory.TRANSIENT) from exc
        self.tags[self.next_tag] = row.seq
        self.next_tag += 1

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        tags = self.tags
        settled = range(self.lowest, tag + 1) if method.multiple else (tag,)
        seqs = [seq for seq in (tags.pop(each, None) for each in settled) if seq is not None]
        while self.lowest < self.next_tag and self.lowest not in tags:
            self.lowest += 1
        if isinstance(method, pika.spec.Basic.Ack):
            self.context.confirmed(seqs)
        else:
            self.context.refused(seqs)

    def on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.sink.unroutable(method.routing_key, self.context.status)

    def on_blocked(self, connection: Any, frame: Any) -> None:
        self.sink.blocked = True
        reason = frame.method.reason or "resource alarm"
        self.context.status.degraded(f"the broker blocks publishing ({reason})",
                                  ErrorCategory.TRANSIENT)

    def on_unblocked(self, connection: Any, frame: Any) -> None:
        self.sink.blocked = False
        self.context.status.up()


class AmqpSink(Sink):
    """Publishes every event of its outbox to one exchange."""

    refusal = "nack; a full queue with overflow: reject-publish?"

    def __init__(
        self,
        config: AmqpSinkConfig,
        *,
        bridge_id: str,
        connection_factory: ConnectionFactory = CoalescingConnection,
    ) -> None:
        super().__init__(config, endpoint=config.endpoint())
        self.config = config
        self.bridge_id = bridge_id
        self.window = config.window
        self.retry = config.retry
        self.routing_key = compile_routing_key(config.routing_key)
        self.blocked = False
        """The broker blocks publishing (a resource alarm)."""
        self._warned_unroutable = False
        self._connection_factory = connection_factory
        self._session: _Publishing | None = None

    def address(self, event: Event) -> str:
        """The event's routing key."""
        return self.routing_key(event)

    def details(self) -> dict[str, Any]:
        """The window."""
        return {"window": self.config.window}

    def ready(self) -> bool:
        """Not while the broker blocks publishing."""
        return not self.blocked

    def unroutable(self, routing_key: str, status: EndpointStatus) -> None:
        """The exchange had no binding for a message: RabbitMQ returned it, then confirmed it."""
        status.counters.add(UNROUTABLE)
        status.details["last_unroutable"] = {"routing_key": routing_key, "at": time.time()}
        if not self._warned_unroutable:
            self._warned_unroutable = True
            logger.warning("sink %s: no queue is bound for routing key %r; such messages are "
                           "dropped by the broker and counted as unroutable", self.id,
                           routing_key)

    async def connect(self, context: SinkContext) -> None:
        """Connect, declare the exchange and topology, and turn on publisher confirms."""
        config = self.config
        self.blocked = False
        session = self._session = _Publishing(self.endpoint, step_timeout=config.timeout,
                                              context=context, sink=self)
        connection = await session.connect(
            config, self._connection_factory, f"fieldbridge {self.bridge_id} sink {self.id}",
            status=context.status)
        connection.add_on_connection_blocked_callback(session.on_blocked)
        connection.add_on_connection_unblocked_callback(session.on_unblocked)
        channel = await session.channel()
        await self._declare(session, channel)
        await session.call("enabling publisher confirms",
                           request(channel.confirm_delivery, session.on_confirm))
        channel.add_on_return_callback(session.on_return)
        session.publishing = channel

    def publish(self, rows: Sequence[OutboxRow]) -> None:
        """Publish ``rows`` to the exchange, persistent, each under its routing key."""
        session = self._session
        assert session is not None
        exchange = self.config.exchange.name
        for row in rows:
            session.publish(exchange, row)

    async def close(self) -> None:
        """Close the connection."""
        session, self._session = self._session, None
        if session is not None:
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
