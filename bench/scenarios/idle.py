"""Idle footprint and start-up with 10,000 points configured.

100 Modbus devices (2 gateways x 50 unit ids) x 100 int16 points, polled every 10 s: after
the first poll every point has a value in memory and in the store, then the daemon idles.
Baselines in the same run: the interpreter alone, and the interpreter with every module the
daemon imports (the libraries' floor), both measured from /proc the same way.
"""

from __future__ import annotations

import subprocess
import time

from bench.figures import Figure, Options, ScenarioResult, at_most
from bench.harness import ROOT, CpuMeter, Daemon, Peer, peak_rss_mb, python, rss_mb, workdir
from bench.scenarios.fleet import fleet_config

IMPORTS = ("import bridge.cli, bridge.runtime, bridge.api.app, bridge.config.loader, "
           "protocols.modbus, protocols.opcua, protocols.mqtt, protocols.amqp")


def _baseline(code: str) -> tuple[float, float]:
    """Seconds to run ``code`` and then the process's RSS (MB), measured from outside."""
    started = time.monotonic()
    process = subprocess.Popen(
        [python(), "-c", f"{code}; import sys; sys.stdout.write('x\\n'); sys.stdout.flush(); "
         "sys.stdin.readline()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdin is not None
    process.stdout.readline()
    seconds = time.monotonic() - started
    rss = rss_mb(process.pid)
    process.stdin.close()
    process.wait(timeout=10)
    return seconds, rss


def run(options: Options) -> ScenarioResult:
    """Run the idle scenario."""
    result = ScenarioResult("IDLE", "Idle footprint and start-up, 10,000 points configured")
    started = time.monotonic()
    _, bare_rss = _baseline("pass")
    import_seconds, import_rss = _baseline(IMPORTS)
    result.baselines += [
        Figure("python alone: RSS", bare_rss, "MB"),
        Figure("python + the daemon's imports: RSS", import_rss, "MB",
               note="fastapi, uvicorn, pydantic, pymodbus, asyncua, aiomqtt, pika loaded"),
        Figure("python + the daemon's imports: time", import_seconds, "s"),
    ]
    units = options.size(50, 50, 5)
    points_per_device = options.size(100, 100, 10)
    total = 2 * units * points_per_device
    with workdir("idle") as directory, Peer("bench.peers.modbus_server", "--ports", "2",
                                            "--units", str(units), "--registers",
                                            str(points_per_device), log_dir=directory) as server:
        ports = server.wait_ready()["ports"]
        config = fleet_config(ports, units=units, points_per_device=points_per_device,
                              interval="10s")
        readies = []
        for attempt in range(2 if options.quick else 3):
            daemon = Daemon(config, directory, name=f"daemon-{attempt}")
            with daemon:
                readies.append(daemon.ready_seconds)
                if attempt:
                    continue
                # Every point has a value once the first poll round is stored.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if daemon.counters().get("events", 0) >= total:
                        break
                    time.sleep(0.2)
                points = daemon.counters().get("events", 0)
                time.sleep(options.seconds(3.0, 1.0, 0.2))
                meter = CpuMeter(daemon.pid).start()
                time.sleep(options.seconds(10.0, 4.0, 0.5))
                meter.stop()
                idle_rss = rss_mb(daemon.pid)
                peak = peak_rss_mb(daemon.pid)
        first_ready = readies[0]
        best_ready = min(readies)
    result.figures += [
        at_most("RSS idle, 10,000 points with values", idle_rss, "MB", 150),
        Figure("peak RSS (VmHWM)", peak, "MB"),
        at_most("time to ready, first start (empty store)", first_ready, "s", 3.0),
        at_most("time to ready, restart (10,000 stored values)", min(readies[1:] or readies),
                "s", 3.0),
        Figure("idle CPU share (10 s poll interval)", 100 * meter.share, "% of a core"),
        Figure("events stored before idling", points, "events"),
    ]
    result.baselines.append(Figure("daemon RSS / imports-alone RSS", idle_rss / import_rss, "x"))
    result.baselines.append(Figure("ready time - imports-alone time", best_ready - import_seconds,
                                   "s", note="config load, compile, store, API start"))
    result.chart = {"IDLE RSS (<150 MB)": 150 / idle_rss if idle_rss else 0.0,
                    "IDLE ready (<3 s)": 3.0 / first_ready if first_ready else 0.0}
    result.seconds = time.monotonic() - started
    return result


if __name__ == "__main__":
    from bench.suite import main

    raise SystemExit(main(["--only", "IDLE"]))
