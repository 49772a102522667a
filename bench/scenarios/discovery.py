"""DISC discovery: browse 10,000 OPC-UA variables, scan 1,000 Modbus holding registers.

- OPC-UA: the bench's asyncua server (``bench.peers.opcua_server``, its own process) with
  10,000 Double variables in 100 folders, changing slowly; discovery browses it from the
  Objects folder, reads every variable's attributes and writes the source. Target: under 10 s.
- Modbus: the bench's pymodbus server (its own process) whose unit 1 holds 1,000 holding
  registers; discovery scans holding 0-999 of unit 1 at the default rate (20 requests/s) and
  the server counts the requests.

Discovery runs in this process, through each connector's discover function, as
``fieldbridge discover`` runs it, without the interpreter's start-up.
"""

from __future__ import annotations

import asyncio
import io
import time

from bench.figures import Figure, Options, ScenarioResult, at_most
from bench.harness import Peer, workdir
from bridge.core.discovery import DiscoveryContext, StreamProgress
from protocols.modbus.discover import ModbusDiscoverRequest
from protocols.modbus.discover import discover as discover_modbus
from protocols.opcua.discover import OpcuaDiscoverRequest
from protocols.opcua.discover import discover as discover_opcua

VARIABLES = 10_000
REGISTERS = 1_000
BROWSE_TARGET = 10.0
"""Seconds to browse 10,000 variables."""


def _context() -> DiscoveryContext:
    return DiscoveryContext(progress=StreamProgress(io.StringIO(), tty=False))


async def browse(url: str) -> dict[str, float]:
    """Browse the OPC-UA server from the Objects folder; variables found, seconds, YAML size."""
    started = time.perf_counter()
    result = await discover_opcua(OpcuaDiscoverRequest(url=url), _context())
    elapsed = time.perf_counter() - started
    return {"variables": len(result.items), "seconds": elapsed,
            "yaml_bytes": len(result.yaml), "partial": float(result.partial)}


async def scan(port: int, registers: int) -> dict[str, float]:
    """Scan unit 1's holding registers at the default rate; registers found, seconds."""
    request = ModbusDiscoverRequest(host="127.0.0.1", port=port, units="1", tables="holding",
                                    range=f"0-{registers - 1}")
    started = time.perf_counter()
    result = await discover_modbus(request, _context())
    elapsed = time.perf_counter() - started
    return {"registers": len(result.items), "seconds": elapsed, "rate": request.rate,
            "partial": float(result.partial)}


def run(options: Options) -> ScenarioResult:
    """Run DISC."""
    variables = options.size(VARIABLES, VARIABLES, 200)
    registers = options.size(REGISTERS, REGISTERS, 100)
    result = ScenarioResult("DISC", f"Discovery: {variables:,} OPC-UA variables browsed, "
                            f"{registers:,} holding registers scanned")
    started = time.monotonic()
    with workdir("discovery") as directory:
        with Peer("bench.peers.opcua_server", "--variables", str(variables), "--rate", "1",
                  log_dir=directory) as server:
            url = server.wait_ready()["url"]
            browsed = asyncio.run(browse(url))
        with Peer("bench.peers.modbus_server", "--registers", str(registers),
                  log_dir=directory) as modbus:
            port = modbus.wait_ready()["ports"][0]
            modbus.ask("reset")
            scanned = asyncio.run(scan(port, registers))
            requests = modbus.ask("stats")["requests"]
    seconds = browsed["seconds"]
    result.figures += [
        at_most("OPC-UA browse: seconds for every variable", seconds, "s", BROWSE_TARGET,
                note=f"{browsed['variables']:,.0f} variables found of {variables:,}"
                + ("; partial" if browsed["partial"] else "")),
        Figure("OPC-UA browse: variables/s", browsed["variables"] / seconds if seconds else None,
               "variables/s"),
        Figure("OPC-UA browse: generated YAML", browsed["yaml_bytes"] / 1024, "KiB"),
        Figure("Modbus scan: seconds for every register", scanned["seconds"], "s",
               note=f"{scanned['registers']:,.0f} registers found of {registers:,}, at most "
               f"{scanned['rate']:g} requests/s (the default)"
               + ("; partial" if scanned["partial"] else "")),
        Figure("Modbus scan: requests the server answered", requests, "requests"),
    ]
    result.chart = {"DISC OPC-UA browse (<10 s)": BROWSE_TARGET / seconds if seconds else 0.0}
    result.seconds = time.monotonic() - started
    return result


if __name__ == "__main__":
    from bench.suite import main

    raise SystemExit(main(["--only", "DISC"]))
