"""The AMQP connection shared by the source and the sink: pika's asyncio adapter on the
daemon's event loop with its callbacks turned into futures, and broker replies mapped to error
categories."""

from __future__ import annotations

import asyncio
import contextlib
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

from bridge.errors import ConnectorError, ErrorCategory
from protocols.amqp.config import AmqpConnectionSettings

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


class CoalescingConnection(AsyncioConnection):  # type: ignore[misc]
    """pika's asyncio connection, handing what is written during one turn of the event loop to
    the socket in one piece.

    pika writes every frame as a buffer of its own and sends each with a system call of its
    own: three for every published message. A publisher that puts hundreds of messages on the
    wire in one turn of the loop pays for one instead, which more than doubles the rate on a
    busy machine. ``_adapter_emit_data`` is the hook pika's connection leaves to its adapters.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._unsent: list[bytes] = []
        super().__init__(*args, **kwargs)

    def _adapter_emit_data(self, data: bytes) -> None:
        if not self._unsent:
            self.ioloop.call_soon(self._emit_unsent)
        self._unsent.append(data)

    def _emit_unsent(self) -> None:
        data = b"".join(self._unsent)
        self._unsent.clear()
        if self._transport is not None:  # not torn down in the meantime
            super()._adapter_emit_data(data)


async def connection_parameters(settings: AmqpConnectionSettings, endpoint: str,
                                name: str) -> pika.ConnectionParameters:
    """pika's connection parameters; reads TLS files off the event loop."""
    address = settings.address()
    options: dict[str, Any] = {}
    if address.tls:
        tls = settings.tls
        try:
            ssl_context = await asyncio.to_thread(
                tls.context if tls is not None else ssl.create_default_context)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectorError(endpoint, f"TLS setup failed: {exc}",
                                 ErrorCategory.CONFIG) from exc
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

    def fail(self, error: ConnectorError) -> None:
        """End the session with ``error`` (the first one wins)."""
        if not self.failure.done():
            self.failure.set_result(error)

    def on_open(self, connection: Any) -> None:
        if not self.opened.done():
            self.opened.set_result(None)

    def on_open_error(self, connection: Any, error: BaseException) -> None:
        if not self.opened.done():
            self.opened.set_exception(open_error(self.endpoint, error))
        if not self.closed.done():
            self.closed.set_result(None)

    def on_close(self, connection: Any, error: BaseException) -> None:
        self.fail(closed_error(self.endpoint, "connection", error))
        if not self.closed.done():
            self.closed.set_result(None)

    def on_channel_close(self, channel: Any, error: BaseException) -> None:
        self.fail(closed_error(self.endpoint, "channel", error))

    async def connect(self, settings: AmqpConnectionSettings, factory: ConnectionFactory,
                      name: str) -> Any:
        """Open the connection; ``ConnectorError`` when it cannot be opened."""
        parameters = await connection_parameters(settings, self.endpoint, name)
        self.connection = factory(
            parameters=parameters,
            on_open_callback=self.on_open,
            on_open_error_callback=self.on_open_error,
            on_close_callback=self.on_close,
            custom_ioloop=asyncio.get_running_loop(),
        )
        # pika's stack_timeout ends a slow handshake first and reports it through
        # on_open_error; this margin only guards against a callback that never comes.
        limit = settings.timeout + OPEN_MARGIN
        try:
            await asyncio.wait_for(asyncio.shield(self.opened), limit)
        except TimeoutError:
            raise ConnectorError(self.endpoint, f"no connection within {limit:g}s",
                                 ErrorCategory.TRANSIENT) from None
        return self.connection

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
            raise ConnectorError(self.endpoint, f"{what}: no answer within {timeout:g}s",
                                 ErrorCategory.TRANSIENT)
        return reply.result()

    async def close(self) -> None:
        """Close the connection and wait, briefly, until the broker confirmed it."""
        connection = self.connection
        if connection is not None and not (connection.is_closed or connection.is_closing):
            with contextlib.suppress(pika.exceptions.ConnectionWrongStateError):
                connection.close()
        if connection is not None and not self.closed.done():
            # Cancellation may have brought us here: the wait is short and bounded.
            await asyncio.wait((self.closed,), timeout=CLOSE_TIMEOUT)
        self.opened.cancel()
        self.failure.cancel()


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
