"""What a scenario reports: figures with their targets, baselines from the same run, notes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

RESULTS = Path(__file__).resolve().parent / "results"
"""Where a run writes RESULTS.md, results.json, the chart and the profiles: generated output,
apart from the code (``--output`` and ``--smoke`` write elsewhere)."""


@dataclass
class Figure:
    """One measured number, with the target it is held against (if any)."""

    name: str
    value: float | None
    unit: str
    target: str | None = None
    """Human-readable target, e.g. ``>= 20000``."""
    met: bool | None = None
    """Whether the target is reached; ``None`` when there is no target or no value."""
    note: str = ""

    def text(self) -> str:
        """The value formatted for a table."""
        return format_value(self.value, self.unit)


def format_value(value: float | None, unit: str) -> str:
    """A number with a sensible precision and its unit."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def at_least(name: str, value: float | None, unit: str, floor: float, note: str = "") -> Figure:
    """A figure whose target is a minimum."""
    met = None if value is None or math.isnan(value) else value >= floor
    return Figure(name, value, unit, f">= {format_value(floor, unit)}", met, note)


def at_most(name: str, value: float | None, unit: str, ceiling: float, note: str = "",
            strict: bool = True) -> Figure:
    """A figure whose target is a maximum (``strict``: below it)."""
    met = None
    if value is not None and not math.isnan(value):
        met = value < ceiling if strict else value <= ceiling
    sign = "<" if strict else "<="
    return Figure(name, value, unit, f"{sign} {format_value(ceiling, unit)}", met, note)


def exactly(name: str, value: float | None, unit: str, wanted: float, note: str = "",
            tolerance: float = 1e-9) -> Figure:
    """A figure whose target is one value (within ``tolerance``: counters read at two
    moments may straddle a cycle)."""
    met = None if value is None or math.isnan(value) else abs(value - wanted) <= tolerance
    return Figure(name, value, unit, f"= {format_value(wanted, unit)}", met, note)


Direction = Literal["at_least", "at_most", "below", "equal"]


@dataclass(frozen=True)
class Goal:
    """A number to reach, held against one figure of one scenario.

    The bound is written here once: scenarios build the figure from it (``Goal.figure``), and
    the report judges a stored figure by it again (``Goal.judge``), so RESULTS.md always holds
    each value against today's target, even when made from an older ``results.json``.
    """

    key: str
    """The scenario: ``S1`` .. ``S5``, ``IDLE``."""
    name: str
    """The figure's name in that scenario."""
    direction: Direction
    bound: float | None
    """``None``: the bound comes from the same run (a baseline), passed to ``figure()``."""
    unit: str
    text: str
    """The number to reach, as the issue states it."""

    def figure(self, value: float | None, note: str = "", bound: float | None = None,
               target: str | None = None) -> Figure:
        """The figure for ``value``, with this goal's target (or ``bound`` from the run)."""
        wanted = self.bound if bound is None else bound
        if wanted is None:
            return Figure(self.name, value, self.unit, target or self.text, None, note)
        if self.direction == "at_least":
            made = at_least(self.name, value, self.unit, wanted, note)
        elif self.direction == "equal":
            made = exactly(self.name, value, self.unit, wanted, note)
        else:
            made = at_most(self.name, value, self.unit, wanted, note,
                           strict=self.direction == "below")
        if target is not None:
            made.target = target
        return made

    def judge(self, figure: Figure) -> Figure:
        """``figure`` held against this goal's fixed bound (unchanged when the bound is set
        in the run)."""
        if self.bound is None:
            return figure
        judged = self.figure(figure.value, figure.note)
        return Figure(figure.name, figure.value, figure.unit, judged.target, judged.met,
                      figure.note)


S1_BURST = "burst, one daemon (pinned), stock broker"
S1_PACED = "paced 2,000 msg/s, one daemon (pinned)"
S1_WORKERS = "burst, workers: 2 (unpinned), stock broker"

GOALS: tuple[Goal, ...] = (
    Goal("S1", f"{S1_BURST}: events/s delivered into RabbitMQ (confirms, outbox)",
         "at_least", 15_000, "events/s",
         "S1 burst: at least 15,000 events/s delivered into RabbitMQ"),
    Goal("S1", f"{S1_BURST}: CPU s per 10,000 messages", "at_most", 1.0, "s",
         "S1 burst: at most 1.0 CPU s per 10,000 messages"),
    Goal("S1", f"{S1_BURST}: lost at the broker", "at_most", None, "%",
         "S1 burst: loss at the stock broker no worse than aiomqtt alone in the same run"),
    Goal("S1", f"{S1_WORKERS}: lost at the broker", "equal", 0, "%",
         "S1 burst with `workers: 2`: 0 lost"),
    Goal("S1", f"{S1_PACED}: latency p50 (payload ts to consumer)", "below", 2, "ms",
         "S1 paced, 2,000 msg/s: p50 under 2 ms"),
    Goal("S1", f"{S1_PACED}: latency p99 (payload ts to consumer)", "below", 10, "ms",
         "S1 paced, 2,000 msg/s: p99 under 10 ms"),
    Goal("S1", f"{S1_PACED}: CPU s per 10,000 messages", "at_most", 1.6, "s",
         "S1 paced, 2,000 msg/s: at most 1.6 CPU s per 10,000 messages into RabbitMQ"),
    Goal("S2", "complete cycles/s, RBE off", "at_least", 50, "cycles/s",
         "S2, every value stored: at least 50 cycles/s"),
    Goal("S2", "events/s, RBE off", "at_least", 75_000, "events/s",
         "S2, every value stored: 75,000 events/s"),
    Goal("S4", "CPU share, every reading an event", "below", 35, "% of a core",
         "S4, every reading an event: under 35 % of a core"),
    Goal("S2", "complete cycles/s, RBE on", "at_least", 100, "cycles/s",
         "S2 with report-by-exception: at least 100 cycles/s"),
    Goal("S3", "notifications/s turned into events", "at_least", 20_000, "events/s",
         "S3: at least 20,000/s"),
    Goal("S5", "GET /v1/points/{id}: requests/s", "at_least", 3000, "req/s",
         "S5: at least 3,000 req/s"),
    Goal("S5", "GET /v1/points/{id}: p99 latency", "below", 20, "ms",
         "S5: p99 under 20 ms"),
    Goal("IDLE", "RSS idle, 10,000 points with values", "below", 150, "MB",
         "idle under 150 MB"),
    Goal("IDLE", "time to ready, first start (empty store)", "below", 3.0, "s",
         "ready in under 3 s"),
    Goal("IDLE", "time to ready, restart (10,000 stored values)", "below", 3.0, "s",
         "ready in under 3 s"),
)
"""Issue #11's "Numbers to reach", in its order: one daemon on one core, default
``store.sync``."""


def goal(key: str, name: str) -> Goal:
    """The goal of figure ``name`` of scenario ``key``."""
    for candidate in GOALS:
        if candidate.key == key and candidate.name == name:
            return candidate
    raise KeyError(f"no goal for {key} {name!r}")


Status = Literal["ok", "skipped", "failed"]


@dataclass
class Table:
    """A small table for RESULTS.md: a title, a header row, rows of cells (text)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class ScenarioResult:
    """Everything one scenario measured."""

    key: str
    """``S1`` .. ``S5``, ``IDLE``."""
    title: str
    status: Status = "ok"
    reason: str = ""
    """Why it was skipped or failed."""
    figures: list[Figure] = field(default_factory=list)
    baselines: list[Figure] = field(default_factory=list)
    """Measured in the same run, for ratios: the broker alone, the protocol library alone."""
    notes: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    """Paths (relative to bench/) of py-spy profiles taken where a target was missed."""
    seconds: float = 0.0
    """Wall time the scenario took."""
    chart: dict[str, float] = field(default_factory=dict)
    """Figure name to achieved/target ratio (1.0 = target reached), for the chart."""
    tables: list[Table] = field(default_factory=list)
    """Side-by-side comparisons (the daemon beside a library alone, say)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ScenarioResult:
        """Back from ``to_dict``."""
        data = dict(data)
        data["figures"] = [Figure(**item) for item in data.get("figures", [])]
        data["baselines"] = [Figure(**item) for item in data.get("baselines", [])]
        data["tables"] = [Table(**item) for item in data.get("tables", [])]
        return ScenarioResult(**data)

    def judged(self) -> ScenarioResult:
        """A copy whose figures are held against today's goals (see ``Goal.judge``)."""
        by_name = {item.name: item for item in GOALS if item.key == self.key}
        figures = [by_name[figure.name].judge(figure) if figure.name in by_name else figure
                   for figure in self.figures]
        return ScenarioResult(**{**self.__dict__, "figures": figures})


@dataclass
class Options:
    """How a scenario runs."""

    quick: bool = False
    """Shorter runs and smaller loads: figures not to quote."""
    smoke: bool = False
    """Tiny loads and windows of a fraction of a second: every code path of the scenario runs
    in seconds, for the test suite; the figures mean nothing. Implies ``quick``, no profiles
    and no pinning."""
    profile: bool = True
    """Take a py-spy profile of the daemon where a target is missed."""
    out_dir: Path = RESULTS / "profiles"
    """Where profiles go."""
    pin: bool = True
    """Pin single-daemon layouts (and the baselines they are compared with) to one core and
    everything else to the other, with ``taskset``."""
    messages: int | None = None
    """S1's burst size, overriding the default (100,000; 30,000 with ``quick``)."""

    def __post_init__(self) -> None:
        if self.smoke:
            self.quick, self.profile, self.pin = True, False, False

    def seconds(self, full: float, quick: float, smoke: float | None = None) -> float:
        """A duration for this mode (``smoke``: the smoke run's, else the quick one's)."""
        if self.smoke and smoke is not None:
            return smoke
        return quick if self.quick else full

    def size(self, full: int, quick: int, smoke: int) -> int:
        """A count (messages, variables, devices) for this mode."""
        if self.smoke:
            return smoke
        return quick if self.quick else full
