"""The protocol-independent mapping: transforms and report-by-exception."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config.models import PointBase, ReportSpec, ResolvedPoint
from bridge.core.mapping import PointProgram
from bridge.core.model import Quality


def _program(report: dict[str, Any] | None = None, **spec: Any) -> PointProgram:
    point = ResolvedPoint(
        id="dev.p", source="src", device="dev",
        spec=PointBase.model_validate({"name": "p", **spec}),
        tags={"site": "a"}, report=ReportSpec.model_validate(report or {}), path=())
    return PointProgram(point, protocol="modbus", bridge_id="edge")


def _values(program: PointProgram, raws: list[Any], step: float = 1.0) -> list[Any]:
    out = []
    for index, raw in enumerate(raws):
        event = program.produce(raw, received_at=1000.0 + index * step)
        out.append(None if event is None else event.value)
    return out


def test_scale_offset_round() -> None:
    program = _program(scale=0.1, offset=-40, round=2, unit="degC")
    event = program.produce(655, received_at=1.0, ts=0.5)
    assert event is not None
    assert (event.value, event.unit, event.ts, event.received_at) == (25.5, "degC", 0.5, 1.0)
    assert event.tags == {"site": "a"}
    assert event.point == "dev.p"
    assert event.bridge == "edge"


def test_identity_keeps_integers_and_strings() -> None:
    program = _program()
    assert _values(program, [7, "text", True]) == [7, "text", True]


def test_enum_maps_and_rejects_unknown() -> None:
    program = _program(enum={0: "off", 1: "on"})
    assert _values(program, [1, 0, True]) == ["on", "off", "on"]
    event = program.produce(7, received_at=9.0)
    assert event is not None
    assert event.quality is Quality.BAD
    assert event.value is None
    assert event.reason == "value 7 is not in the enum map"


def test_scaling_a_string_is_bad_not_a_crash() -> None:
    event = _program(scale=2).produce("abc", received_at=1.0)
    assert event is not None
    assert event.quality is Quality.BAD
    assert "cannot scale" in (event.reason or "")


def test_non_finite_float_is_bad() -> None:
    event = _program(scale=2).produce(float("nan"), received_at=1.0)
    assert event is not None
    assert event.quality is Quality.BAD


def test_every_reading_by_default() -> None:
    assert _values(_program(), [1, 1, 1]) == [1, 1, 1]


def test_change_mode_suppresses_repeats() -> None:
    program = _program({"mode": "change"})
    assert _values(program, [1, 1, 2, 2, 1]) == [1, None, 2, None, 1]
    assert program.suppressed == 2


def test_absolute_deadband() -> None:
    program = _program({"deadband": 0.5})
    assert _values(program, [10.0, 10.3, 10.5, 10.6, 10.0]) == [10.0, None, None, 10.6, 10.0]


def test_percent_deadband() -> None:
    program = _program({"deadband_percent": 10})
    assert _values(program, [100.0, 109.0, 111.0, 101.0, 99.0]) == [100.0, None, 111.0, None, 99.0]


def test_heartbeat_republishes_unchanged_value() -> None:
    program = _program({"heartbeat": "5s"})
    values = _values(program, [1] * 12, step=1.0)
    assert values == [1, None, None, None, None, 1, None, None, None, None, 1, None]


def test_quality_change_always_reported() -> None:
    program = _program({"mode": "change"})
    assert program.produce(1, received_at=1.0) is not None
    bad = program.bad("device exception: illegal data address (2)", received_at=2.0)
    assert bad is not None
    assert bad.quality is Quality.BAD
    assert bad.value is None
    assert program.bad("again", received_at=3.0) is None
    recovered = program.produce(1, received_at=4.0)
    assert recovered is not None
    assert recovered.quality is Quality.GOOD


def test_report_spec_rejects_contradictions() -> None:
    with pytest.raises(ValueError, match="needs mode: change"):
        ReportSpec.model_validate({"mode": "always", "deadband": 1})
    with pytest.raises(ValueError, match="not both"):
        ReportSpec.model_validate({"deadband": 1, "deadband_percent": 2})


def test_report_spec_merge() -> None:
    base = ReportSpec.model_validate({"deadband": 1, "heartbeat": "1m"})
    merged = base.merged(ReportSpec.model_validate({"deadband": 0.1}))
    assert (merged.deadband, merged.heartbeat) == (0.1, 60.0)


def test_enum_and_scale_together_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="not both"):
        PointBase.model_validate({"name": "x", "enum": {0: "a"}, "scale": 2})


def test_event_ids_are_unique_and_time_ordered() -> None:
    program = _program()
    ids = [program.produce(index, received_at=float(index)).id  # type: ignore[union-attr]
           for index in range(200)]
    assert len(set(ids)) == 200
    assert ids == sorted(ids)
