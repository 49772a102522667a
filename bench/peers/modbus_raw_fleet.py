"""Baseline for S4: pymodbus alone polling the same devices on the same 1 s grid.

One client per server port, one task per device reading its registers through the client's
lock (as the daemon shares a connection), no mapping, no store. Runs ``--seconds`` and prints
the cycles done.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pymodbus.client import AsyncModbusTcpClient

from bench.peers.control import say


async def poll(client: AsyncModbusTcpClient, lock: asyncio.Lock, unit: int, count: int,
               interval: float, deadline: float, done: list[int]) -> None:
    """Poll one device on a fixed grid until ``deadline``."""
    loop = asyncio.get_running_loop()
    next_time = loop.time()
    while loop.time() < deadline:
        async with lock:
            answer = await client.read_holding_registers(0, count=count, device_id=unit)
        if not answer.isError():
            done[0] += 1
        next_time += interval
        await asyncio.sleep(max(0.0, next_time - loop.time()))


async def main() -> None:
    """Poll until ``--seconds`` passed; print cycles."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ports", required=True, help="comma-separated")
    parser.add_argument("--units", type=int, required=True)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    options = parser.parse_args()
    clients = []
    for port in options.ports.split(","):
        client = AsyncModbusTcpClient("127.0.0.1", port=int(port), timeout=2, retries=1)
        await client.connect()
        clients.append(client)
    say({"ready": {}})
    done = [0]
    deadline = asyncio.get_running_loop().time() + options.seconds
    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for client in clients:
            lock = asyncio.Lock()
            for unit in range(1, options.units + 1):
                group.create_task(poll(client, lock, unit, options.count, options.interval,
                                       deadline, done))
    for client in clients:
        client.close()
    say({"cycles": done[0], "seconds": time.monotonic() - started})


if __name__ == "__main__":
    asyncio.run(main())
