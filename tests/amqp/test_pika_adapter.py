"""The pika internals ``protocols/amqp/pika_adapter.py`` relies on still exist with the shape
it expects; a failure names the installed version. A connection to RabbitMQ shows the
coalesced writes carrying a whole handshake and the transport going away on close."""

from __future__ import annotations

import asyncio
import inspect
import re
from typing import Any

import pika
import pika.connection
import pytest
from helpers.brokers import AMQP_HOST, AMQP_PORT, require_broker
from helpers.internals import require, require_callable
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.base_connection import BaseConnection

from protocols.amqp.pika_adapter import CoalescingConnection

WAIT = 10.0


def test_pika_sends_every_frame_through_the_adapter_hook() -> None:
    require_callable("pika", AsyncioConnection, "_adapter_emit_data", object(), b"frame")
    require("pika", "self._adapter_emit_data(" in inspect.getsource(pika.connection.Connection),
            "Connection writing its frames through _adapter_emit_data")
    require("pika", re.search(r"self\._transport\b[^=]*= None",
                              inspect.getsource(BaseConnection.__init__)) is not None,
            "BaseConnection._transport (None until connected and once torn down)")


async def test_a_coalescing_connection_opens_a_channel_and_lets_go_of_its_transport() -> None:
    require_broker("RabbitMQ", AMQP_HOST, AMQP_PORT)
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[Any] = loop.create_future()
    closed: asyncio.Future[Any] = loop.create_future()
    connection = CoalescingConnection(
        pika.ConnectionParameters(host=AMQP_HOST, port=AMQP_PORT),
        on_open_callback=opened.set_result,
        on_open_error_callback=lambda _, error: opened.set_exception(error),
        on_close_callback=lambda _, reason: closed.set_result(reason),
        custom_ioloop=loop)
    await asyncio.wait_for(opened, WAIT)
    written: list[bytes] = []
    transport = connection._transport
    assert transport is not None
    original_write = transport.write

    def write(data: bytes) -> None:
        written.append(data)
        original_write(data)

    transport.write = write
    channel: asyncio.Future[Any] = loop.create_future()
    connection.channel(on_open_callback=channel.set_result)
    open_channel = await asyncio.wait_for(channel, WAIT)
    # Two declarations in one turn of the loop: nothing written until the turn ends, then
    # both frames in one write.
    written.clear()
    declared: list[Any] = []
    both = asyncio.Event()

    def on_declared(frame: Any) -> None:
        declared.append(frame)
        if len(declared) == 2:
            both.set()

    for _ in range(2):
        open_channel.queue_declare("", exclusive=True, callback=on_declared)
    assert written == []
    await asyncio.sleep(0)  # yields one turn, in which the coalesced frames go out
    assert len(written) == 1
    await asyncio.wait_for(both.wait(), WAIT)
    connection.close()
    await asyncio.wait_for(closed, WAIT)
    assert connection._transport is None


pytestmark = pytest.mark.broker
