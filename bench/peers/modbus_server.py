"""A pymodbus TCP server that counts requests: S2 (one device) and S4 (many devices).

Each of ``--ports`` listeners serves ``--units`` devices holding ``--registers`` holding
registers: int16 values in the first half, float32 (ABCD) in the second, so a bench config
can map 0..999 as int16 and 1000..1999 as float32. ``--changes`` registers change per second
(values a report-by-exception mapping has to report). Every request is counted, and its
arrival time per (port, unit) kept for the poll jitter.

Commands: ``stats`` (requests, registers read, per-unit poll jitter against ``interval``),
``reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import struct
import time
from typing import Any

from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from bench.harness import percentile
from bench.peers.control import say, serve_commands


def float_registers(value: float) -> list[int]:
    """A float32 as two registers, big endian (ABCD)."""
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    return [high, low]


def initial_values(registers: int, rng: random.Random) -> list[int]:
    """int16 values in the first half, float32 pairs in the second."""
    half = registers // 2
    values = [rng.randrange(0, 30000) for _ in range(half)]
    while len(values) + 2 <= registers:
        values.extend(float_registers(rng.uniform(-100.0, 100.0)))
    values.extend([0] * (registers - len(values)))
    return values


class CountingServers:
    """``ports`` pymodbus servers with ``units`` devices each."""

    def __init__(self, ports: int, units: int, registers: int) -> None:
        self.ports = ports
        self.units = units
        self.registers = registers
        self.servers: list[Any] = []
        """pymodbus' ``ModbusTcpServer``s: their classes are only partly annotated."""
        self.port_numbers: list[int] = []
        self.requests = 0
        self.registers_read = 0
        self.arrivals: dict[tuple[int, int], list[float]] = {}
        self.rng = random.Random(7)

    def _trace(self, port_index: int) -> Any:
        def trace(sending: bool, pdu: ModbusPDU) -> ModbusPDU:
            if not sending:
                self.requests += 1
                self.registers_read += pdu.count
                self.arrivals.setdefault((port_index, pdu.dev_id), []).append(
                    time.monotonic())
            return pdu

        return trace

    async def start(self) -> None:
        """Start every listener on a free port."""
        for index in range(self.ports):
            devices = [
                SimDevice(unit, simdata=(
                    [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                    [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                    [SimData(0, values=initial_values(self.registers, self.rng),
                             datatype=DataType.REGISTERS)],
                    [SimData(0, count=1, datatype=DataType.INVALID)],
                ))
                for unit in range(1, self.units + 1)
            ]
            server = ModbusTcpServer(devices, address=("127.0.0.1", 0),
                                     trace_pdu=self._trace(index))
            await server.serve_forever(background=True)
            self.servers.append(server)
            sockets: list[Any] = getattr(server.transport, "sockets", [])
            self.port_numbers.append(int(sockets[0].getsockname()[1]))

    async def stop(self) -> None:
        """Close every listener."""
        for server in self.servers:
            await server.shutdown()

    async def change(self, per_second: int) -> None:
        """Change ``per_second`` registers a second, in 20 steps a second."""
        if per_second <= 0:
            return
        step = max(1, per_second // 20)
        half = self.registers // 2
        while True:
            await asyncio.sleep(0.05)
            for _ in range(step):
                server = self.rng.choice(self.servers)
                unit = self.rng.randrange(1, self.units + 1)
                address = self.rng.randrange(0, self.registers - 1)
                if address < half:
                    values = [self.rng.randrange(0, 30000)]
                else:
                    address -= (address - half) % 2
                    values = float_registers(self.rng.uniform(-100.0, 100.0))
                await server.async_setValues(unit, 16, address, values)

    def stats(self, interval: float | None) -> dict[str, Any]:
        """Counters, and the poll jitter when the expected ``interval`` is given."""
        answer: dict[str, Any] = {"requests": self.requests,
                                  "registers_read": self.registers_read,
                                  "polled_units": len(self.arrivals)}
        if interval:
            deviations = [
                abs((later - earlier) - interval) * 1000
                for times in self.arrivals.values()
                for earlier, later in itertools.pairwise(times)
            ]
            answer["jitter_ms"] = {"p50": percentile(deviations, 0.5),
                                   "p99": percentile(deviations, 0.99),
                                   "max": max(deviations, default=float("nan")),
                                   "samples": len(deviations)}
        return answer

    def reset(self) -> dict[str, Any]:
        """Zero the counters."""
        self.requests = self.registers_read = 0
        self.arrivals = {}
        return {"reset": True}


async def main() -> None:
    """Serve until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ports", type=int, default=1)
    parser.add_argument("--units", type=int, default=1)
    parser.add_argument("--registers", type=int, default=2000)
    parser.add_argument("--changes", type=int, default=0, help="registers changed per second")
    options = parser.parse_args()
    servers = CountingServers(options.ports, options.units, options.registers)
    await servers.start()
    changer = asyncio.create_task(servers.change(options.changes))
    say({"ready": {"ports": servers.port_numbers}})

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        if request["command"] == "reset":
            return servers.reset()
        return servers.stats(request.get("interval"))

    try:
        await serve_commands(handle)
    finally:
        changer.cancel()
        await servers.stop()


if __name__ == "__main__":
    asyncio.run(main())
