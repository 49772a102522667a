"""Discovery bench (not a test): browse 10,000 OPC-UA variables, scan 1,000 Modbus registers.

- OPC-UA: the bench's asyncua server (``bench.peers.opcua_server``, its own process) with
  10,000 Double variables in 100 folders; ``discover opcua`` browses it from the Objects
  folder, reads every variable's attributes and writes the source. Target: under 10 s.
- Modbus: a pymodbus server (in this process) whose unit 1 holds 1,000 holding registers;
  ``discover modbus`` scans holding 0-999 of units 1 at the default rate (20 requests/s).

Run: ``.venv/bin/python -m bench.discover``; prints one JSON line per measurement.
"""

from __future__ import annotations

import asyncio
import io
import json
import time

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from bench.harness import Peer
from bridge.core.discovery import DiscoveryContext, StreamProgress
from protocols.modbus.discover import ModbusDiscoverRequest
from protocols.modbus.discover import discover as discover_modbus
from protocols.opcua.discover import OpcuaDiscoverRequest
from protocols.opcua.discover import discover as discover_opcua

VARIABLES = 10_000
REGISTERS = 1_000


def _context() -> DiscoveryContext:
    return DiscoveryContext(progress=StreamProgress(io.StringIO(), tty=False))


async def opcua(url: str) -> dict[str, object]:
    """Browse the server; the figures."""
    started = time.perf_counter()
    result = await discover_opcua(OpcuaDiscoverRequest(url=url), _context())
    elapsed = time.perf_counter() - started
    return {"bench": "discover opcua", "variables": len(result.items), "seconds":
            round(elapsed, 2), "variables_per_s": round(len(result.items) / elapsed),
            "yaml_bytes": len(result.yaml), "partial": result.partial, "target_s": 10}


async def modbus() -> dict[str, object]:
    """Scan unit 1's holding registers at the default rate; the figures."""
    unit = SimDevice(1, simdata=([SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                                 [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                                 [SimData(0, values=list(range(REGISTERS)),
                                          datatype=DataType.REGISTERS)],
                                 [SimData(0, count=1, datatype=DataType.INVALID)]))
    requests = 0

    def count(sending: bool, pdu: object) -> object:
        nonlocal requests
        requests += 0 if sending else 1
        return pdu

    server = ModbusTcpServer([unit], address=("127.0.0.1", 0), trace_pdu=count)
    await server.serve_forever(background=True)
    try:
        port = server.transport.sockets[0].getsockname()[1]
        request = ModbusDiscoverRequest(host="127.0.0.1", port=port, units="1",
                                        tables="holding", range=f"0-{REGISTERS - 1}")
        started = time.perf_counter()
        result = await discover_modbus(request, _context())
        elapsed = time.perf_counter() - started
    finally:
        await server.shutdown()
    return {"bench": "discover modbus", "registers": len(result.items),
            "requests": requests, "rate": request.rate, "seconds": round(elapsed, 2),
            "partial": result.partial}


def main() -> None:
    """Run both and print the figures."""
    peer = Peer("bench.peers.opcua_server", "--variables", str(VARIABLES), "--rate", "1",
                name="discover-opcua-server")
    try:
        url = peer.wait_ready()["url"]
        print(json.dumps(asyncio.run(opcua(url))), flush=True)
    finally:
        peer.stop()
    print(json.dumps(asyncio.run(modbus())), flush=True)


if __name__ == "__main__":
    main()
