"""Durable means on disk: with ``store.sync: full`` no MQTT message is acknowledged upstream
before the commit holding its event was synced to disk.

The daemon runs under ``strace``, which records, in order, its writes to the store's
write-ahead log, the syncs of that file and what it sends on its sockets. For each QoS 1 message
the test finds the log write carrying the message's value, then requires a sync of the log
between that write and the PUBACK the daemon sends for the message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
import yaml
from helpers import free_port
from helpers.brokers import MQTT_HOST, MQTT_PORT, require_broker, unique

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = 8
BASE = 7_654_320
"""Values of the messages: numbers that appear nowhere else in the store's pages."""
_CALL = re.compile(r"^(?P<pid>\d+)\s+(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<result>-?\d+)")
_STARTED = re.compile(r"^(?P<pid>\d+)\s+(?P<name>\w+)\((?P<args>.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(
    r"^(?P<pid>\d+)\s+<\.\.\. (?P<name>\w+) resumed>(?P<args>.*)\)\s+=\s+(?P<result>-?\d+)")
PUBACK = "\\x40\\x02"


def hex_escaped(text: str) -> str:
    """``text`` as strace ``-xx`` prints it."""
    return "".join(f"\\x{byte:02x}" for byte in text.encode())


def wait_for(predicate: object, what: str, process: subprocess.Popen[bytes],
             within: float = 30.0) -> None:
    """Poll ``predicate`` until true (the daemon answers over HTTP: nothing to await)."""
    import time

    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        if process.poll() is not None:
            pytest.fail(f"the daemon exited with {process.returncode} waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def value_of(client: httpx.Client, point: str) -> object:
    """The point's current value over REST, or ``None``."""
    response = client.get(f"/v1/points/{point}")
    return response.json().get("value") if response.status_code == 200 else None


def test_no_puback_precedes_the_sync_of_its_commit(tmp_path: Path) -> None:
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (tests/run installs it): apt-get install strace")
    topic = unique("fbtest/durable/")
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "api": {"port": port},
        "store": {"sync": "full", "commit_interval": 0},
        "sources": [{"id": "plant", "protocol": "mqtt", "host": MQTT_HOST, "port": MQTT_PORT,
                     "client_id": unique("fbtest-durable-"), "qos": 1,
                     "points": [{"name": "v", "topic": topic, "path": "v"}]}],
    }), encoding="utf-8")
    trace = tmp_path / "trace.txt"
    log = tmp_path / "daemon.log"
    with log.open("wb") as output:
        daemon = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", str(trace), "-s", "70000", "-xx",
             "-e", "trace=openat,pwrite64,write,sendto,sendmsg,fsync,fdatasync",
             sys.executable, "-m", "bridge", "--log-level", "warning", "run", "-c", str(config)],
            cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    publisher = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=unique("fbtest-pub-"))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as api:
            wait_for(lambda: _ready(api), "the daemon ready", daemon)
            publisher.connect(MQTT_HOST, MQTT_PORT)
            publisher.loop_start()
            # Ready does not wait for the broker's SUBACK: warm up until a message arrives.
            # Warm-up messages are acknowledged before the measured ones.
            warm_up = BASE - 1
            deadline = time.monotonic() + 30
            while value_of(api, "v") != warm_up:
                if time.monotonic() > deadline:
                    pytest.fail("the daemon never received a message from its subscription")
                publisher.publish(topic, json.dumps({"v": warm_up}), qos=1).wait_for_publish(10)
                for _ in range(20):
                    if value_of(api, "v") == warm_up:
                        break
                    time.sleep(0.05)
            for index in range(MESSAGES):
                value = BASE + index
                publisher.publish(topic, json.dumps({"v": value}), qos=1).wait_for_publish(10)
                wait_for(lambda value=value: value_of(api, "v") == value,  # type: ignore[misc]
                         f"value {value} stored", daemon)
        # The daemon is strace's child: stop it, and strace ends with it.
        children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
        assert len(children) == 1
        os.kill(int(children[0]), signal.SIGTERM)
        assert daemon.wait(30) == 0, log.read_text(errors="replace")
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(30)
    check_trace(trace.read_text(errors="replace").splitlines())


def _ready(api: httpx.Client) -> bool:
    try:
        return api.get("/health/ready").status_code == 200
    except httpx.TransportError:
        return False


def calls(lines: list[str]) -> list[tuple[int, str, str, str, str]]:
    """``(line, pid, name, arguments, result)`` of every finished call, at the line where it
    finished (a call another thread interrupted is printed in two parts)."""
    finished: list[tuple[int, str, str, str, str]] = []
    started: dict[tuple[str, str], str] = {}
    for number, line in enumerate(lines):
        if (call := _CALL.match(line)) is not None:
            finished.append((number, call["pid"], call["name"], call["args"], call["result"]))
        elif (call := _STARTED.match(line)) is not None:
            started[call["pid"], call["name"]] = call["args"]
        elif (call := _RESUMED.match(line)) is not None:
            begun = started.pop((call["pid"], call["name"]), "")
            finished.append((number, call["pid"], call["name"], begun + call["args"],
                             call["result"]))
    return finished


def check_trace(lines: list[str]) -> None:
    """For every message: its value written to the log, then a sync of the log, then its
    PUBACK."""
    wal_fds: set[str] = set()
    writes: dict[int, int] = {}
    """Message index → trace line where its value was first written to the log."""
    syncs: list[int] = []
    pubacks: list[int] = []
    markers = {hex_escaped(f'"value":{BASE + index}'): index for index in range(MESSAGES)}
    for number, _, name, args, result in calls(lines):
        if name == "openat" and hex_escaped("-wal") in args:
            wal_fds.add(result)
            continue
        fd, _, rest = args.partition(",")
        if name == "pwrite64" and fd in wal_fds:
            for marker, index in markers.items():
                if marker in rest:
                    writes.setdefault(index, number)
        elif name in ("fsync", "fdatasync") and fd in wal_fds:
            syncs.append(number)
        elif name in ("write", "sendto", "sendmsg") and rest.lstrip(' "').startswith(PUBACK):
            pubacks.append(number)
    assert wal_fds, "the daemon never opened the store's write-ahead log"
    assert sorted(writes) == list(range(MESSAGES)), "a message's value never reached the log"
    assert len(pubacks) >= MESSAGES, f"only {len(pubacks)} PUBACKs were sent"
    # One publisher, one subscription at QoS 1: the broker delivers, and the daemon
    # acknowledges, in publishing order; the measured messages were the last.
    pubacks = pubacks[-MESSAGES:]
    for index in range(MESSAGES):
        written, acked = writes[index], pubacks[index]
        assert written < acked, f"message {index} was acknowledged before it was written"
        assert any(written < synced < acked for synced in syncs), (
            f"message {index} was acknowledged before its commit was synced to disk")
