"""Baseline for S1: aiomqtt alone, subscribed to ``sensors/+/telemetry`` (QoS 0), counting.

Stops after ``--expect`` messages or ``--idle`` seconds without one; prints the count and the
rate from the first to the last message.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiomqtt

from bench.peers.control import say


async def main() -> None:
    """Count messages until done."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--expect", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=3.0)
    options = parser.parse_args()
    count = 0
    first = last = 0.0
    async with aiomqtt.Client(options.host, options.port) as client:
        await client.subscribe("sensors/+/telemetry", qos=0)
        say({"ready": {}})
        messages = client.messages.__aiter__()
        while count < options.expect:
            try:
                await asyncio.wait_for(messages.__anext__(), timeout=options.idle if count
                                       else 60)
            except TimeoutError:
                break
            last = time.monotonic()
            if not count:
                first = last
            count += 1
    say({"received": count, "seconds": last - first})


if __name__ == "__main__":
    asyncio.run(main())
