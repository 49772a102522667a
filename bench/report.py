"""The machine and versions, the console table, RESULTS.md and the chart (in bench/results/)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.figures import GOALS, RESULTS, Figure, ScenarioResult

BENCH = Path(__file__).resolve().parent

PACKAGES = ("fieldbridge", "pymodbus", "asyncua", "aiomqtt", "paho-mqtt", "pika", "fastapi",
            "uvicorn", "pydantic", "matplotlib", "py-spy")


def _command_output(*command: str) -> str:
    if shutil.which(command[0]) is None:
        return "not installed"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout + done.stderr).strip()


def machine() -> dict[str, Any]:
    """What the figures were measured on, and when."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        total_kib = int(f.readline().split()[1])
        memory = f"{total_kib / 1024 / 1024:.1f} GiB"
    os_name = platform.platform()
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    mosquitto = _command_output("mosquitto", "-h").splitlines()
    versions["mosquitto"] = next(
        (match.group(1) for line in mosquitto if (match := re.search(r"version (\S+)", line))),
        "unknown")
    rabbitmq = _command_output("rabbitmqctl", "version")
    versions["rabbitmq-server"] = rabbitmq.splitlines()[-1] if rabbitmq else "unknown"
    wrk = _command_output("wrk", "--version").splitlines()
    versions["wrk"] = wrk[0].split()[1] if wrk and wrk[0].startswith("wrk ") else (
        wrk[0] if wrk else "unknown")
    commit = _command_output("git", "-C", str(BENCH.parent), "rev-parse", "--short", "HEAD")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": " ".join(f"{value:.2f}" for value in os.getloadavg()),
        "commit": commit,
        "versions": versions,
    }


def _verdict(figure: Figure) -> str:
    if figure.met is None:
        return "" if figure.target is None else "n/a"
    return "met" if figure.met else "MISSED"


def console_table(results: Sequence[ScenarioResult]) -> str:
    """The plain-text table printed at the end of a run."""
    rows = [("scenario", "figure", "value", "target", "")]
    for result in (item.judged() for item in results):
        if result.status != "ok":
            rows.append((result.key, f"{result.status}: {result.reason}", "", "", ""))
            continue
        for figure in result.figures:
            rows.append((result.key, figure.name, figure.text(), figure.target or "",
                         _verdict(figure)))
        for figure in result.baselines:
            rows.append((result.key, f"[baseline] {figure.name}", figure.text(), "", ""))
    widths = [min(70, max(len(row[column]) for row in rows)) for column in range(5)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell[:70].ljust(width) for cell, width in zip(row, widths,
                                                                            strict=True)))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def goals_table(results: Sequence[ScenarioResult]) -> list[str]:
    """Every number to reach of issue #11, in its order, beside the figure that answers it."""
    found = {(result.key, figure.name): (result, figure) for result in results
             for figure in result.figures}
    out = ["## Numbers to reach", "",
           "Issue #11's targets, in its order, each beside the figure measured for it (one "
           "daemon on one core, default `store.sync`, unless the figure says otherwise). "
           "Generated from the figures below; \"not measured\" means this run did not produce "
           "the figure.", "",
           "| number to reach | scenario | figure | value | target | |",
           "|---|---|---|---|---|---|"]
    for item in GOALS:
        result, figure = found.get((item.key, item.name), (None, None))
        if result is None or figure is None:
            out.append(f"| {_cell(item.text)} | {item.key} | {_cell(item.name)} | | | "
                       "not measured |")
            continue
        shown = "**MISSED**" if _verdict(figure) == "MISSED" else _verdict(figure)
        out.append(f"| {_cell(item.text)} | {item.key} | {_cell(item.name)} | "
                   f"{figure.text()} | {_cell(figure.target or '')} | {shown} |")
    out.append("")
    return out


def markdown(results: Sequence[ScenarioResult], info: dict[str, Any], command: str,
             chart: str | None, quick: bool, output: Path = RESULTS) -> str:
    """bench/results/RESULTS.md (``output``: the folder it goes to, with the analysis, the
    experiments' tables and the profiles it includes)."""
    results = [result.judged() for result in results]
    out = ["# Fieldbridge benchmark results", ""]
    out.append(f"Generated by `{command}` on {info['date']} (commit `{info['commit']}`)."
               + (" **Quick run: smoke figures, not for quoting.**" if quick else ""))
    out += ["", "Benchmarks, not tests: nothing here is asserted. Figures are from one run on a "
            "shared, noisy 2-core machine; CPU seconds and peak RSS are read from `/proc` of the "
            "daemon process (and its worker processes), and each scenario carries baselines "
            "measured in the same run so ratios stay meaningful when the machine is busy.", ""]
    out += ["## Machine", "", "| | |", "|---|---|"]
    for key in ("cpu", "cores", "memory", "os", "kernel", "python", "load_average_at_start"):
        out.append(f"| {key.replace('_', ' ')} | {_cell(str(info[key]))} |")
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    out += [f"| versions | {_cell(versions)} |", ""]
    if chart:
        out += ["## Targets at a glance", "",
                f"![achieved / target per figure]({chart})", "",
                "Each bar is the achieved figure divided by its target (for a ceiling such as "
                "latency or CPU, the target divided by the achieved figure), so 1.0 or more "
                "means the target is reached.", ""]
    out += goals_table(results)
    out += ["## Summary", "", "Every figure with a target, the numbers to reach above and those "
            "of earlier work that still hold.", "",
            "| scenario | figure | value | target | |", "|---|---|---|---|---|"]
    for result in results:
        if result.status != "ok":
            out.append(f"| {result.key} | **{result.status}**: {_cell(result.reason)} | | | |")
            continue
        for figure in result.figures:
            if figure.target is None:
                continue
            verdict = _verdict(figure)
            shown = "**MISSED**" if verdict == "MISSED" else verdict
            out.append(f"| {result.key} | {_cell(figure.name)} | {figure.text()} | "
                       f"{_cell(figure.target)} | {shown} |")
    out.append("")
    analysis = output / "analysis.md"
    if analysis.exists():
        out += [analysis.read_text().rstrip(), ""]
    # Experiments that write a table of their own (results.md beside their code) appear
    # after the analysis, as their last run left them.
    for experiment in sorted((output / "experiments").glob("*/results.md")):
        out += [experiment.read_text().rstrip(), ""]
    for result in results:
        out += [f"## {result.key}: {result.title}", ""]
        if result.status != "ok":
            out += [f"**{result.status}**: {result.reason}", ""]
        if result.figures:
            out += ["| figure | value | target | | note |", "|---|---|---|---|---|"]
            for figure in result.figures:
                out.append(f"| {_cell(figure.name)} | {figure.text()} | "
                           f"{_cell(figure.target or '')} | {_verdict(figure)} | "
                           f"{_cell(figure.note)} |")
            out.append("")
        for table in result.tables:
            out += [f"**{_cell(table.title)}**", "",
                    "| " + " | ".join(_cell(cell) for cell in table.header) + " |",
                    "|" + "---|" * len(table.header)]
            out += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in table.rows]
            out.append("")
            if table.note:
                out += [table.note, ""]
        if result.baselines:
            out += ["Baselines and ratios, same run:", "", "| baseline | value | note |",
                    "|---|---|---|"]
            for figure in result.baselines:
                out.append(f"| {_cell(figure.name)} | {figure.text()} | {_cell(figure.note)} |")
            out.append("")
        for note in result.notes:
            out += [f"- {note}"]
        if result.notes:
            out.append("")
        for profile in result.profiles:
            out += [f"Profile (py-spy): [{profile}]({profile})", ""]
            with contextlib.suppress(OSError):
                text = (output / profile).read_text().splitlines()
                out += ["```", *text[:32], "```", ""]
        if result.seconds:
            out += [f"_Scenario wall time: {result.seconds:.0f} s._", ""]
    return "\n".join(out) + "\n"


def write_chart(results: Sequence[ScenarioResult], path: Path) -> bool:
    """A horizontal bar chart of achieved/target per figure; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bars = [(label, ratio) for result in results if result.status == "ok"
            for label, ratio in result.chart.items()]
    if not bars:
        return False
    bars.reverse()
    labels = [label for label, _ in bars]
    ratios = [min(ratio, 5.0) for _, ratio in bars]
    colours = ["#2e7d32" if ratio >= 1.0 else "#c62828" for _, ratio in bars]
    figure, axis = plt.subplots(figsize=(9, 0.42 * len(bars) + 1.6), dpi=110)
    axis.barh(labels, ratios, color=colours)
    axis.axvline(1.0, color="black", linewidth=1, linestyle="--")
    for index, (_, ratio) in enumerate(bars):
        axis.text(min(ratio, 5.0) + 0.03, index, f"{ratio:.2f}x", va="center", fontsize=9)
    axis.set_xlabel("achieved / target (≥ 1 reaches the target; capped at 5)")
    axis.set_xlim(0, max(1.3, max(ratios) + 0.5))
    axis.set_title("Fieldbridge benchmarks: figures against their targets")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def write_json(results: Sequence[ScenarioResult], info: dict[str, Any], path: Path,
               command: str = "python -m bench", quick: bool = False) -> None:
    """The raw results, for comparing runs (and for ``--report-only``)."""
    path.write_text(json.dumps({"machine": info, "command": command, "quick": quick,
                                "results": [result.to_dict() for result in results]},
                               indent=1, default=str) + "\n")
