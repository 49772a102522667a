"""S1M consumer: counts the events the daemon's MQTT sink publishes, and their latency.

Subscribes to ``--filter`` (default ``fieldbridge/#``, the sink's default topic tree) at QoS
0 with aiomqtt and counts every message as one event (``bench.peers.event_counts``).

Commands: ``stats`` (received, p50/p99 latency in ms since the last ``reset``), ``reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

import aiomqtt

from bench.peers.control import say, serve_commands
from bench.peers.event_counts import EventCounts


async def count(client: aiomqtt.Client, counts: EventCounts) -> None:
    """Count every message until cancelled."""
    async for message in client.messages:
        counts.add(message.payload)


async def main() -> None:
    """Consume until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--filter", default="fieldbridge/#")
    options = parser.parse_args()
    counts = EventCounts()
    async with aiomqtt.Client(options.host, options.port) as client:
        await client.subscribe(options.filter, qos=0)
        reader = asyncio.create_task(count(client, counts), name="count")
        say({"ready": {}})

        def handle(request: dict[str, Any]) -> dict[str, Any]:
            if request["command"] == "reset":
                return counts.reset()
            return counts.stats()

        try:
            await serve_commands(handle)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


if __name__ == "__main__":
    asyncio.run(main())
