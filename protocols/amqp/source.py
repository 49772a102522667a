"""The AMQP source: pika's asyncio adapter on the daemon's event loop, callbacks wrapped in
futures.

Every connect declares what the configuration asks for (dead-letter exchange and queue, the
queue, its bindings), sets the prefetch and starts one consumer with manual acknowledgement.
A message is acknowledged once its events are stored; one that cannot be mapped is rejected
without requeueing (dead-lettered when ``dead_letter`` is configured) or, without a
dead-letter exchange, acknowledged: it is counted either way and never redelivered forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed,
    AMQPConnectorPhaseErrorBase,
)

from bridge.errors import ConnectorError, ErrorCategory
from bridge.model import Reading
from bridge.payload import MessageMapper
from bridge.source import Source, SourceContext
from protocols.amqp.config import AmqpBinding, AmqpSourceConfig
from protocols.amqp.mapping import PROTOCOL

logger = logging.getLogger(__name__)

MAX_BATCH = 500
"""At most this many messages are handed on together."""
OPEN_MARGIN = 5.0
"""Seconds granted beyond ``timeout`` for pika to report the outcome of a connection attempt."""
CLOSE_TIMEOUT = 5.0
"""Seconds to wait for the broker to confirm a close before giving up on it."""

_REPLY_CATEGORIES = {
    403: ErrorCategory.AUTH,  # access refused
    404: ErrorCategory.CONFIG,  # no such queue or exchange
    405: ErrorCategory.CONFIG,  # resource locked (exclusive queue of another connection)
    406: ErrorCategory.CONFIG,  # precondition failed (declared with other arguments)
    530: ErrorCategory.AUTH,  # not allowed (virtual host)
    320: ErrorCategory.TRANSIENT,  # connection forced (broker shutdown, closed by an admin)
}

ConnectionFactory = Callable[..., AsyncioConnection]
"""Creates the pika connection from keyword arguments; tests may pass a fake."""


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


class _Session:
    """One connection's callbacks, turned into futures and a queue of readings."""

    def __init__(self, source_id: str, endpoint: str, *, dead_letter: bool,
                 step_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.step_timeout = step_timeout
        self.source_id = source_id
        self.endpoint = endpoint
        self.dead_letter = dead_letter
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.failure: asyncio.Future[ConnectorError] = loop.create_future()
        self.pending: deque[Reading] = deque()
        self.arrived = asyncio.Event()

    def fail(self, error: ConnectorError) -> None:
        if not self.failure.done():
            self.failure.set_result(error)
        self.arrived.set()

    def on_open(self, connection: Any) -> None:
        if not self.opened.done():
            self.opened.set_result(None)

    def on_open_error(self, connection: Any, error: BaseException) -> None:
        if not self.opened.done():
            self.opened.set_exception(_open_error(self.endpoint, error))
        if not self.closed.done():
            self.closed.set_result(None)

    def on_close(self, connection: Any, error: BaseException) -> None:
        self.fail(_closed_error(self.endpoint, "connection", error))
        if not self.closed.done():
            self.closed.set_result(None)

    def on_channel_close(self, channel: Any, error: BaseException) -> None:
        self.fail(_closed_error(self.endpoint, "channel", error))

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
            meta={"exchange": method.exchange, "headers": headers,
                  "redelivered": method.redelivered,
                  "content_type": properties.content_type,
                  "message_id": properties.message_id},
        ))
        self.arrived.set()

    async def call(self, what: str, start: Callable[[Callable[[Any], None]], Any]) -> Any:
        """Start one broker round trip and wait for its reply or for the session to fail."""
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(frame: Any) -> None:
            if not reply.done():
                reply.set_result(frame)

        start(done)
        timeout = self.step_timeout
        try:
            await asyncio.wait((reply, self.failure), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            reply.cancel()
        if self.failure.done():
            error = self.failure.result()
            raise ConnectorError(self.endpoint, f"{what}: {error.reason}", error.category)
        if not reply.done() or reply.cancelled():
            raise ConnectorError(self.endpoint, f"{what}: no answer within {timeout:g}s",
                                 ErrorCategory.TRANSIENT)
        return reply.result()


class AmqpSource(Source):
    """Consumes one queue and hands each message on as a reading."""

    def __init__(
        self,
        config: AmqpSourceConfig,
        mapper: MessageMapper,
        *,
        connection_factory: ConnectionFactory = AsyncioConnection,
    ) -> None:
        super().__init__(source_id=config.id, protocol=PROTOCOL, endpoint=config.endpoint())
        self.config = config
        self.mapper = mapper
        self._connection_factory = connection_factory

    async def run(self, context: SourceContext) -> None:
        """Connect, declare, consume until cancelled or until the connection is lost."""
        self.mapper.attach(context.status)
        config = self.config
        session = _Session(self.id, self.endpoint, dead_letter=config.dead_letter is not None,
                           step_timeout=config.timeout)
        parameters = await self._parameters()
        connection = self._connection_factory(
            parameters=parameters,
            on_open_callback=session.on_open,
            on_open_error_callback=session.on_open_error,
            on_close_callback=session.on_close,
            custom_ioloop=asyncio.get_running_loop(),
        )
        try:
            # pika's stack_timeout ends a slow handshake first and reports it through
            # on_open_error; this margin only guards against a callback that never comes.
            limit = config.timeout + OPEN_MARGIN
            try:
                await asyncio.wait_for(asyncio.shield(session.opened), limit)
            except TimeoutError:
                raise ConnectorError(self.endpoint, f"no connection within {limit:g}s",
                                     ErrorCategory.TRANSIENT) from None
            channel = await session.call(
                "opening a channel",
                lambda done: connection.channel(on_open_callback=done))
            channel.add_on_close_callback(session.on_channel_close)
            channel.add_on_cancel_callback(session.on_cancel)
            await self._declare(session, channel)
            channel.basic_consume(config.queue.name, session.on_message, auto_ack=False)
            context.status.up()
            await self._receive(session, context)
        finally:
            await self._close(connection, session)

    async def _parameters(self) -> pika.ConnectionParameters:
        config = self.config
        options: dict[str, Any] = {}
        if config.tls is not None:
            try:
                ssl_context = await asyncio.to_thread(config.tls.context)
            except (OSError, ssl.SSLError) as exc:
                raise ConnectorError(self.endpoint, f"TLS setup failed: {exc}",
                                     ErrorCategory.CONFIG) from exc
            options["ssl_options"] = pika.SSLOptions(ssl_context, config.host)
        if config.heartbeat is not None:
            options["heartbeat"] = max(1, round(config.heartbeat))
        return pika.ConnectionParameters(
            host=config.host,
            port=config.port_number,
            virtual_host=config.virtual_host,
            credentials=pika.PlainCredentials(config.username,
                                              config.password.get_secret_value()),
            connection_attempts=1,
            socket_timeout=config.timeout,
            stack_timeout=config.timeout,
            blocked_connection_timeout=None,
            client_properties={"connection_name": f"fieldbridge {self.id}"},
            **options,
        )

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
        while True:
            await session.arrived.wait()
            if session.failure.done():
                raise session.failure.result()
            batch = [pending.popleft() for _ in range(min(len(pending), MAX_BATCH))]
            if not pending:
                session.arrived.clear()
            if batch:
                await context.publish(batch)
                context.status.success()

    async def _close(self, connection: Any, session: _Session) -> None:
        if not (connection.is_closed or connection.is_closing):
            with contextlib.suppress(pika.exceptions.ConnectionWrongStateError):
                connection.close()
        if not session.closed.done():
            # Cancellation may have brought us here: the wait is short and bounded.
            await asyncio.wait((session.closed,), timeout=CLOSE_TIMEOUT)
        session.opened.cancel()
        session.failure.cancel()


def _bind(channel: Any, queue: str, binding: AmqpBinding, done: Callable[[Any], None]) -> None:
    channel.queue_bind(queue, binding.exchange, routing_key=binding.routing_key,
                       arguments=binding.arguments or None, callback=done)


def _reply(error: BaseException) -> tuple[int | None, str]:
    if isinstance(error, pika.exceptions.ConnectionClosed | pika.exceptions.ChannelClosed):
        return error.reply_code, error.reply_text
    return None, str(error) or type(error).__name__


def _closed_error(endpoint: str, what: str, error: BaseException) -> ConnectorError:
    code, text = _reply(error)
    category = _REPLY_CATEGORIES.get(code, ErrorCategory.PROTOCOL) if code else (
        ErrorCategory.TRANSIENT)
    detail = f"{code} {text}" if code else text
    return ConnectorError(endpoint, f"{what} closed: {detail}", category)


def _open_error(endpoint: str, error: BaseException) -> ConnectorError:
    cause = error
    if isinstance(cause, AMQPConnectionWorkflowFailed) and cause.exceptions:
        cause = cause.exceptions[-1]
    if isinstance(cause, AMQPConnectorPhaseErrorBase) and cause.exception is not None:
        cause = cause.exception
    if isinstance(cause, pika.exceptions.ProbableAuthenticationError
                  | pika.exceptions.AuthenticationError
                  | pika.exceptions.ProbableAccessDeniedError):
        return ConnectorError(endpoint, f"authentication refused: {cause}", ErrorCategory.AUTH)
    if isinstance(cause, pika.exceptions.ConnectionClosed):
        return _closed_error(endpoint, "connection", cause)
    return ConnectorError(endpoint, f"cannot connect: {cause}", ErrorCategory.TRANSIENT)
