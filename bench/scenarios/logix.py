"""LOGIX: a Logix controller with 1,000 mixed points, polled back to back.

cpppo's EtherNet/IP Logix simulator (its own process) holds 300 DINT, 200 REAL, 100 BOOL,
100 INT and 100 LREAL tags and a REAL[200] array read as one slice (1,000 points). The
daemon polls them with a 1 ms interval; the connector packs the reads into multi-service
requests within the connection size. The baseline is pycomm3 alone reading the same packets
back to back in its own process, with the same tag definitions.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench.figures import Figure, Options, ScenarioResult, exactly
from bench.harness import CpuMeter, Daemon, Peer, wait_until, workdir
from bridge.config.models import ReportSpec, ResolvedPoint
from protocols.logix.config import LogixPoint
from protocols.logix.points import items, pack

CONNECTION_SIZE = 500
"""cpppo grants a Large Forward Open but answers a reply longer than about 500 bytes with
"Insufficient Packet Space": the connector asks for a standard connection of 500 bytes."""

SCALARS: tuple[tuple[str, str, int], ...] = (
    ("D", "DINT", 300), ("R", "REAL", 200), ("B", "BOOL", 100), ("I", "INT", 100),
    ("L", "LREAL", 100))
ARRAY = 200
POINTS = sum(count for _, _, count in SCALARS) + ARRAY
MAX_WAIT = 120.0
"""Seconds a measurement may take to see its cycles (cpppo is slow)."""


def tags(share: int = 1) -> dict[str, str]:
    """The simulator's tags, name to type (``1 / share`` of each kind)."""
    found = {f"{prefix}{index:03d}": type_name
             for prefix, type_name, count in SCALARS for index in range(count // share)}
    found["Arr"] = f"REAL[{ARRAY // share}]"
    return found


def points(share: int = 1) -> list[dict[str, Any]]:
    """The points: one per scalar tag, and the array flattened by ``count``."""
    listed: list[dict[str, Any]] = [
        {"name": name.lower(), "tag": name, "type": type_name}
        for name, type_name in tags(share).items() if "[" not in type_name]
    listed.append({"name": "arr", "tag": "Arr[0]", "type": "REAL", "count": ARRAY // share})
    return listed


def packets(share: int = 1) -> list[list[str]]:
    """The multi-service requests the connector plans for these points."""
    resolved = []
    for spec in points(share):
        point = LogixPoint.model_validate(spec)
        flattened = [point] if point.count is None else [
            point.model_copy(update={"name": f"arr.{index}", "tag": f"Arr[{index}]",
                                     "count": None}) for index in range(point.count)]
        resolved += [ResolvedPoint(id=item.name, source="logix", device=None, spec=item,
                                   tags={}, report=ReportSpec(), path=())
                     for item in flattened]
    return [[item.request for item in packet]
            for packet in pack(items(resolved), CONNECTION_SIZE)]


def config(port: int, share: int = 1) -> dict[str, Any]:
    """A daemon config polling the controller back to back, every value an event."""
    return {"sources": [{
        "id": "logix", "protocol": "logix", "host": "127.0.0.1", "port": port,
        "timeout": "2s", "interval": "1ms", "connection_size": CONNECTION_SIZE,
        "points": points(share)}]}


def run(options: Options) -> ScenarioResult:
    """Run LOGIX."""
    result = ScenarioResult("LOGIX", "Logix polling: 1,000 mixed points, one controller")
    result.notes.append(
        "The controller is cpppo's simulator, a Python server that takes milliseconds per tag: "
        "the figures measure it as much as the connector; the baseline (pycomm3 alone, same "
        "packets, same run) says how much of the time is the simulator's.")
    started = time.monotonic()
    share = options.size(1, 1, 20)
    count = POINTS // share
    planned = packets(share)
    types = {name: [type_name.split("[")[0],
                    int(type_name.split("[")[1][:-1]) if "[" in type_name else 0]
             for name, type_name in tags(share).items()}
    definitions = [f"{name}={type_name}" for name, type_name in tags(share).items()]
    measure = options.seconds(10.0, 4.0, 1.0)
    with workdir("logix") as directory, Peer("bench.peers.logix_server", *definitions,
                                             log_dir=directory) as server:
        port = server.wait_ready()["ports"][0]
        with Peer("bench.peers.logix_raw_client", "--port", str(port),
                  "--packets", json.dumps(planned), "--types", json.dumps(types),
                  "--connection-size", str(CONNECTION_SIZE),
                  "--seconds", str(options.seconds(6.0, 2.0, 0.5)), log_dir=directory) as raw:
            raw.wait_ready()
            meter = CpuMeter(raw.pid).start()
            baseline = raw.wait_result(timeout=60)
            meter.stop()
        raw_cycles = baseline["cycles"] / baseline["seconds"]
        result.baselines.append(Figure(
            f"pycomm3 alone: points/s ({len(planned)} multi-service reads back to back)",
            raw_cycles * count, "points/s"))
        result.baselines.append(Figure("pycomm3 alone: CPU per cycle",
                                       1000 * meter.seconds / max(1, baseline["cycles"]), "ms"))
        with Daemon(config(port, share), directory, name="daemon-logix") as daemon:
            # Connect and complete a first cycle (a cycle of cpppo's takes seconds).
            wait_until(lambda: daemon.counters("logix").get("cycles", 0) >= 1, MAX_WAIT)
            before = daemon.counters("logix")
            meter = CpuMeter(daemon.pid).start()
            time.sleep(measure)
            # At least two whole cycles in the window, however slow the simulator.
            wait_until(lambda: daemon.counters("logix").get("cycles", 0)
                       >= before.get("cycles", 0) + 2, MAX_WAIT)
            meter.stop()
            after = daemon.counters("logix")
    cycles = after.get("cycles", 0) - before.get("cycles", 0)
    requests = after.get("requests", 0) - before.get("requests", 0)
    events = after.get("events", 0) - before.get("events", 0)
    cycles_per_second = cycles / meter.wall if meter.wall else 0.0
    result.figures += [
        exactly("requests per cycle (source count / cycles)",
                requests / cycles if cycles else None, "", len(planned),
                # The counters are read between two requests of a cycle: up to one cycle's
                # requests are counted without their cycle.
                tolerance=max(0.01, 1 / cycles) if cycles else 0.01,
                note=f"{count} points in multi-service requests within {CONNECTION_SIZE} "
                "bytes"),
        Figure("points/s (daemon)", cycles_per_second * count, "points/s"),
        Figure("complete cycles/s", cycles_per_second, "cycles/s"),
        Figure("events/s", events / meter.wall if meter.wall else None, "events/s"),
        Figure("CPU per cycle", 1000 * meter.seconds / cycles if cycles else None, "ms"),
    ]
    result.baselines.append(Figure("daemon/pycomm3 points ratio",
                                   cycles_per_second / raw_cycles if raw_cycles else None,
                                   "x"))
    result.seconds = time.monotonic() - started
    return result


if __name__ == "__main__":
    from bench.suite import main

    raise SystemExit(main(["--only", "LOGIX"]))
