"""The API served by uvicorn inside the daemon's event loop, as a runtime service.

``ApiServer`` binds before anything else runs (a busy port is a plain ``ApiServerError``),
serves as the task ``api`` in a task group of its own, and on ``stop()`` ends the event
streams, lets running requests finish briefly and cancels the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import socket
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from bridge.api.app import create_app
from bridge.api.connections import ConnectionLimits
from bridge.api.context import ApiContext
from bridge.api.event_hub import StreamSettings
from bridge.api.uvicorn_adapter import (
    EmbeddedServer,
    abort_unflushed,
    limited_protocol,
    request_tasks,
)
from bridge.config.models import ApiSection, Config
from bridge.errors import ApiServerError
from bridge.facade import ApiFacade
from bridge.runtime import ServiceFactory

logger = logging.getLogger(__name__)


def api_services(config: Config) -> list[ServiceFactory]:
    """What ``Runtime.run`` serves beside the pipeline for ``config``: the API, unless
    ``api.enabled`` is false."""
    return [ApiServer] if config.api.enabled else []


class ApiServer:
    """The API served by uvicorn as the task ``api``, on the daemon's event loop.

    A runtime service (``bridge.runtime.Service``): ``start()`` and ``stop()`` are called from
    the same task, or it is used as ``async with``.
    """

    name = "API"
    """What the runtime's ready line calls it."""

    STOP_TIMEOUT = 2.5
    """Seconds ``stop()`` waits for requests to finish before cancelling them."""

    def __init__(self, runtime: ApiFacade, *, streams: StreamSettings | None = None) -> None:
        self.runtime = runtime
        self.app = create_app(runtime, streams=streams)
        self.context: ApiContext = self.app.state.fieldbridge
        self.port: int | None = None
        """The port it listens on, once started (the real one when configured as 0)."""
        self._running: contextlib.AsyncExitStack | None = None

    @property
    def url(self) -> str | None:
        """The base URL, once started."""
        if self.port is None:
            return None
        api = self.runtime.api
        return f"{'https' if api.tls else 'http'}://{_address(api.host, self.port)}"

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind, start serving, and return once connections are accepted.

        Raises ``ApiServerError`` naming host:port when the address cannot be bound, the TLS
        certificate cannot be loaded or the server does not start.
        """
        if self._running is not None:
            raise RuntimeError("the API server is already started")
        running = contextlib.AsyncExitStack()
        await running.enter_async_context(self._serving())
        self._running = running

    async def stop(self) -> None:
        """Stop accepting, let running requests finish briefly, and leave no task behind.

        Raises what made the server fail while it served, if it did.
        """
        running, self._running = self._running, None
        if running is not None:
            await running.aclose()

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        api = self.runtime.api
        sockets = _bind(api.host, api.port)
        try:
            server = EmbeddedServer(_uvicorn_config(self.app, api))
            async with asyncio.TaskGroup() as group:
                task = group.create_task(server.serve(sockets=sockets), name="api")
                await server.settled.wait()
                if server.started:
                    self.port = int(sockets[0].getsockname()[1])
                    self._announce(sockets)
                    try:
                        yield
                    finally:
                        await self._shutdown(server, task)
                        self.port = None
        finally:
            for sock in sockets:
                sock.close()
        if not server.started:
            raise ApiServerError(api.host, api.port,
                                 f"the server did not start: {server.failure}")

    def _announce(self, sockets: Sequence[socket.socket]) -> None:
        logger.info("API listening on %s", self.url)
        if not self.runtime.api.keys and not _loopback_only(sockets):
            logger.warning("API listens on %s without api.keys: anyone who can reach it can "
                           "read every point", self.url)

    async def _shutdown(self, server: EmbeddedServer, task: asyncio.Task[None]) -> None:
        self.context.close()  # event streams end now: stopping does not wait for them
        server.should_exit = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.STOP_TIMEOUT
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self.context.hub.wait_for_clients(0)
        abort_unflushed(server)
        done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
        if not done:
            server.force_exit = True
            task.cancel()
        # Requests past uvicorn's graceful timeout are cancelled, maybe not yet finished.
        requests = request_tasks(server)
        for request in requests:
            request.cancel()
        await asyncio.wait({task, *requests})


def _uvicorn_config(app: FastAPI, api: ApiSection) -> uvicorn.Config:
    """uvicorn's configuration, loaded; ``ApiServerError`` when the TLS files cannot be."""
    config = uvicorn.Config(
        app,
        log_config=None,
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=1,
        # uvicorn's own limit_concurrency counts only connections that sent a request: the
        # protocol counts every connection, and times out request heads (``connections``).
        http=limited_protocol(ConnectionLimits(max_connections=api.max_connections,
                                               header_timeout=api.header_timeout,
                                               body_timeout=api.body_timeout)),
        timeout_keep_alive=max(1, math.ceil(api.keep_alive_timeout)),
        ssl_certfile=api.tls.cert if api.tls else None,
        ssl_keyfile=api.tls.key if api.tls else None,
    )
    try:
        config.load()
    except OSError as exc:  # ssl.SSLError is an OSError; only TLS files are read here
        files = f" {api.tls.cert} with key {api.tls.key}" if api.tls else ""
        raise ApiServerError(api.host, api.port,
                             f"cannot load TLS certificate{files}: {exc}") from exc
    return config


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to, all on one port."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ApiServerError(host, port, f"cannot resolve '{host}': {exc.strerror}") from exc
    addresses = list(dict.fromkeys(
        (family, proto, address) for family, _, proto, _, address in infos))
    sockets: list[socket.socket] = []
    try:
        for family, proto, address in addresses:
            if sockets:  # port 0: every address on the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            # The protocol must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only then, and
            # without it small responses wait ~40 ms for a delayed ACK.
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and len(addresses) > 1:
                    # The IPv4 address gets its own socket, as asyncio does it.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
            except OSError as exc:
                sock.close()
                if sockets and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    continue  # e.g. "localhost" resolves to ::1 but IPv6 is disabled
                raise
            sockets.append(sock)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ApiServerError(host, port, exc.strerror or str(exc)) from exc
    return sockets


def _loopback_only(sockets: Sequence[socket.socket]) -> bool:
    return all(ipaddress.ip_address(sock.getsockname()[0]).is_loopback for sock in sockets)
