"""Baseline for S1: pika alone publishing persistent messages with publisher confirms.

Publishes ``--count`` event-sized persistent messages with confirms on, to ``--exchange``
(the path the daemon's events take to the bench consumer) or, without it, to a fresh durable
queue through the default exchange, keeping at most ``--window`` unconfirmed (pipelined, as the sink
does), using pika's asyncio adapter like the daemon. Prints messages and seconds; deletes the
queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import pika
from pika.adapters.asyncio_connection import AsyncioConnection

from bench.peers.control import say

BODY = json.dumps({
    "id": "0193f0c2-5a1e-7a3c-9b1d-4c2f8e6a1b2c", "source": "mqtt", "point": "dev1.temperature",
    "value": 21.5, "unit": "degC", "quality": "good", "reason": None,
    "ts": "2026-11-21T10:15:02.125Z", "received_at": "2026-11-21T10:15:02.125Z",
    "protocol": "mqtt", "tags": {}, "bridge": "bench"}).encode()


async def main() -> None:
    """Publish and count confirms."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--exchange", default="")
    options = parser.parse_args()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, Any]] = loop.create_future()
    queue = f"fieldbridge.bench.pika.{time.time_ns()}"
    state = {"sent": 0, "confirmed": 0, "started": 0.0}
    channels: list[Any] = []
    routing_key = "bench.pika" if options.exchange else queue
    properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")

    def pump(channel: Any) -> None:
        while (state["sent"] < options.count
               and state["sent"] - state["confirmed"] < options.window):
            channel.basic_publish(options.exchange, routing_key, BODY, properties)
            state["sent"] += 1

    def on_confirm(frame: Any) -> None:
        method = frame.method
        if method.multiple:
            state["confirmed"] = method.delivery_tag
        else:
            state["confirmed"] = max(state["confirmed"], method.delivery_tag)
        if state["confirmed"] >= options.count and not done.done():
            done.set_result({"messages": options.count,
                             "seconds": time.monotonic() - state["started"]})
        else:
            pump(channels[0])

    def on_confirming(channel: Any) -> None:
        # Only messages published after Confirm.SelectOk are confirmed.
        say({"ready": {}})
        state["started"] = time.monotonic()
        pump(channel)

    def on_declared(channel: Any) -> None:
        channel.confirm_delivery(on_confirm, callback=lambda frame: on_confirming(channel))

    def on_channel(channel: Any) -> None:
        channels.append(channel)
        if options.exchange:
            on_declared(channel)
        else:
            channel.queue_declare(queue, durable=True,
                                  callback=lambda frame: on_declared(channel))

    def on_open(connection: Any) -> None:
        connection.channel(on_open_callback=on_channel)

    def on_error(connection: Any, error: Any) -> None:
        if not done.done():
            done.set_exception(RuntimeError(f"cannot connect: {error}"))

    connection = AsyncioConnection(
        pika.ConnectionParameters(options.host, options.port), on_open_callback=on_open,
        on_open_error_callback=on_error, custom_ioloop=loop)
    result = await asyncio.wait_for(done, timeout=120)
    if not options.exchange:
        deleted = loop.create_future()
        channels[0].queue_delete(queue, callback=lambda frame: deleted.set_result(True))
        await asyncio.wait_for(deleted, timeout=30)
    connection.close()
    say(result)


if __name__ == "__main__":
    asyncio.run(main())
