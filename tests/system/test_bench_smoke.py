"""The bench still runs: every scenario once in smoke mode (tiny loads, no pinning, no profiles).

Each scenario runs as ``python -m bench --smoke --only KEY --output <tmp>`` in a session of its
own, so a hung scenario can be stopped with everything it started; every process it starts
carries a marker in its environment, and the test fails if one is still alive afterwards. The
figures it wrote must be there, finite, and include the ones its targets are held against.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = next(parent for parent in Path(__file__).resolve().parents
            if (parent / "pyproject.toml").exists())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCENARIOS: dict[str, tuple[str, str]] = importlib.import_module("bench.suite").SCENARIOS
GOALS: tuple[Any, ...] = importlib.import_module("bench.figures").GOALS
S1_WORKERS: str = importlib.import_module("bench.figures").S1_WORKERS

SCENARIO_SECONDS = 270
"""The most one scenario may take in smoke mode on a busy machine before it counts as hung."""

BROKERS: dict[str, tuple[tuple[str, int], ...]] = {
    "S1": (("Mosquitto", 1883), ("RabbitMQ", 5672)),
    "S1M": (("Mosquitto", 1883),),
}
"""The local brokers each scenario needs (S1 starts Mosquitto instances of its own when the
binary is there, and uses the shared one otherwise)."""

EXTRA_FIGURES: dict[str, tuple[str, ...]] = {
    "S1M": ("burst, one daemon (pinned), stock broker, MQTT sink (QoS 1): events/s delivered "
            "to a subscriber (PUBACK, outbox)",),
    "S3": ("two daemons x 5,000 variables: notifications/s into events",),
    "S4": ("CPU share, report by exception", "poll jitter p99, every reading an event"),
    "S5": ("GET /v1/points?device=…: requests/s",),
    "DISC": ("OPC-UA browse: seconds for every variable",
             "Modbus scan: seconds for every register"),
}
"""Figures beyond the targets' that each scenario must produce."""

SMOKE_LEAVES_OUT = {f"{S1_WORKERS}: lost at the broker"}
"""Targets of layouts a smoke run does not run (S1 runs its pinned and its all-workers
layouts only)."""


def expected_figures(key: str) -> set[str]:
    """The figure names scenario ``key`` must produce in smoke mode."""
    names = {goal.name for goal in GOALS if goal.key == key} - SMOKE_LEAVES_OUT
    return names | set(EXTRA_FIGURES.get(key, ()))


def reachable(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def marked_processes(marker: str) -> list[int]:
    """Live processes (not zombies) whose environment carries ``marker``."""
    found = []
    needle = f"FIELDBRIDGE_BENCH_SMOKE={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                found.append(int(entry.name))
    return found


def run_marked(name: str, *arguments: str, check: bool = True,
               env: dict[str, str] | None = None) -> str:
    """Run ``python -m <arguments>`` from the repository root; its console output. Fails the
    test if it hangs, leaves a process behind or (``check``) exits with an error."""
    marker = uuid.uuid4().hex
    process = subprocess.Popen(
        [sys.executable, "-m", *arguments], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, **(env or {}), "FIELDBRIDGE_BENCH_SMOKE": marker})
    try:
        console, _ = process.communicate(timeout=SCENARIO_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        console, _ = process.communicate()
        pytest.fail(f"{name} did not finish within {SCENARIO_SECONDS} s:\n{console[-4000:]}")
    finally:
        left = marked_processes(marker)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"{name} left processes behind: {left}"
    if check:
        assert process.returncode == 0, (
            f"{name} exited with {process.returncode}:\n{console[-4000:]}")
    return console


def run_smoke(key: str, output: Path) -> tuple[dict[str, Any], str]:
    """Run scenario ``key`` in smoke mode; its stored result and the run's console output (a
    scenario that fails is stored as failed, and the run exits with 1)."""
    console = run_marked(key, "bench", "--smoke", "--only", key, "--output", str(output),
                         check=False)
    results_path = output / "results.json"
    assert results_path.exists(), f"{key} wrote no results:\n{console[-4000:]}"
    results = json.loads(results_path.read_text())["results"]
    assert [result["key"] for result in results] == [key]
    return results[0], console


@pytest.mark.parametrize("key", [
    pytest.param(key, marks=[pytest.mark.broker] if key in BROKERS else [])
    for key in SCENARIOS
])
def test_scenario_runs_in_smoke_mode(key: str, tmp_path: Path) -> None:
    """The scenario runs to the end and reports finite figures, its targets' among them."""
    for name, port in BROKERS.get(key, ()):
        if not reachable(port):
            pytest.skip(f"{name} is not reachable on 127.0.0.1:{port}")
    result, console = run_smoke(key, tmp_path)
    if result["status"] == "skipped":
        pytest.skip(f"{key} skipped itself: {result['reason']}")
    assert result["status"] == "ok", f"{key}: {result['reason']}\n{console[-4000:]}"
    figures = {figure["name"]: figure["value"] for figure in result["figures"]}
    assert figures, f"{key} reported no figures"
    missing = expected_figures(key) - set(figures)
    assert not missing, f"{key} did not report {sorted(missing)}"
    for figure in result["figures"] + result["baselines"]:
        value = figure["value"]
        assert isinstance(value, int | float), f"{key}: {figure['name']} = {value!r}"
        assert math.isfinite(value), f"{key}: {figure['name']} = {value!r}"
    assert (tmp_path / "RESULTS.md").read_text().startswith("# Fieldbridge benchmark results")


def test_smoke_output_stays_out_of_the_results_folder(tmp_path: Path) -> None:
    """``--smoke`` without ``--output`` writes to a new temporary directory, never to
    bench/results/ (whose files are the last full run's)."""
    results = ROOT / "bench" / "results"
    before = {path: path.stat().st_mtime_ns for path in results.rglob("*") if path.is_file()}
    run_marked("DISC", "bench", "--smoke", "--only", "DISC", env={"TMPDIR": str(tmp_path)})
    after = {path: path.stat().st_mtime_ns for path in results.rglob("*") if path.is_file()}
    assert after == before
    written = list(tmp_path.glob("fieldbridge-bench-smoke-*/results.json"))
    assert len(written) == 1, list(tmp_path.iterdir())
    assert "DISC" in written[0].read_text()


def test_store_outbox_experiment_runs() -> None:
    """The store → outbox → AMQP sink experiment (no broker: a fake connection) still runs
    and publishes every event."""
    console = run_marked("store_outbox", "bench.experiments.store_outbox.run", "--events", "500")
    figures = {name.strip(): value
               for name, value in re.findall(r"([a-z0-9/ ]+)=(\S+)", console.splitlines()[-1])}
    assert {"events/s", "cpu us/event", "p50 ms", "p99 ms"} <= set(figures), console
    assert all(math.isfinite(float(value.replace(",", ""))) for value in figures.values())


@pytest.mark.broker
def test_latency_stages_experiment_times_every_stage() -> None:
    """S1's paced run timed by stage, at a small rate: every stage's hook still sees events
    (a hook on a method the flow no longer calls would time nothing)."""
    for name, port in BROKERS["S1"]:
        if not reachable(port):
            pytest.skip(f"{name} is not reachable on 127.0.0.1:{port}")
    console = run_marked("latency_stages", "bench.experiments.latency_stages.run",
                         "--rate", "100", "--seconds", "1")
    counts = {line.split(" p50")[0].strip(): int(line.rsplit("(", 1)[1].rstrip(")"))
              for line in console.splitlines() if line.rstrip().endswith(")")}
    assert set(counts) == {"received -> handed to the router", "received -> stored",
                           "store write (one batch)", "stored -> published to RabbitMQ"}, console
    assert all(counts.values()), counts
