"""``python -m bench``: run the scenarios, print the table, write RESULTS.md and the chart
(into bench/results/, or a temporary directory for a smoke run)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.figures import RESULTS, Options, ScenarioResult
from bench.report import console_table, machine, markdown, write_chart, write_json

SCENARIOS: dict[str, tuple[str, str]] = {
    "S1": ("bench.scenarios.s1_mqtt_rabbitmq", "MQTT → RabbitMQ"),
    "S1M": ("bench.scenarios.s1m_mqtt_mqtt", "MQTT → MQTT sink"),
    "S2": ("bench.scenarios.s2_modbus", "Modbus polling"),
    "S3": ("bench.scenarios.s3_opcua", "OPC-UA subscription"),
    "S4": ("bench.scenarios.s4_many_devices", "many Modbus devices"),
    "S5": ("bench.scenarios.s5_rest", "REST API"),
    "S7": ("bench.scenarios.s7", "Siemens S7 polling"),
    "IDLE": ("bench.scenarios.idle", "idle footprint and start-up"),
    "DISC": ("bench.scenarios.discovery", "discovery: OPC-UA browse, Modbus scan"),
    "LOGIX": ("bench.scenarios.logix", "Logix (EtherNet/IP) polling"),
}
"""Scenario key to (module, title); each module has ``run(options) -> ScenarioResult``."""


def run_scenario(key: str, options: Options) -> ScenarioResult:
    """Run scenario ``key`` (a key of ``SCENARIOS``) and return what it measured; an error in
    the scenario propagates."""
    module = importlib.import_module(SCENARIOS[key][0])
    runner: Callable[[Options], ScenarioResult] = module.run
    return runner(options)


def _run_one(key: str, options: Options) -> ScenarioResult:
    title = SCENARIOS[key][1]
    started = time.monotonic()
    try:
        result = run_scenario(key, options)
    except Exception as exc:  # a broken scenario is reported, the others still run
        traceback.print_exc()
        result = ScenarioResult(key, title, status="failed",
                                reason=f"{type(exc).__name__}: {exc}")
    result.seconds = result.seconds or time.monotonic() - started
    return result


def _merge(previous: Path, fresh: Sequence[ScenarioResult]) -> list[ScenarioResult]:
    """With ``--only``: keep the other scenarios' last results from results.json."""
    by_key: dict[str, ScenarioResult] = {}
    try:
        data = json.loads(previous.read_text())
        for item in data.get("results", []):
            old = ScenarioResult.from_dict(item)
            by_key[old.key] = old
    except (OSError, ValueError, TypeError):
        pass
    for result in fresh:
        by_key[result.key] = result
    return [by_key[key] for key in SCENARIOS if key in by_key]


def _report_only(output: Path) -> int:
    data = json.loads((output / "results.json").read_text())
    results = [ScenarioResult.from_dict(item) for item in data["results"]]
    chart = output / "results.png"
    has_chart = write_chart(results, chart)
    command = data.get("command", "python -m bench")
    (output / "RESULTS.md").write_text(markdown(results, data["machine"], command,
                                                chart.name if has_chart else None,
                                                data.get("quick", False), output))
    print(console_table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; the exit status is 0 unless a scenario failed to run (missed targets are
    results, not failures)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="short runs and smaller loads (about 4 minutes; figures not to quote)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny loads, windows of a fraction of a second, no pinning, no "
                        "profiles: checks that every scenario still runs (seconds, figures "
                        "meaningless); writes to a temporary directory unless --output is given")
    parser.add_argument("--only", action="append", default=[], metavar="S2",
                        help="run only these scenarios (repeatable or comma-separated): "
                        + ", ".join(SCENARIOS))
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the py-spy profiles taken where a target is missed")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the one-daemon layouts and their baselines to one core "
                        "(taskset); on a machine with fewer than 2 cores they are never pinned")
    parser.add_argument("--messages", type=int, metavar="N",
                        help="S1's burst size (default 100,000; 30,000 with --quick); "
                        "the paced runs scale down with --quick only")
    parser.add_argument("--output", type=Path, default=None,
                        help="where RESULTS.md, results.json and results.png go (default "
                        "bench/results/; with --smoke a new temporary directory)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write RESULTS.md and the chart again from "
                        "results.json (after editing analysis.md, say)")
    arguments = parser.parse_args(argv)
    if arguments.report_only:
        return _report_only(arguments.output or RESULTS)
    selected = [key.strip().upper() for item in arguments.only for key in item.split(",")
                if key.strip()] or list(SCENARIOS)
    unknown = [key for key in selected if key not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    output: Path = arguments.output or (
        Path(tempfile.mkdtemp(prefix="fieldbridge-bench-smoke-")) if arguments.smoke
        else RESULTS)
    output.mkdir(parents=True, exist_ok=True)
    options = Options(quick=arguments.quick, smoke=arguments.smoke,
                      profile=not arguments.no_profile, out_dir=output / "profiles",
                      pin=not arguments.no_pin, messages=arguments.messages)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"fieldbridge bench on {info['cpu']} ({info['cores']} cores), load "
          f"{info['load_average_at_start']}, {info['date']}", flush=True)
    results = []
    for key in selected:
        print(f"\n== {key}: {SCENARIOS[key][1]}", flush=True)
        result = _run_one(key, options)
        results.append(result)
        print(console_table([result]), flush=True)
    all_results = _merge(output / "results.json", results) if arguments.only else results
    chart = output / "results.png"
    has_chart = write_chart(all_results, chart)
    command = "python -m bench" + (" --smoke" if arguments.smoke else "") + (
        " --quick" if arguments.quick else "") + (
        " --no-pin" if arguments.no_pin else "") + (
        f" --messages {arguments.messages}" if arguments.messages else "") + "".join(
        f" --only {key}" for key in selected if arguments.only)
    write_json(all_results, info, output / "results.json", command, options.quick)
    (output / "RESULTS.md").write_text(markdown(all_results, info, command,
                                                chart.name if has_chart else None,
                                                options.quick, output))
    print("\n" + console_table(all_results))
    print(f"\nwrote {output / 'RESULTS.md'}" + (f" and {chart}" if has_chart else
                                                 " (no chart: matplotlib is not installed)"))
    return 1 if any(result.status == "failed" for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
