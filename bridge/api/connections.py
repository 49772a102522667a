"""Connection limits that uvicorn does not enforce by itself.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) only after a first
response, and counts its ``limit_concurrency`` only when a request arrives: a client that
connects and sends nothing, or sends its request head a byte at a time, holds its connection
and a file descriptor for ever. ``limited_protocol`` returns uvicorn's HTTP/1.1 protocol with
three more rules:

- a connection past ``api.max_connections`` is answered ``503`` and closed at once, except
  for ``HEALTH_RESERVE`` more that may ask ``/health/...`` only (and are closed after the
  answer): a monitor can tell a busy API from a dead one;
- a request head (request line and headers) must arrive within ``api.header_timeout`` of the
  connection opening, or of the end of the keep-alive time after a response; a client still
  sending a body the server refused is dropped then too;
- a request body must arrive within ``api.body_timeout`` of its head: a client trickling one
  is answered ``408`` (if nothing was answered yet) and dropped;
- a request whose malformed body uvicorn answered ``400`` itself, while the application was
  answering it too, ends quietly rather than with a traceback;
- the ASGI scope carries ``ABORT``: a callable that drops the connection at once, unsent data
  and all, for an event stream whose client stopped reading (``transport.close()`` would wait
  for the kernel to flush to a client that never reads).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

logger = logging.getLogger(__name__)

ABORT = "fieldbridge.abort"
"""The key, in the ASGI scope's ``extensions``, of the callable that drops the connection."""

HEALTH_RESERVE = 4
"""Connections accepted past ``api.max_connections`` for ``/health/...`` requests only."""


@dataclass
class ConnectionLimits:
    """The limits of one server, and whether it is refusing connections now."""

    max_connections: int
    header_timeout: float
    body_timeout: float = 30.0
    refused: int = 0
    """Connections refused at the cap since the server started."""
    full: bool = False


def _busy_body(limit: int) -> bytes:
    return json.dumps({"error": {
        "code": "too_many_connections",
        "message": f"the API serves at most {limit} connections at once",
        "hint": "retry later; close idle connections (api.max_connections sets the cap)"}}
    ).encode()


def _raw_response(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + extra
            + b"connection: close\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


def _busy_response(limit: int) -> bytes:
    return _raw_response(b"503 Service Unavailable", _busy_body(limit), b"retry-after: 5\r\n")


def _slow_body_response(timeout: float) -> bytes:
    return _raw_response(b"408 Request Timeout", json.dumps({"error": {
        "code": "request_timeout",
        "message": f"the request body did not arrive within {timeout:g} s",
        "hint": "send the body at once (api.body_timeout sets the limit)"}}).encode())


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
                transport.write(_busy_response(limits.max_connections))
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
            self.transport.write(_slow_body_response(self.limits.body_timeout))
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
    body = _busy_body(limit)
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
