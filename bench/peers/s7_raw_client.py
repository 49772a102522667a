"""Baseline for the S7 scenario: python-snap7's asyncio client alone, reading the same
blocks the source plans, back to back, for a while.

Prints one JSON line: cycles, requests and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from snap7.async_client import AsyncClient
from snap7.type import Area

from bench.peers.control import say

AREAS = {"DB": Area.DB, "M": Area.MK, "I": Area.PE, "Q": Area.PA}


async def main() -> None:
    """Read ``--blocks`` (area:db:start:count,...) in a loop for ``--seconds``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--blocks", required=True, help="area:db:start:count,...")
    parser.add_argument("--seconds", type=float, default=5.0)
    options = parser.parse_args()
    blocks = []
    for text in options.blocks.split(","):
        area, db, start, count = text.split(":")
        blocks.append((AREAS[area], int(db), int(start), int(count)))
    client = AsyncClient()
    await client.connect("127.0.0.1", 0, 1, options.port)
    say({"ready": {"pdu": client.get_pdu_length()}})
    cycles = requests = 0
    started = time.monotonic()
    deadline = started + options.seconds
    while time.monotonic() < deadline:
        for area, db, start, count in blocks:
            data = await client.read_area(area, db, start, count)
            if len(data) != count:
                raise RuntimeError(f"read {area.name}{db}:{start}+{count} got {len(data)}")
            requests += 1
        cycles += 1
    seconds = time.monotonic() - started
    await client.disconnect()
    say({"cycles": cycles, "requests": requests, "seconds": seconds})


if __name__ == "__main__":
    asyncio.run(main())
