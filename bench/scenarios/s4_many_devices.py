"""S4 many devices: 500 Modbus devices x 20 points, each polled every second.

Five pymodbus servers (one process, five ports: five gateways) with 100 unit ids each; the
daemon has one source per gateway. Poll jitter is measured at the servers, from the arrival
times of each device's requests: |interval between two polls - 1 s|. Run twice: every
reading an event (report `always`, 10,000 events/s into the store) and report-by-exception
(`change`, the servers change 200 registers a second). Baseline in the same run: pymodbus
alone polling the same devices on the same grid.
"""

from __future__ import annotations

import time
from typing import Any

from bench.figures import Figure, Options, ScenarioResult, at_most, goal
from bench.harness import CpuMeter, Daemon, Peer, py_spy_top, tree_peak_rss_mb, workdir
from bench.scenarios.fleet import fleet_config

PORTS = 5
UNITS = 100
POINTS = 20
CHANGES = 200


def run(options: Options) -> ScenarioResult:
    """Run S4."""
    result = ScenarioResult("S4", "500 Modbus devices x 20 points at 1 s")
    started = time.monotonic()
    seconds = options.seconds(20.0, 8.0, 1.2)
    interval = options.seconds(1.0, 1.0, 0.25)
    ports_count = options.size(PORTS, PORTS, 2)
    units = options.size(UNITS, UNITS, 5)
    runs: dict[str, dict[str, Any]] = {}
    with workdir("s4") as directory, Peer(
            "bench.peers.modbus_server", "--ports", str(ports_count), "--units", str(units),
            "--registers", str(POINTS), "--changes", str(CHANGES), log_dir=directory) as server:
        ports = server.wait_ready()["ports"]
        with Peer("bench.peers.modbus_raw_fleet", "--ports", ",".join(map(str, ports)),
                  "--units", str(units), "--count", str(POINTS),
                  "--interval", str(interval), "--seconds", str(seconds), log_dir=directory) as raw:
            raw.wait_ready()
            server.ask("reset")
            meter = CpuMeter(raw.pid).start()
            baseline = raw.wait_result(timeout=seconds + 60)
            meter.stop()
            raw_jitter = server.ask("stats", interval=interval)["jitter_ms"]
        result.baselines += [
            Figure("pymodbus alone: CPU share", 100 * meter.share, "% of a core",
                   note=f"{baseline['cycles'] / baseline['seconds']:.0f} polls/s"),
            Figure("pymodbus alone: jitter p99", raw_jitter["p99"], "ms"),
        ]
        raw_share = meter.share
        for run_name in ("always", "change"):
            config = fleet_config(ports, units=units, points_per_device=POINTS,
                                  interval=f"{interval:g}s", mode=run_name)
            with Daemon(config, directory, name=f"daemon-{run_name}") as daemon:
                time.sleep(options.seconds(3.0, 2.0, 0.5))
                server.ask("reset")
                before = daemon.counters()
                meter = CpuMeter(daemon.pid).start()
                time.sleep(seconds)
                meter.stop()
                stats = server.ask("stats", interval=interval)
                after = daemon.counters()
                runs[run_name] = {
                    "share": meter.share,
                    "jitter": stats["jitter_ms"],
                    "polled": stats["polled_units"],
                    "polls_per_s": stats["requests"] / meter.wall,
                    "events_per_s": (after.get("events", 0) - before.get("events", 0))
                    / meter.wall,
                    "overruns": after.get("overruns", 0) - before.get("overruns", 0),
                    "rss": tree_peak_rss_mb(daemon.pid),
                }
                if options.profile and run_name == "always" and meter.share >= 0.35:
                    profile = py_spy_top(daemon.pid, options.seconds(10, 4),
                                         options.out_dir / "s4-many-devices.txt")
                    if profile is not None:
                        result.profiles.append(f"profiles/{profile.name}")
    for name, label in (("always", "every reading an event"), ("change", "report by exception")):
        measured = runs[name]
        cpu_note = (f"{measured['events_per_s']:.0f} events/s, "
                    f"{measured['polls_per_s']:.0f} polls/s of {measured['polled']} devices")
        result.figures += [
            goal("S4", f"CPU share, {label}").figure(100 * measured["share"], cpu_note)
            if name == "always" else
            at_most(f"CPU share, {label}", 100 * measured["share"], "% of a core", 50,
                    note=cpu_note),
            Figure(f"poll jitter p50, {label}", measured["jitter"]["p50"], "ms"),
            at_most(f"poll jitter p99, {label}", measured["jitter"]["p99"], "ms", 100),
            Figure(f"peak RSS, {label}", measured["rss"], "MB"),
        ]
    result.notes.append(
        "Jitter: the daemon polls the devices sharing a connection at evenly spread phases of "
        "their interval (commit 'Modbus: spread the polls of devices sharing a connection'). "
        "The runtime freezes its start-up objects out of the garbage collector's full passes "
        "(gc.freeze(), commit 'Runtime: freeze start-up objects out of the garbage "
        "collector's full passes').")
    result.baselines.append(Figure("daemon / pymodbus alone CPU (report by exception)",
                                   runs["change"]["share"] / raw_share if raw_share else None,
                                   "x"))
    result.chart = {
        "S4 CPU, always (<35%)": 0.35 / runs["always"]["share"] if runs["always"]["share"]
        else 0,
        "S4 CPU, change (<50%)": 0.5 / runs["change"]["share"] if runs["change"]["share"] else 0,
        "S4 jitter p99 (<100 ms)": 100 / max(1e-3, runs["always"]["jitter"]["p99"]),
    }
    result.seconds = time.monotonic() - started
    return result


if __name__ == "__main__":
    from bench.suite import main

    raise SystemExit(main(["--only", "S4"]))
