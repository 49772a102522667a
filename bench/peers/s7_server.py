"""python-snap7's S7 server for the S7 scenario: DB1 (REALs), DB2 (INTs), DB3 (bits) and the
merker area, filled with values; ``--changes`` bytes change per second.

Commands: ``stats`` (the server's client count).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import struct

from snap7.server import Server
from snap7.type import SrvArea

from bench.peers.control import say, serve_commands

SIZES = {1: 1600, 2: 600, 3: 32}
MERKERS = 256


async def main() -> None:
    """Serve until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--changes", type=int, default=0)
    options = parser.parse_args()
    logging.getLogger("snap7").setLevel(logging.WARNING)
    rng = random.Random(7)
    dbs = {number: bytearray(size) for number, size in SIZES.items()}
    for offset in range(0, SIZES[1], 4):
        struct.pack_into(">f", dbs[1], offset, rng.uniform(-100.0, 100.0))
    for offset in range(0, SIZES[2], 2):
        struct.pack_into(">h", dbs[2], offset, rng.randrange(-30000, 30000))
    dbs[3][:] = bytes(rng.randrange(256) for _ in range(SIZES[3]))
    merkers = bytearray(rng.randrange(256) for _ in range(MERKERS))
    server = Server(log=False)
    for number, data in dbs.items():
        server.register_area(SrvArea.DB, number, data)
    server.register_area(SrvArea.MK, 0, merkers)
    server.start_to("127.0.0.1", options.port)
    say({"ready": {"port": options.port}})

    async def change() -> None:
        while options.changes:
            await asyncio.sleep(0.1)
            for _ in range(max(1, options.changes // 10)):
                data = dbs[2]
                offset = 2 * rng.randrange(len(data) // 2)
                struct.pack_into(">h", data, offset, rng.randrange(-30000, 30000))

    changer = asyncio.create_task(change(), name="s7-server.change")
    try:
        await serve_commands(lambda request: {"clients": server.client_count})
    finally:
        changer.cancel()
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
