"""The one place that reaches into uvicorn's internals: its HTTP/1.1 protocol, its ASGI types
and its server's state.

uvicorn's public API starts and stops a server; it has no hook for the life of a connection,
and the connection limits of ``bridge/api/connections.py`` need one. So this module:

- subclasses ``H11Protocol`` from ``uvicorn.protocols.http.h11_impl`` (chosen with
  ``Config(http=...)``, which takes a class) and overrides ``connection_made``,
  ``connection_lost``, ``data_received`` and ``on_response_complete``, reading the protocol's
  ``connections``, ``transport``, ``loop``, ``client``, ``app``, ``timeout_keep_alive`` and
  ``cycle`` (a ``RequestResponseCycle``: ``more_body``, ``response_started``,
  ``disconnected``); a malformed body is recognised by h11's ``LocalProtocolError``;
- types the ASGI callables with the private ``uvicorn._types`` aliases the protocol uses;
- runs the server inside the daemon (``EmbeddedServer``): ``capture_signals`` made a no-op
  and ``startup`` signalled, and at shutdown reads ``Server.server_state`` (its
  ``connections`` and request ``tasks``) to drop connections that never drain and cancel
  requests past the graceful timeout.

``tests/api/test_uvicorn_adapter.py`` fails, naming the installed version, when one of these
changes; uvicorn is pinned to its minor version in pyproject.toml for the same reason.

May import ``bridge.api.connections`` (the limits and answers) and uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Generator
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from bridge.api.connections import (
    ABORT,
    HEALTH_RESERVE,
    ConnectionLimits,
    busy_body,
    busy_response,
    slow_body_response,
)

logger = logging.getLogger(__name__)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap, a request-head timeout and ``ABORT``."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        inner = self.app

        async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
                      ) -> None:
            if scope["type"] == "http":
                extensions: dict[str, Any] = dict(scope.get("extensions") or {})
                extensions[ABORT] = self._abort
                scope["extensions"] = extensions
                if self._reserved:
                    if not str(scope["path"]).startswith("/health/"):
                        await _send_busy(send, self.limits.max_connections)
                        return
                    send = _closing(send)
            cycle = self.cycle
            try:
                await inner(scope, receive, send)
            except h11.LocalProtocolError:
                if not self.transport.is_closing() or cycle is None:
                    raise
                # uvicorn answered a malformed request (a bad chunk) with 400 and closes the
                # connection; the application's own answer had nowhere to go. For uvicorn the
                # request is over as if the client had gone (no "returned without completing
                # response" error).
                cycle.disconnected = True
                logger.debug("request from %s ended: its body was malformed", self.client)

        self.app = app
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._reserved = False
        """Accepted past ``max_connections``: it may only ask ``/health/...``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Accept, or answer 503 and close when the server holds its most connections."""
        super().connection_made(transport)
        limits = self.limits
        if len(self.connections) > limits.max_connections:
            if not limits.full:
                limits.full = True
                logger.warning("API refuses new connections: %d are open (api.max_connections); "
                               "%d more may ask /health", limits.max_connections,
                               HEALTH_RESERVE)
            if len(self.connections) > limits.max_connections + HEALTH_RESERVE:
                limits.refused += 1
                transport.write(busy_response(limits.max_connections))
                transport.close()
                return
            self._reserved = True
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; say once when the server accepts connections again."""
        self._head_arrived()
        self._body_arrived()
        super().connection_lost(exc)
        limits = self.limits
        if limits.full and len(self.connections) < limits.max_connections:
            limits.full = False
            logger.info("API accepts connections again (%d refused meanwhile)", limits.refused)

    def data_received(self, data: bytes) -> None:
        """Parse as uvicorn does; a new request's head stops the head timer."""
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:
            self._head_arrived()
            if self.cycle is not None and self.cycle.more_body:
                self._body_timer = self.loop.call_later(self.limits.body_timeout,
                                                        self._body_late)
        if self._body_timer is not None and (self.cycle is None or not self.cycle.more_body):
            self._body_arrived()

    def on_response_complete(self) -> None:
        """After a response, the next request's head has ``header_timeout`` to arrive."""
        self._body_arrived()  # a body still coming was refused: the head timer drops it
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is not cycle:
            self._head_arrived()  # a pipelined request was waiting
        elif not self.transport.is_closing():
            # uvicorn's keep-alive timeout closes an idle connection gently before this.
            self._await_head(self.timeout_keep_alive)

    def _await_head(self, idle: float = 0.0) -> None:
        self._head_arrived()
        self._head_timer = self.loop.call_later(idle + self.limits.header_timeout,
                                                self._head_late)

    def _head_arrived(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _body_arrived(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_late(self) -> None:
        self._body_timer = None
        logger.debug("dropping the connection of %s: its request body did not arrive within "
                     "%g s", self.client, self.limits.body_timeout)
        if self.cycle is not None and not self.cycle.response_started:
            self.transport.write(slow_body_response(self.limits.body_timeout))
            self.transport.close()  # flushes the answer; the head timer drops it if stuck
            self._await_head()
            return
        self._abort()

    def _head_late(self) -> None:
        self._head_timer = None
        # Also when the transport is closing already: it is then still flushing, after the
        # last response, to a client that does not read.
        logger.debug("dropping the connection of %s: no request within %g s", self.client,
                     self.limits.header_timeout)
        self._abort()

    def _abort(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: close with a reset and free what the kernel still holds to send; a
            # plain close would leave the socket in FIN_WAIT1, its buffers full, for as long
            # as the client keeps its window shut.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def limited_protocol(limits: ConnectionLimits) -> type[LimitedH11Protocol]:
    """uvicorn's ``http`` protocol class for one server with ``limits``."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})


async def _send_busy(send: ASGISendCallable, limit: int) -> None:
    """Answer 503 ``too_many_connections`` on a connection of the health reserve."""
    body = busy_body(limit)
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"retry-after", b"5"),
        (b"connection", b"close"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _closing(send: ASGISendCallable) -> ASGISendCallable:
    """``send`` that marks the response ``connection: close``: a reserve connection serves
    one health request."""

    async def closing_send(message: Any) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()),
                                              (b"connection", b"close")]}
        await send(message)

    return closing_send


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the daemon: no signal handling of its own, an event once serving, and
    a failure to start kept rather than raised (``ApiServer`` raises it as its own error)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.settled = asyncio.Event()
        """Set once the server accepts connections, or once it has failed to."""
        self.failure: OSError | None = None
        """Why the server could not start listening."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Nothing: the daemon owns SIGTERM and SIGINT and stops the server itself."""
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start listening, then set ``settled``."""
        await super().startup(sockets=sockets)
        self.settled.set()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve until told to exit; a failure to listen is kept in ``failure``."""
        try:
            await super().serve(sockets=sockets)
        except OSError as exc:
            if self.started:
                raise
            self.failure = exc  # the listeners could not be created: a start failure
        finally:
            self.settled.set()


def abort_unflushed(server: uvicorn.Server) -> None:
    """Drop the connections that are closed but still flushing to a client that reads
    nothing (a dropped event stream): uvicorn would wait for them to drain before it stops."""
    for connection in list(server.server_state.connections):
        if connection.transport.is_closing():
            connection.transport.abort()


def request_tasks(server: uvicorn.Server) -> set[asyncio.Task[None]]:
    """The tasks of the requests ``server`` is running now."""
    return set(server.server_state.tasks)
