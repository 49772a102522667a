"""What a scenario reports: figures with their targets, baselines from the same run, notes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal


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


Status = Literal["ok", "skipped", "failed"]


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ScenarioResult:
        """Back from ``to_dict``."""
        data = dict(data)
        data["figures"] = [Figure(**item) for item in data.get("figures", [])]
        data["baselines"] = [Figure(**item) for item in data.get("baselines", [])]
        return ScenarioResult(**data)


@dataclass
class Options:
    """How a scenario runs."""

    quick: bool = False
    """Shorter runs and smaller loads: a smoke run, not figures to quote."""
    profile: bool = True
    """Take a py-spy profile of the daemon where a target is missed."""
    out_dir: Path = Path(__file__).resolve().parent / "profiles"
    """Where profiles go."""

    def seconds(self, full: float, quick: float) -> float:
        """A duration for this mode."""
        return quick if self.quick else full
