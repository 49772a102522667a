"""The uvicorn internals ``bridge/api/uvicorn_adapter.py`` relies on still exist with the
shape it expects; a failure names the installed version. The limits themselves are tested
through a served API in ``test_hardening_api.py``."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import h11
import uvicorn
import uvicorn._types
from helpers.internals import require, require_attribute, require_callable
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle
from uvicorn.server import ServerState

from bridge.api.connections import ConnectionLimits
from bridge.api.uvicorn_adapter import EmbeddedServer, limited_protocol, request_tasks


async def _app(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI application that is never called."""


def _config() -> Config:
    config = Config(_app, log_config=None, lifespan="off")
    config.load()
    return config


def test_uvicorn_keeps_the_asgi_types_and_h11_its_error() -> None:
    for name in ("ASGIReceiveCallable", "ASGISendCallable", "Scope"):
        require_attribute("uvicorn", uvicorn._types, name)
    require("h11", issubclass(h11.LocalProtocolError, Exception), "h11.LocalProtocolError")


async def test_the_h11_protocol_has_the_methods_and_state_the_subclass_uses() -> None:
    config, state = _config(), ServerState()
    require_callable("uvicorn", H11Protocol, "__init__", object(), config, state, {},
                     asyncio.get_running_loop())
    transport = object()
    require_callable("uvicorn", H11Protocol, "connection_made", object(), transport)
    require_callable("uvicorn", H11Protocol, "connection_lost", object(), None)
    require_callable("uvicorn", H11Protocol, "data_received", object(), b"")
    require_callable("uvicorn", H11Protocol, "on_response_complete", object())
    protocol = H11Protocol(config, state, {}, asyncio.get_running_loop())
    for name in ("connections", "loop", "app", "timeout_keep_alive", "cycle"):
        require_attribute("uvicorn", protocol, name)
    require("uvicorn", protocol.connections is state.connections,
            "H11Protocol.connections (the server's set of connections)")
    made = inspect.getsource(H11Protocol.connection_made)
    require("uvicorn", "self.transport =" in made and "self.client =" in made,
            "H11Protocol.transport and .client, set in connection_made")
    cycle = inspect.getsource(RequestResponseCycle.__init__)
    for name in ("more_body", "response_started", "disconnected"):
        require("uvicorn", f"self.{name}" in cycle, f"RequestResponseCycle.{name}")


async def test_the_server_has_the_hooks_and_state_the_embedded_server_uses() -> None:
    require_callable("uvicorn", uvicorn.Server, "capture_signals", object())
    require_callable("uvicorn", uvicorn.Server, "startup", object(), sockets=[])
    require_callable("uvicorn", uvicorn.Server, "serve", object(), sockets=[])
    config = _config()
    config.http = limited_protocol(ConnectionLimits(max_connections=1, header_timeout=1.0))
    server = EmbeddedServer(config)
    state = require_attribute("uvicorn", server, "server_state")
    require("uvicorn", isinstance(state.connections, set) and isinstance(state.tasks, set),
            "ServerState.connections and .tasks (sets)")
    assert request_tasks(server) == set()
    for name in ("should_exit", "force_exit", "started"):
        require_attribute("uvicorn", server, name)
