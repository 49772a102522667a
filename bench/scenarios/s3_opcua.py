"""S3 OPC-UA subscription: 10,000 variables changing at a steady rate, all subscribed.

An asyncua server (its own process) writes 25,000 changes a second round robin over 10,000
Double variables (each changes 2.5 times a second); the daemon subscribes to all of them
(publishing interval 100 ms, queue size 1, every notification an event). Baseline in the same
run: asyncua alone, subscribing the same way and only counting. Then the field's way to the
second core: two daemons subscribing to 5,000 variables each.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from bench.figures import Figure, Options, ScenarioResult, at_least
from bench.harness import (
    CpuMeter,
    Daemon,
    Peer,
    PeerError,
    py_spy_top,
    tree_peak_rss_mb,
    wait_until,
    workdir,
)

VARIABLES = 10_000
RATE = 25_000


def config(url: str, variables: range) -> dict[str, Any]:
    """The daemon's config: one OPC-UA source subscribing to these variables."""
    return {"sources": [{
        "id": "s3", "protocol": "opcua", "url": url, "mode": "subscribe",
        "publishing_interval": "100ms", "queue_size": 1, "timeout": "30s",
        "report": {"mode": "always"},
        "points": [{"name": f"v{index:05d}", "node": f"ns=2;s=v{index:05d}"}
                   for index in variables],
    }]}


def split_run(directory: Path, url: str, server: Peer, variables: int, seconds: float,
              settle: float) -> dict[str, float]:
    """Two daemons, half the variables each (the field's way to a second core): events/s and
    CPU share summed."""
    halves = (range(0, variables // 2), range(variables // 2, variables))
    with contextlib.ExitStack() as stack:
        daemons = [stack.enter_context(Daemon(config(url, half), directory, name=f"half-{i}"))
                   for i, half in enumerate(halves)]
        for daemon, half in zip(daemons, halves, strict=True):
            wait_until(lambda d=daemon, h=half: (d.sources()[0].get("details") or {}).get(
                "monitored_items", 0) >= len(h), 120, interval=0.2)
        time.sleep(settle)
        server.ask("reset")
        before = sum(daemon.counters("s3").get("events", 0) for daemon in daemons)
        meters = [CpuMeter(daemon.pid).start() for daemon in daemons]
        time.sleep(seconds)
        for meter in meters:
            meter.stop()
        after = sum(daemon.counters("s3").get("events", 0) for daemon in daemons)
        produced = server.ask("stats")
        return {"events": (after - before) / meters[0].wall,
                "share": sum(meter.share for meter in meters), "produced": produced["rate"]}


def one_daemon(directory: Path, url: str, server: Peer, variables: int, seconds: float,
               options: Options) -> dict[str, Any]:
    """One daemon subscribing to every variable: rate, CPU, resubscriptions, RSS."""
    daemon = Daemon(config(url, range(variables)), directory)
    launched = time.monotonic()
    profiles: list[str] = []
    with daemon:
        subscribed = float("nan")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (daemon.sources()[0].get("details") or {}).get("monitored_items",
                                                                0) >= variables:
                subscribed = time.monotonic() - launched
                break
            time.sleep(0.1)
        time.sleep(options.seconds(3.0, 2.0, 0.3))
        server.ask("reset")
        before = daemon.counters("s3")
        meter = CpuMeter(daemon.pid).start()
        time.sleep(seconds)
        meter.stop()
        after = daemon.counters("s3")
        produced = server.ask("stats")
        events = (after.get("events", 0) - before.get("events", 0)) / meter.wall
        if options.profile and events < 20_000:
            profile = py_spy_top(daemon.pid, options.seconds(10, 4),
                                 options.out_dir / "s3-opcua.txt")
            if profile is not None:
                profiles.append(f"profiles/{profile.name}")
        return {
            "events": events,
            "share": meter.share,
            "cpu_per_10k": 10_000 * meter.seconds / max(1.0, events * meter.wall),
            "reconnects": after.get("reconnects", 0) - before.get("reconnects", 0),
            "rss": tree_peak_rss_mb(daemon.pid),
            "subscribed": subscribed,
            "ready": daemon.ready_seconds,
            "produced": produced["rate"],
            "profiles": profiles,
        }


def run(options: Options) -> ScenarioResult:
    """Run S3."""
    result = ScenarioResult("S3", "OPC-UA subscription: 10,000 variables")
    started = time.monotonic()
    seconds = options.seconds(15.0, 5.0, 1.0)
    variables = options.size(VARIABLES, VARIABLES, 200)
    rate = options.size(RATE, RATE, 500)
    with workdir("s3") as directory, Peer("bench.peers.opcua_server", "--variables",
                                          str(variables), "--rate", str(rate),
                                          log_dir=directory) as server:
        url = server.wait_ready()["url"]
        # The peer bounds its own run (--deadline) and reports a lost connection as an error;
        # the harness's wait is longer still, for a peer that hangs all the same.
        with Peer("bench.peers.opcua_raw_client", "--url", url, "--variables", str(variables),
                  "--seconds", str(seconds), "--deadline", str(seconds + 40),
                  log_dir=directory) as raw:
            raw.wait_ready()
            server.ask("reset")
            meter = CpuMeter(raw.pid).start()
            baseline = raw.wait_result(timeout=seconds + 60)
            meter.stop()
            produced = server.ask("stats")
        if "error" in baseline:
            raise PeerError(f"opcua_raw_client: {baseline['error']}")
        raw_rate = baseline["notifications"] / baseline["seconds"]
        result.baselines += [
            Figure("asyncua alone: notifications/s", raw_rate, "notif/s",
                   note=f"server wrote {produced['rate']:.0f} changes/s meanwhile"),
            Figure("asyncua alone: CPU share", 100 * meter.share, "% of a core"),
            Figure("asyncua alone: time to subscribe all", baseline["subscribe_seconds"], "s"),
        ]
        one = one_daemon(directory, url, server, variables, seconds, options)
        result.profiles += one.pop("profiles")
        split = split_run(directory, url, server, variables, seconds,
                          options.seconds(3.0, 3.0, 0.3))
    events = one["events"]
    result.figures += [
        at_least("notifications/s turned into events", events, "events/s", 20_000,
                 note=f"server wrote {one['produced']:.0f} changes/s; "
                 f"{one['reconnects']:.0f} resubscriptions in the window"),
        Figure("daemon CPU share", 100 * one["share"], "% of a core"),
        Figure("CPU per 10,000 notifications", one["cpu_per_10k"], "s"),
        Figure("peak RSS", one["rss"], "MB"),
        Figure("time to subscribe all (process start to 10,000 monitored items)",
               one["subscribed"], "s", note=f"ready after {one['ready']:.2f} s"),
    ]
    result.figures.append(at_least(
        "two daemons x 5,000 variables: notifications/s into events", split["events"],
        "events/s", 20_000, note=f"CPU {100 * split['share']:.0f}% of a core summed; server "
        f"wrote {split['produced']:.0f} changes/s"))
    result.baselines.append(Figure("daemon / asyncua alone notifications", events / raw_rate
                                   if raw_rate else None, "x"))
    result.baselines.append(Figure("two daemons / one daemon", split["events"] / events
                                   if events else None, "x"))
    result.chart = {"S3 notif/s (>=20k)": events / 20_000,
                    "S3 two daemons notif/s (>=20k)": split["events"] / 20_000}
    result.seconds = time.monotonic() - started
    return result


if __name__ == "__main__":
    from bench.suite import main

    raise SystemExit(main(["--only", "S3"]))
