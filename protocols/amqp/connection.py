"""The AMQP connection shared by the source and the sink: pika's asyncio adapter on the
daemon's event loop with its callbacks turned into futures, broker replies mapped to error
categories, and failover between the nodes of a cluster.

With several nodes configured (``hosts`` or ``urls``) a connection is opened to one of them:
the node after the one used last, then the others in turn, one full round at most. A round in
which every node failed raises, and the supervisor backs off before the next one. The node in
use is shown as ``details.node`` of the connector's status; every error names its node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed,
    AMQPConnectorPhaseErrorBase,
)

from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory
from protocols.amqp.config import AmqpConnectionSettings, BrokerAddress

logger = logging.getLogger(__name__)

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


async def connection_parameters(settings: AmqpConnectionSettings, endpoint: str, name: str,
                                address: BrokerAddress | None = None,
                                ssl_context: ssl.SSLContext | None = None,
                                ) -> pika.ConnectionParameters:
    """pika's connection parameters for ``address`` (default: the first node); reads TLS files
    off the event loop unless given the ``ssl_context``."""
    address = address or settings.address()
    options: dict[str, Any] = {}
    if address.tls:
        if ssl_context is None:
            ssl_context = await tls_context(settings, endpoint)
        options["ssl_options"] = pika.SSLOptions(ssl_context, address.host)
    if settings.heartbeat is not None:
        options["heartbeat"] = max(1, round(settings.heartbeat))
    return pika.ConnectionParameters(
        host=address.host,
        port=address.port,
        virtual_host=address.virtual_host,
        credentials=pika.PlainCredentials(address.username, address.password),
        connection_attempts=1,
        socket_timeout=settings.timeout,
        stack_timeout=settings.timeout,
        blocked_connection_timeout=None,
        client_properties={"connection_name": name},
        **options,
    )


async def tls_context(settings: AmqpConnectionSettings, endpoint: str) -> ssl.SSLContext:
    """The TLS context of ``settings``, its files read off the event loop."""
    tls = settings.tls
    try:
        return await asyncio.to_thread(
            tls.context if tls is not None else ssl.create_default_context)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectorError(endpoint, f"TLS setup failed: {exc}", ErrorCategory.CONFIG) from exc


def rotation(nodes: list[BrokerAddress], last: object) -> list[BrokerAddress]:
    """The order in which to try ``nodes``: from the one after the node used ``last``
    (``host:port``), round robin; from the first when none was used."""
    names = [node.node for node in nodes]
    start = (names.index(last) + 1) % len(nodes) if last in names else 0
    return nodes[start:] + nodes[:start]


def request(method: Callable[..., Any], *args: Any,
            **kwargs: Any) -> Callable[[Callable[[Any], None]], Any]:
    """A broker round trip for ``AmqpSession.call``: ``method`` called with its reply
    callback."""
    return lambda done: method(*args, callback=done, **kwargs)


class AmqpSession:
    """One connection's callbacks, turned into futures.

    ``failure`` resolves with the first error that ends the session (the connection or a
    channel closed); ``call`` runs one broker round trip and raises that error instead of
    waiting forever.
    """

    def __init__(self, endpoint: str, *, step_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.endpoint = endpoint
        self.step_timeout = step_timeout
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.failure: asyncio.Future[ConnectorError] = loop.create_future()
        self.connection: Any = None
        self.node: str | None = None
        """The node connected to (or being tried), ``host:port``, when there are several."""

    def at_node(self, error: ConnectorError) -> ConnectorError:
        """``error``, naming the node when there are several."""
        if self.node is None:
            return error
        return ConnectorError(error.endpoint, f"{error.reason} (node {self.node})",
                              error.category)

    def fail(self, error: ConnectorError) -> None:
        """End the session with ``error`` (the first one wins)."""
        if not self.failure.done():
            self.failure.set_result(error)

    def on_open(self, connection: Any) -> None:
        if connection is not self.connection:
            # An attempt given up on that opened after all.
            with contextlib.suppress(pika.exceptions.ConnectionWrongStateError):
                connection.close()
            return
        if not self.opened.done():
            self.opened.set_result(None)

    def on_open_error(self, connection: Any, error: BaseException) -> None:
        if connection is not self.connection:
            return
        if not self.opened.done():
            self.opened.set_exception(self.at_node(open_error(self.endpoint, error)))
        if not self.closed.done():
            self.closed.set_result(None)

    def on_close(self, connection: Any, error: BaseException) -> None:
        if connection is not self.connection:
            return
        self.fail(self.at_node(closed_error(self.endpoint, "connection", error)))
        if not self.closed.done():
            self.closed.set_result(None)

    def on_channel_close(self, channel: Any, error: BaseException) -> None:
        self.fail(self.at_node(closed_error(self.endpoint, "channel", error)))

    async def connect(self, settings: AmqpConnectionSettings, factory: ConnectionFactory,
                      name: str, *, status: EndpointStatus | None = None) -> Any:
        """Open the connection, to the next node that accepts it when there are several;
        ``ConnectorError`` when none does.

        ``status`` remembers the node in use (``details.node``), so that the next connection
        starts with the node after it, and records the nodes that failed on the way.
        """
        nodes = settings.addresses()
        if len(nodes) == 1:
            await self._open(settings, factory, name, nodes[0], None)
            return self.connection
        last = status.details.get("node") if status is not None else None
        ssl_context = (await tls_context(settings, self.endpoint)
                       if any(node.tls for node in nodes) else None)
        failures: list[ConnectorError] = []
        for node in rotation(nodes, last):
            self.node = node.node
            try:
                await self._open(settings, factory, name, node, ssl_context)
            except ConnectorError as exc:
                failures.append(exc)
                if status is not None:
                    status.note(exc.reason, exc.category)
                continue
            if status is not None:
                status.details["node"] = node.node
            if last is not None and last != node.node:
                logger.info("%s: connected to node %s (was %s)", name, node.node, last)
            return self.connection
        categories = {failure.category for failure in failures}
        raise ConnectorError(
            self.endpoint, f"all {len(nodes)} nodes failed: "
            + "; ".join(failure.reason for failure in failures),
            categories.pop() if len(categories) == 1 else ErrorCategory.TRANSIENT)

    async def _open(self, settings: AmqpConnectionSettings, factory: ConnectionFactory,
                    name: str, node: BrokerAddress, ssl_context: ssl.SSLContext | None) -> None:
        parameters = await connection_parameters(settings, self.endpoint, name, node,
                                                 ssl_context)
        loop = asyncio.get_running_loop()
        self.opened, self.closed = loop.create_future(), loop.create_future()
        self.connection = factory(
            parameters=parameters,
            on_open_callback=self.on_open,
            on_open_error_callback=self.on_open_error,
            on_close_callback=self.on_close,
            custom_ioloop=loop,
        )
        # pika's stack_timeout ends a slow handshake first and reports it through
        # on_open_error; this margin only guards against a callback that never comes.
        limit = settings.timeout + OPEN_MARGIN
        try:
            await asyncio.wait_for(asyncio.shield(self.opened), limit)
        except TimeoutError:
            await self._close_connection()
            raise self.at_node(ConnectorError(self.endpoint, f"no connection within {limit:g}s",
                                              ErrorCategory.TRANSIENT)) from None

    async def channel(self) -> Any:
        """Open a channel whose loss ends the session."""
        connection = self.connection
        channel = await self.call("opening a channel",
                                  lambda done: connection.channel(on_open_callback=done))
        channel.add_on_close_callback(self.on_channel_close)
        return channel

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
            raise self.at_node(ConnectorError(
                self.endpoint, f"{what}: no answer within {timeout:g}s", ErrorCategory.TRANSIENT))
        return reply.result()

    async def close(self) -> None:
        """Close the connection and wait, briefly, until the broker confirmed it."""
        await self._close_connection()
        self.opened.cancel()
        self.failure.cancel()

    async def _close_connection(self) -> None:
        connection = self.connection
        if connection is not None and not (connection.is_closed or connection.is_closing):
            with contextlib.suppress(pika.exceptions.ConnectionWrongStateError):
                connection.close()
        if connection is not None and not self.closed.done():
            # Cancellation may have brought us here: the wait is short and bounded.
            await asyncio.wait((self.closed,), timeout=CLOSE_TIMEOUT)


def _reply(error: BaseException) -> tuple[int | None, str]:
    if isinstance(error, pika.exceptions.ConnectionClosed | pika.exceptions.ChannelClosed):
        return error.reply_code, error.reply_text
    return None, str(error) or type(error).__name__


def closed_error(endpoint: str, what: str, error: BaseException) -> ConnectorError:
    """The error for a connection or channel the broker (or the network) closed."""
    code, text = _reply(error)
    category = _REPLY_CATEGORIES.get(code, ErrorCategory.PROTOCOL) if code else (
        ErrorCategory.TRANSIENT)
    detail = f"{code} {text}" if code else text
    return ConnectorError(endpoint, f"{what} closed: {detail}", category)


def open_error(endpoint: str, error: BaseException) -> ConnectorError:
    """The error for a connection that could not be opened."""
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
        return closed_error(endpoint, "connection", cause)
    return ConnectorError(endpoint, f"cannot connect: {describe(cause)}",
                          ErrorCategory.TRANSIENT)


def describe(error: BaseException) -> str:
    """What went wrong, also for the pika errors whose text is empty (a stack timeout, a
    workflow that failed before its first attempt): their type name then."""
    return str(error).strip() or type(error).__name__
