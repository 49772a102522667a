"""Baseline for S1: aiomqtt alone, subscribed to ``sensors/+/telemetry`` (QoS 0), decoding
each payload with ``json.loads`` and counting.

Stops after ``--expect`` messages or ``--idle`` seconds without one; prints the count, the
seconds from the first to the last message, and the last message's ``time.monotonic()``
(one clock for every process of the machine, so the harness can time from the publisher's
start, as it does for the daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

import aiomqtt

from bench.peers.control import say


class Counter:
    """What the reading loop has seen so far."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0


async def read(client: aiomqtt.Client, counter: Counter, expect: int) -> None:
    """Decode and count messages: the plain loop an aiomqtt user writes, nothing per message
    beyond it (the idle timeout is watched from outside the loop)."""
    async for message in client.messages:
        json.loads(message.payload)
        counter.last = time.monotonic()
        if not counter.count:
            counter.first = counter.last
        counter.count += 1
        if counter.count >= expect:
            return


async def main() -> None:
    """Count messages until done."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--expect", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=3.0)
    options = parser.parse_args()
    counter = Counter()
    async with aiomqtt.Client(options.host, options.port) as client:
        await client.subscribe("sensors/+/telemetry", qos=0)
        say({"ready": {}})
        started = time.monotonic()
        reader = asyncio.create_task(read(client, counter, options.expect), name="read")
        while not reader.done():
            await asyncio.wait({reader}, timeout=0.25)
            quiet_since = counter.last if counter.count else started
            if time.monotonic() - quiet_since > (options.idle if counter.count else 60):
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    say({"received": counter.count, "seconds": counter.last - counter.first,
         "last": counter.last})


if __name__ == "__main__":
    asyncio.run(main())
