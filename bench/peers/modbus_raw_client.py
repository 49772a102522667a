"""Baseline for S2: pymodbus alone, reading the same 17 blocks back to back for a while.

Prints one JSON line: cycles, requests and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pymodbus.client import AsyncModbusTcpClient

from bench.peers.control import say


async def main() -> None:
    """Read ``--blocks`` (start:count,...) in a loop for ``--seconds``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--blocks", required=True, help="start:count,start:count,...")
    parser.add_argument("--seconds", type=float, default=5.0)
    options = parser.parse_args()
    blocks = [tuple(int(part) for part in block.split(":"))
              for block in options.blocks.split(",")]
    client = AsyncModbusTcpClient("127.0.0.1", port=options.port, timeout=2, retries=0)
    await client.connect()
    say({"ready": {}})
    cycles = requests = 0
    started = time.monotonic()
    deadline = started + options.seconds
    while time.monotonic() < deadline:
        for start, count in blocks:
            answer = await client.read_holding_registers(start, count=count, device_id=1)
            if answer.isError() or len(answer.registers) < count:
                raise RuntimeError(f"read {start}:{count} failed: {answer}")
            requests += 1
        cycles += 1
    seconds = time.monotonic() - started
    client.close()
    say({"cycles": cycles, "requests": requests, "seconds": seconds})


if __name__ == "__main__":
    asyncio.run(main())
