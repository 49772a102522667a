"""S5 REST: the API under wrk with 10,000 points in the store.

The daemon polls 100 Modbus devices x 100 points every 60 s: once the first poll has stored a
value for all 10,000, wrk (its own process) requests one point
(`GET /v1/points/{id}`) and a filtered list (`GET /v1/points?device=...`, 100 of the 10,000)
for a fixed time. Baseline in the same run: the web stack alone (FastAPI + uvicorn, the same
configuration) serving the same kind of object from a dict. Without wrk the scenario is
skipped, except in a smoke run, where one connection of this process's own stands in for it
(its figures are not wrk's).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass

from bench.figures import Figure, Options, ScenarioResult, at_least, at_most
from bench.harness import CpuMeter, Daemon, Peer, percentile, py_spy_top, workdir
from bench.scenarios.fleet import device_id, fleet_config

CONNECTIONS = 16

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass
class WrkResult:
    """What wrk reported."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_share: float = 0.0
    """Of the server under test, from /proc."""


def _milliseconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def one_connection(url: str, seconds: float, server_pid: int) -> WrkResult:
    """The smoke run's stand-in for wrk: requests one after another for ``seconds``."""
    meter = CpuMeter(server_pid).start()
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
            errors += response.status != 200
        latencies.append(1000 * (time.perf_counter() - started))
    meter.stop()
    return WrkResult(requests_per_second=len(latencies) / meter.wall,
                     p50_ms=percentile(latencies, 0.5), p99_ms=percentile(latencies, 0.99),
                     errors=errors, cpu_share=meter.share)


def wrk(url: str, seconds: float, server_pid: int) -> WrkResult:
    """Run wrk (1 thread, 16 connections) against ``url``; measure the server's CPU."""
    if shutil.which("wrk") is None:
        return one_connection(url, seconds, server_pid)
    meter = CpuMeter(server_pid).start()
    done = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency", url],
        capture_output=True, text=True, check=False, timeout=seconds + 60)
    meter.stop()
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip() or done.stdout.strip()}")
    text = done.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    percentiles = dict(re.findall(r"^\s+(\d+)%\s+(\S+)$", text, re.MULTILINE))
    errors = sum(int(value) for value in re.findall(r"(?:connect|read|write|timeout) (\d+)",
                                                    text))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return WrkResult(
        requests_per_second=float(rate.group(1)) if rate else float("nan"),
        p50_ms=_milliseconds(percentiles.get("50", "")),
        p99_ms=_milliseconds(percentiles.get("99", "")),
        errors=errors,
        cpu_share=meter.share,
    )


def run(options: Options) -> ScenarioResult:
    """Run S5."""
    result = ScenarioResult("S5", "REST: one point and a filtered list, 10,000 points stored")
    started = time.monotonic()
    if shutil.which("wrk") is None and not options.smoke:
        result.status = "skipped"
        result.reason = ("wrk is not installed: `apt-get install wrk` (bench/run installs it "
                         "when run as root on Debian)")
        return result
    seconds = options.seconds(10.0, 3.0, 0.3)
    units = options.size(50, 50, 5)
    points_per_device = options.size(100, 100, 10)
    if shutil.which("wrk") is None:
        result.notes.append("wrk is not installed: one connection of the bench's own stood "
                            "in for it (a smoke run).")
    with workdir("s5") as directory:
        with Peer("bench.peers.bare_api", log_dir=directory) as bare:
            port = bare.wait_ready()["port"]
            wrk(f"http://127.0.0.1:{port}/v1/points/dev.p00042", min(1, seconds),
                bare.pid)  # warm up
            baseline = wrk(f"http://127.0.0.1:{port}/v1/points/dev.p00042", seconds, bare.pid)
        with Peer("bench.peers.modbus_server", "--ports", "2", "--units", str(units),
                  "--registers", str(points_per_device), log_dir=directory) as server:
            ports = server.wait_ready()["ports"]
            # The first poll stores a value for every point; at a 60 s interval the API is then
            # measured without 2,000 events/s of polling and storing competing for the core.
            with Daemon(fleet_config(ports, units=units, points_per_device=points_per_device,
                                     interval="60s"), directory) as daemon:
                deadline = time.monotonic() + 30
                while (daemon.counters().get("events", 0) < 2 * units * points_per_device
                       and time.monotonic() < deadline):
                    time.sleep(0.2)
                _, body = daemon.get("/v1/points?limit=1")
                stored = body.get("total") if isinstance(body, dict) else None
                point = f"{device_id(1, min(17, units))}.p{min(42, points_per_device - 1):03d}"
                url = f"http://127.0.0.1:{daemon.port}"
                wrk(f"{url}/v1/points/{point}", min(1, seconds), daemon.pid)  # warm up
                single = wrk(f"{url}/v1/points/{point}", seconds, daemon.pid)
                listed = wrk(f"{url}/v1/points?device={device_id(0, 7)}", seconds, daemon.pid)
                if options.profile and (single.requests_per_second < 3000
                                        or single.p99_ms >= 20):
                    load = subprocess.Popen(
                        ["wrk", "-t1", f"-c{CONNECTIONS}", "-d8s", f"{url}/v1/points/{point}"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1)
                    profile = py_spy_top(daemon.pid, 5, options.out_dir / "s5-rest-point.txt")
                    load.wait(timeout=30)
                    if profile is not None:
                        result.profiles.append(f"profiles/{profile.name}")
                _, body = daemon.get(f"/v1/points?device={device_id(0, 7)}")
                listed_items = len(body.get("items", [])) if isinstance(body, dict) else 0
    result.figures += [
        at_least("GET /v1/points/{id}: requests/s", single.requests_per_second, "req/s", 3000),
        at_most("GET /v1/points/{id}: p99 latency", single.p99_ms, "ms", 20),
        Figure("GET /v1/points/{id}: p50 latency", single.p50_ms, "ms"),
        Figure("GET /v1/points?device=…: requests/s", listed.requests_per_second, "req/s",
               note=f"{listed_items} items of {stored} per page"),
        Figure("GET /v1/points?device=…: p99 latency", listed.p99_ms, "ms"),
        Figure("daemon CPU share under wrk (single point)", 100 * single.cpu_share,
               "% of a core"),
        Figure("errors (non-2xx, socket)", single.errors + listed.errors, ""),
    ]
    result.baselines += [
        Figure("FastAPI + uvicorn alone: requests/s", baseline.requests_per_second, "req/s"),
        Figure("FastAPI + uvicorn alone: p99 latency", baseline.p99_ms, "ms"),
        Figure("daemon / web stack alone (single point)",
               single.requests_per_second / baseline.requests_per_second, "x"),
    ]
    result.notes.append(f"wrk: 1 thread, {CONNECTIONS} connections, {seconds:.0f} s per URL, "
                        "on the same 2 cores as the daemon.")
    result.chart = {
        "S5 req/s (>=3000)": single.requests_per_second / 3000,
        "S5 p99 (<20 ms)": 20 / single.p99_ms if single.p99_ms else 0.0,
    }
    result.seconds = time.monotonic() - started
    return result


if __name__ == "__main__":
    from bench.suite import main

    raise SystemExit(main(["--only", "S5"]))
