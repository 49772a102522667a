"""S7 polling: one PLC, 1,000 mixed points (400 REAL in DB1, 300 INT in DB2, 200 BOOL in DB3,
100 WORD merkers), polled back to back.

python-snap7's server runs in its own process. The daemon polls with a 1 ms interval; its
source counts the requests and cycles, so the requests per cycle are measured, not assumed.
The baseline is python-snap7's asyncio client alone reading the same blocks back to back in
its own process, in the same run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.figures import Figure, Options, ScenarioResult, exactly
from bench.harness import CpuMeter, Daemon, Peer, free_port, tree_peak_rss_mb, workdir
from protocols.s7.address import parse
from protocols.s7.config import READ_OVERHEAD
from protocols.s7.mapping import span_of
from protocols.s7.planner import plan

PDU = 480
MAX_GAP = 16


def points() -> list[dict[str, Any]]:
    """The 1,000 points."""
    reals = [{"name": f"r{index:03d}", "address": f"DB1.DBD{4 * index}:REAL"}
             for index in range(400)]
    ints = [{"name": f"i{index:03d}", "address": f"DB2.DBW{2 * index}:INT"}
            for index in range(300)]
    bits = [{"name": f"b{index:03d}", "address": f"DB3.DBX{index // 8}.{index % 8}"}
            for index in range(200)]
    words = [{"name": f"m{index:03d}", "address": f"MW{2 * index}"} for index in range(100)]
    return reals + ints + bits + words


def blocks() -> list[tuple[str, int, int, int]]:
    """The source's plan for these points at the PDU the server grants (area, db, start,
    count)."""
    spans = [span_of(parse(point["address"])) for point in points()]
    return [(block.area, block.db, block.start, block.count)
            for block in plan(spans, max_gap=MAX_GAP, max_bytes=PDU - READ_OVERHEAD)]


def config(port: int, mode: str) -> dict[str, Any]:
    """A daemon config polling the PLC back to back; ``mode`` ``always``: every value an
    event, ``change``: report by exception (the server changes 300 INTs a second)."""
    return {"sources": [{
        "id": "s7", "protocol": "s7", "host": "127.0.0.1", "port": port, "interval": "1ms",
        "timeout": "2s", "pdu_size": PDU, "max_gap": MAX_GAP, "report": {"mode": mode},
        "points": points()}]}


def run(options: Options) -> ScenarioResult:
    """Run the S7 scenario."""
    result = ScenarioResult("S7", "S7 polling: 1,000 mixed points, one PLC")
    started = time.monotonic()
    planned = blocks()
    count = len(points())
    result.notes.append(
        f"Plan at a PDU of {PDU} bytes ({PDU - READ_OVERHEAD} data bytes per read): "
        f"{len(planned)} requests per cycle ("
        + ", ".join(f"{area}{db if area == 'DB' else ''}:{start}+{size}"
                    for area, db, start, size in planned) + ").")
    measure = options.seconds(10.0, 4.0, 1.0)
    port = free_port()
    with workdir("s7") as directory, Peer("bench.peers.s7_server", "--port", str(port),
                                          "--changes", "300", log_dir=directory) as server:
        server.wait_ready()
        block_text = ",".join(f"{area}:{db}:{start}:{size}"
                              for area, db, start, size in planned)
        with Peer("bench.peers.s7_raw_client", "--port", str(port), "--blocks", block_text,
                  "--seconds", str(options.seconds(6.0, 2.0, 0.5)), log_dir=directory) as raw:
            raw.wait_ready()
            meter = CpuMeter(raw.pid).start()
            baseline = raw.wait_result(timeout=60)
            meter.stop()
        raw_cycles = baseline["cycles"] / baseline["seconds"]
        raw_cpu = 1000 * meter.seconds / max(1, baseline["cycles"])
        runs = {mode: _measure(port, mode, directory, options, measure)
                for mode in ("always", "change")}
    off, on = runs["always"], runs["change"]
    cycles_per_s = off["cycles_per_s"]
    result.figures += [
        exactly("requests per cycle (source count / cycles)", off["requests_per_cycle"], "",
                len(planned), tolerance=0.05),
        Figure("points polled/s", cycles_per_s * count, "points/s",
               note="every value an event, stored (store.sync full)"),
        Figure("complete cycles/s", cycles_per_s, "cycles/s"),
        Figure("events/s", off["events_per_s"], "events/s"),
        Figure("CPU per cycle", off["cpu_ms_per_cycle"], "ms"),
        Figure("points polled/s, report by exception", on["cycles_per_s"] * count,
               "points/s", note="only changes stored"),
        Figure("CPU per cycle, report by exception", on["cpu_ms_per_cycle"], "ms"),
        Figure("peak RSS", off["rss"], "MB"),
    ]
    result.baselines += [
        Figure(f"python-snap7 alone: points read/s ({len(planned)} reads back to back)",
               raw_cycles * count, "points/s"),
        Figure("python-snap7 alone: CPU per cycle", raw_cpu, "ms"),
        Figure("daemon / python-snap7 alone: cycles ratio",
               cycles_per_s / raw_cycles if raw_cycles else None, "x"),
    ]
    result.seconds = time.monotonic() - started
    return result


def _measure(port: int, mode: str, directory: Path, options: Options,
             measure: float) -> dict[str, float]:
    """One daemon polling in report mode ``mode``: its rates from the source's counters."""
    with Daemon(config(port, mode), directory, name=f"daemon-s7-{mode}") as daemon:
        time.sleep(options.seconds(2.0, 1.0, 0.3))  # connect, first cycles, warm caches
        before = daemon.counters("s7")
        meter = CpuMeter(daemon.pid).start()
        time.sleep(measure)
        meter.stop()
        after = daemon.counters("s7")
        rss = tree_peak_rss_mb(daemon.pid)
    cycles = after.get("cycles", 0) - before.get("cycles", 0)
    requests = after.get("requests", 0) - before.get("requests", 0)
    events = after.get("events", 0) - before.get("events", 0)
    nan = float("nan")
    return {"cycles_per_s": cycles / meter.wall if meter.wall else nan,
            "requests_per_cycle": requests / cycles if cycles else nan,
            "events_per_s": events / meter.wall if meter.wall else nan,
            "cpu_ms_per_cycle": 1000 * meter.seconds / cycles if cycles else nan,
            "rss": rss}


if __name__ == "__main__":
    from bench.suite import main

    raise SystemExit(main(["--only", "S7"]))
