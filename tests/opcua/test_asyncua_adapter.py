"""The asyncua internals the two asyncua adapters rely on still exist with the shape they
expect (``protocols/opcua/asyncua_adapter.py`` for the client, ``bridge/demo/
asyncua_server_adapter.py`` for the plant's server); a failure names the installed version."""

from __future__ import annotations

import asyncio
import inspect
import logging

import asyncua.client.ua_client
import asyncua.client.ua_session
from asyncua.client.client import Client
from asyncua.server.internal_session import InternalSession
from helpers.internals import require, require_attribute, require_callable

from bridge.demo import asyncua_server_adapter
from bridge.demo.opcua_plant import PlantServer
from protocols.opcua import asyncua_adapter

WAIT = 10.0


def test_asyncua_still_logs_what_the_filter_drops_under_the_names_it_listens_to() -> None:
    source = (inspect.getsource(asyncua.client.ua_client)
              + inspect.getsource(asyncua.client.ua_session))
    for message in (*asyncua_adapter.LostConnectionNoise.TEARDOWN,
                    asyncua_adapter.LostConnectionNoise.PUBLISH_CRASHED):
        require("asyncua", f'"{message}' in source, f"the log message {message!r}")
    for name in asyncua_adapter.LOGGERS:
        module, _, owner = name.rpartition(".")
        require("asyncua", f'getLogger(f"{{__name__}}.{owner}")' in inspect.getsource(
            __import__(module, fromlist=["_"])), f"the logger {name}")


def test_the_filter_drops_teardown_noise_and_keeps_the_rest() -> None:
    noise = asyncua_adapter.LostConnectionNoise()

    def record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
        return logging.LogRecord("asyncua", logging.WARNING, __file__, 1, message, None,
                                 (type(exc), exc, None) if exc is not None else None)

    assert not noise.filter(record("close_session was called but connection is closed"))
    assert not noise.filter(record("Publish iteration crashed; retrying in 1s",
                                   ConnectionResetError()))
    assert noise.filter(record("Publish iteration crashed; retrying in 1s", ValueError()))
    assert noise.filter(record("something else"))


async def test_the_publish_task_the_socket_and_the_servers_sessions_are_reachable() -> None:
    async with PlantServer() as plant:
        server = plant.server
        assert server is not None
        client = Client(plant.url, timeout=WAIT)
        await client.connect()
        try:
            await client.create_subscription(100, None)
            task = require_attribute("asyncua", client.uaclient, "_publish_task")
            require("asyncua", isinstance(task, asyncio.Task) and not task.done(),
                    "UaClient._publish_task (the running publish loop's task)")
            assert asyncua_adapter.publish_task(client) is task
            protocol = require_attribute("asyncua", client.uaclient, "protocol")
            require("asyncua", isinstance(protocol.is_closed, bool), "UASocketProtocol.is_closed")
            require_callable("asyncua", protocol, "disconnect_socket")
            sessions = require_attribute("asyncua", server.iserver, "_external_sessions")
            require("asyncua", isinstance(sessions, dict) and len(sessions) == 1
                    and all(isinstance(each, InternalSession) for each in sessions.values()),
                    "InternalServer._external_sessions (auth token to InternalSession)")
            require_callable("asyncua", InternalSession, "close_session", object(), True)
            # Our side of the connection goes; the server still keeps the session.
            asyncua_adapter.drop_lost_transport(client)
            assert client.uaclient.protocol is None
            task.cancel()
            await asyncio.wait([task], timeout=WAIT)
        finally:
            await client.disconnect()
        assert len(sessions) == 1
        await asyncua_server_adapter.end_sessions(server)
        assert sessions == {}
