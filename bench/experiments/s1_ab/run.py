"""S1's burst with two versions of the daemon, alternately, to tell the code from the machine.

Each checkout runs its own ``.venv/bin/python -m bridge`` pinned to core 1, with S1's MQTT
source (QoS 0, templated points, every value an event) and an AMQP sink, against the stock
Mosquitto on 127.0.0.1:1883 and RabbitMQ on 5672; S1's publisher sends ``--count`` messages
from core 0. The daemon's CPU (``/proc/<pid>/stat``) from the first message until it has been
idle for two seconds, and what its source and sink counted, are printed per run::

    python -m bench.experiments.s1_ab.run /path/to/old-checkout /path/to/new-checkout

Each checkout needs its own ``.venv`` with the package installed (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
PORT = 18771


def cpu_seconds(pid: int) -> float:
    """User and system CPU of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get(path: str) -> Any:
    """A JSON answer of the daemon's API."""
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=5) as response:
        return json.loads(response.read())


def config(state: str) -> dict[str, Any]:
    """S1's source, an AMQP sink with a bounded queue, the API for the counters."""
    point = {"topic": "sensors/{device}/telemetry"}
    return {
        "bridge": {"id": "ab", "state_dir": state},
        "api": {"host": "127.0.0.1", "port": PORT},
        "sources": [{"id": "telemetry", "protocol": "mqtt", "host": "127.0.0.1", "port": 1883,
                     "qos": 0, "clean_session": True, "report": {"mode": "always"},
                     "timestamp": {"path": "ts", "format": "epoch_ms"},
                     "points": [{**point, "name": "{device}.temperature", "path": "temp"},
                                {**point, "name": "{device}.humidity", "path": "hum"}]}],
        "sinks": [{"id": "rabbit", "protocol": "amqp", "host": "127.0.0.1",
                   "exchange": {"name": "fbbench.ab"},
                   "topology": {"queues": [{"name": "fbbench.ab", "max_length": 1000}]}}],
    }


def ready() -> bool:
    """Whether the daemon answers ready."""
    try:
        return bool(get("/health/ready")["status"] == "ready")
    except OSError:
        return False


def run(tree: Path, count: int) -> None:
    """One run of ``tree``'s daemon; prints its figures."""
    with tempfile.TemporaryDirectory() as state:
        path = Path(state) / "config.yaml"
        path.write_text(yaml.safe_dump(config(state)), encoding="utf-8")
        daemon = subprocess.Popen(
            ["taskset", "-c", "1", str(tree / ".venv/bin/python"), "-m", "bridge",
             "--log-level", "warning", "run", "-c", str(path)], cwd=tree)
        try:
            deadline = time.monotonic() + 30
            while not ready():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{tree}: the daemon did not get ready")
                time.sleep(0.1)
            time.sleep(1.0)  # the subscription's SUBACK
            before = cpu_seconds(daemon.pid)
            subprocess.run(["taskset", "-c", "0", sys.executable, "-m",
                            "bench.peers.mqtt_publisher", "--count", str(count)],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            last, idle = cpu_seconds(daemon.pid), 0
            while idle < 4:
                time.sleep(0.5)
                now = cpu_seconds(daemon.pid)
                idle = idle + 1 if now - last < 0.01 else 0
                last = now
            used = last - before
            source = get("/v1/sources")["items"][0]["counters"]
            sink = get("/v1/sinks")["items"][0]["counters"]
        finally:
            daemon.terminate()
            daemon.wait(30)
    received = max(int(source.get("readings", 0)), 1)
    print(f"{tree}: {used:.2f} CPU s, {used / received * 10_000:.2f} per 10,000 messages; "
          f"messages {source.get('readings', 0)} of {count}, events {source.get('events', 0)}, "
          f"confirmed {sink.get('confirmed', 0)}", flush=True)


def main() -> None:
    """Run each checkout ``--rounds`` times, alternately."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    for _ in range(options.rounds):
        for tree in options.trees:
            run(tree.resolve(), options.count)


if __name__ == "__main__":
    main()
