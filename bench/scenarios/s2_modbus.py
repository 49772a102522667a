"""S2 Modbus polling: one device, 1,000 int16 at 0..999 and 500 float32 at 1000..1999.

A pymodbus server (its own process) holds 2,000 holding registers and counts requests; the
daemon polls the device with a 1 ms interval, i.e. back to back. Measured three times: with
report-by-exception off (every decoded value an event) and on (only changes; the server
changes 1,500 registers a second), both with the default ``store.sync: full``, then every
value stored once more with ``store.sync: normal``, for the cost of ``full`` as a ratio. The
baseline is pymodbus alone reading the same blocks back to back in its own process. A mapper
micro-benchmark (in this process) gives the decode ceiling of the mapping code alone.
"""

from __future__ import annotations

import math
import time
from typing import Any

from bench.figures import Figure, Options, ScenarioResult, at_least, exactly, goal
from bench.harness import CpuMeter, Daemon, Peer, py_spy_top, tree_peak_rss_mb, workdir
from protocols.modbus.planner import Span, plan

INT16_POINTS = 1000
FLOAT32_POINTS = 500
POINTS = INT16_POINTS + FLOAT32_POINTS
REGISTERS = INT16_POINTS + 2 * FLOAT32_POINTS
CHANGES_PER_SECOND = 1500
FLOOR = math.ceil(REGISTERS / 125)
"""Requests per cycle if a request could carry any 125 registers: ceil(2000 / 125) = 16."""


def points() -> list[dict[str, Any]]:
    """The 1,500 points of the device."""
    int16 = [{"name": f"i{index:04d}", "table": "holding", "address": index, "type": "int16"}
             for index in range(INT16_POINTS)]
    float32 = [{"name": f"f{index:04d}", "table": "holding",
                "address": INT16_POINTS + 2 * index, "type": "float32"}
               for index in range(FLOAT32_POINTS)]
    return int16 + float32


def blocks() -> list[tuple[int, int]]:
    """The planner's blocks for these points (start, count)."""
    spans = [Span("holding", index, 1) for index in range(INT16_POINTS)]
    spans += [Span("holding", INT16_POINTS + 2 * index, 2) for index in range(FLOAT32_POINTS)]
    return [(block.start, block.count) for block in plan(spans, max_gap=10)]


def config(port: int, mode: str, sync: str = "full") -> dict[str, Any]:
    """A daemon config polling the device back to back, with ``store.sync`` set to ``sync``
    (``full`` is the default; it is written out so the run says what it measured)."""
    return {"store": {"sync": sync}, "sources": [{
        "id": "s2", "protocol": "modbus", "host": "127.0.0.1", "port": port,
        "timeout": "2s", "retries": 1,
        "devices": [{"id": "dev", "unit": 1, "interval": "1ms", "report": {"mode": mode},
                     "points": points()}],
    }]}


def mapper_microbench(seconds: float) -> dict[str, float]:
    """Points decoded per second by the Modbus mapper alone (no I/O), RBE off and on."""
    import random

    from bridge.config.models import ReportSpec, ResolvedPoint
    from bridge.core.model import Reading
    from protocols.modbus.config import ModbusPoint
    from protocols.modbus.mapping import BlockAddress, ModbusMapper

    result = {}
    for mode in ("always", "change"):
        resolved = [
            ResolvedPoint(id=f"dev.{spec['name']}", source="s2", device="dev",
                          spec=ModbusPoint.model_validate(spec), tags={},
                          report=ReportSpec(mode=mode), path=())
            for spec in points()
        ]
        mapper = ModbusMapper(resolved, bridge_id="bench")
        rng = random.Random(1)
        registers = [rng.randrange(0, 30000) for _ in range(INT16_POINTS)]
        registers += [0x4148, 0x0000] * FLOAT32_POINTS
        readings = [Reading("s2", BlockAddress("dev", "holding", start, count),
                            tuple(registers[start:start + count]), time.time())
                    for start, count in blocks()]
        decoded = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            for reading in readings:
                mapper.map(reading)
            decoded += POINTS
        result[mode] = decoded / (time.perf_counter() - started)
    return result


def run(options: Options) -> ScenarioResult:
    """Run S2."""
    result = ScenarioResult("S2", "Modbus polling: 1,000 int16 + 500 float32, one device")
    started = time.monotonic()
    planned = blocks()
    result.notes.append(
        f"Requests per cycle: {REGISTERS} registers / 125 per request gives a floor of "
        f"{FLOOR}. Sixteen requests reach it only if each carries exactly 125 registers, "
        f"i.e. the request boundaries sit at 125·k: 1000, 1125, 1250, … The float32 values "
        f"occupy register pairs starting at even addresses (1000, 1002, …), so the boundary "
        f"at 1125 falls inside the float32 at 1124-1125, at 1375 inside 1374-1375, and so "
        f"on: 16 requests need a float32 split across two requests, which the planner never "
        f"does (two reads of one value can tear). Without splitting, each request over the "
        f"float area carries at most 124 registers (62 values): 8 requests for 0..999 plus "
        f"ceil(1000 / 124) = 9 for 1000..1999 = 17. The planner's plan: {len(planned)} "
        f"requests ({', '.join(f'{s}+{c}' for s, c in planned)}).")
    measure = options.seconds(12.0, 4.0, 1.0)
    with workdir("s2") as directory, Peer(
            "bench.peers.modbus_server", "--registers", str(REGISTERS),
            "--changes", str(CHANGES_PER_SECOND), log_dir=directory) as server:
        port = server.wait_ready()["ports"][0]
        block_text = ",".join(f"{start}:{count}" for start, count in planned)
        with Peer("bench.peers.modbus_raw_client", "--port", str(port), "--blocks", block_text,
                  "--seconds", str(options.seconds(6.0, 2.0, 0.5)), log_dir=directory) as raw:
            raw.wait_ready()
            meter = CpuMeter(raw.pid).start()
            baseline = raw.wait_result(timeout=60)
            meter.stop()
        raw_cycles = baseline["cycles"] / baseline["seconds"]
        result.baselines.append(Figure("pymodbus alone: cycles/s (17 reads back to back)",
                                       raw_cycles, "cycles/s"))
        result.baselines.append(Figure("pymodbus alone: CPU per cycle",
                                       1000 * meter.seconds / max(1, baseline["cycles"]), "ms"))
        runs: dict[str, dict[str, float]] = {}
        # (run, report mode, store.sync): every value stored with the default sync, then with
        # report-by-exception, then every value stored with `normal` for the cost of `full`.
        for run_name, mode, sync in (("always", "always", "full"), ("change", "change", "full"),
                                     ("always normal", "always", "normal")):
            daemon = Daemon(config(port, mode, sync), directory,
                            name=f"daemon-{run_name.replace(' ', '-')}")
            with daemon:
                time.sleep(options.seconds(2.0, 1.0, 0.3))  # connect, first cycles, warm caches
                before = daemon.counters("s2")
                requests_before = server.ask("stats")["requests"]
                meter = CpuMeter(daemon.pid).start()
                time.sleep(measure)
                meter.stop()
                after = daemon.counters("s2")
                requests = server.ask("stats")["requests"] - requests_before
                cycles = after.get("cycles", 0) - before.get("cycles", 0)
                events = after.get("events", 0) - before.get("events", 0)
                runs[run_name] = {
                    "cycles_per_s": cycles / meter.wall,
                    "requests_per_cycle": requests / cycles if cycles else float("nan"),
                    "events_per_s": events / meter.wall,
                    "cpu_ms_per_cycle": 1000 * meter.seconds / cycles if cycles else float("nan"),
                    "cpu_share": meter.share,
                    "rss": tree_peak_rss_mb(daemon.pid),
                    "overruns": after.get("overruns", 0) - before.get("overruns", 0),
                }
                if options.profile and run_name == "always" and runs[run_name][
                        "cycles_per_s"] < 50:
                    profile = py_spy_top(daemon.pid, options.seconds(8, 3),
                                         options.out_dir / "s2-modbus-rbe-off.txt")
                    if profile is not None:
                        result.profiles.append(f"profiles/{profile.name}")
    off, on, normal = runs["always"], runs["change"], runs["always normal"]
    best = max(off["cycles_per_s"], on["cycles_per_s"])
    result.figures += [
        exactly("requests per cycle (server count / cycles)", on["requests_per_cycle"], "",
                len(planned), tolerance=0.05,
                note=f"{FLOOR} would split a float32; see the note"),
        goal("S2", "complete cycles/s, RBE on").figure(on["cycles_per_s"]),
        goal("S2", "complete cycles/s, RBE off").figure(
            off["cycles_per_s"], "every value an event, stored; store.sync full (default)"),
        Figure("cycle time, RBE on", 1000 / on["cycles_per_s"] if on["cycles_per_s"] else None,
               "ms"),
        at_least("values polled/s, RBE on", on["cycles_per_s"] * POINTS, "values/s", 75_000),
        at_least("points decoded/s (daemon, best run)", best * POINTS, "points/s", 100_000),
        goal("S2", "events/s, RBE off").figure(off["events_per_s"], "store.sync full"),
        Figure("events/s, RBE on", on["events_per_s"], "events/s",
               note=f"server changes {CHANGES_PER_SECOND} registers/s"),
        Figure("CPU per cycle, RBE on", on["cpu_ms_per_cycle"], "ms"),
        Figure("CPU per cycle, RBE off", off["cpu_ms_per_cycle"], "ms"),
        Figure("daemon CPU share, RBE on", 100 * on["cpu_share"], "% of a core"),
        Figure("peak RSS, RBE off", off["rss"], "MB"),
        Figure("complete cycles/s, RBE off, store.sync normal", normal["cycles_per_s"],
               "cycles/s", note="no fsync per commit: the power-cut risk the README states"),
        Figure("CPU per cycle, RBE off, store.sync normal", normal["cpu_ms_per_cycle"], "ms"),
    ]
    result.baselines += [
        Figure("store.sync full / normal: cycles/s, RBE off",
               off["cycles_per_s"] / normal["cycles_per_s"] if normal["cycles_per_s"]
               else None, "x", note="below 1: what `full` (the default) costs in throughput"),
        Figure("store.sync full / normal: CPU per cycle, RBE off",
               off["cpu_ms_per_cycle"] / normal["cpu_ms_per_cycle"]
               if normal["cpu_ms_per_cycle"] else None, "x",
               note="above 1: what `full` costs in CPU"),
    ]
    micro = mapper_microbench(options.seconds(3.0, 1.0, 0.1))
    result.figures.append(Figure("mapper alone: points decoded/s, RBE off", micro["always"],
                                 "points/s", note="in-process, no I/O"))
    result.figures.append(Figure("mapper alone: points decoded/s, RBE on", micro["change"],
                                 "points/s", note="in-process, no I/O"))
    result.baselines.append(Figure("daemon/pymodbus cycles ratio (RBE on)",
                                   on["cycles_per_s"] / raw_cycles, "x"))
    result.chart = {
        "S2 cycles/s, RBE off (>=50)": off["cycles_per_s"] / 50,
        "S2 cycles/s, RBE on (>=100)": on["cycles_per_s"] / 100,
        "S2 decoded/s (>=100k)": best * POINTS / 100_000,
    }
    result.seconds = time.monotonic() - started
    return result


if __name__ == "__main__":
    from bench.suite import main

    raise SystemExit(main(["--only", "S2"]))
