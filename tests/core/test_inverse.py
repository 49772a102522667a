"""The inverse transform every writing protocol uses: values, refusals and their messages."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config.models import PointBase
from bridge.core.inverse import RawKind, compile_inverse_transform
from bridge.core.mapping import compile_transform
from bridge.errors import DecodeError, ErrorCategory, WriteError

SCALED = {"scale": 0.1, "offset": -40}
LABELLED = {"enum": {0: "standby", 1: "heating", "-1": "fault"}}


def invert(spec: dict[str, Any], value: Any, raw: RawKind | None = None) -> Any:
    """The raw value written for ``value`` to a point declared as ``spec``."""
    point = PointBase.model_validate({"name": "p", **spec})
    return compile_inverse_transform("dev.p", point, raw=raw)(value)


@pytest.mark.parametrize(("spec", "value", "raw", "expected"), [
    ({}, 7, None, 7),
    ({}, "text", None, "text"),
    ({}, True, None, True),
    (SCALED, 25.5, "integer", 655),  # (25.5 + 40) / 0.1 is 654.999..., written as 655
    (SCALED, 25.5, "number", pytest.approx(655.0)),
    (SCALED, 25.5, None, pytest.approx(655.0)),
    (LABELLED, "heating", "integer", 1),
    (LABELLED, "fault", "integer", -1),
    ({}, 1, "bool", True),
    ({}, 0.0, "bool", False),
    ({}, False, "bool", False),
    ({}, 3.0, "integer", 3),
    ({}, "OK", "string", "OK"),
])
def test_values_written(spec: dict[str, Any], value: Any, raw: RawKind | None,
                        expected: Any) -> None:
    assert invert(spec, value, raw) == expected


@pytest.mark.parametrize(("spec", "value", "raw", "message"), [
    (LABELLED, "boost", None, "'boost' is not one of the point's labels: fault, heating, "
     "standby"),
    (LABELLED, 1, "integer", "1 is not one of the point's labels"),
    (SCALED, "warm", None, "expected a number, got 'warm' (the point is scaled)"),
    (SCALED, True, "number", "expected a number, got True (the point is scaled)"),
    ({}, float("nan"), None, "cannot write nan: not a finite number"),
    (SCALED, float("inf"), "number", "cannot write inf: not a finite number"),
    (SCALED, 25.55, "integer", "25.55 is finer than the point resolves (its raw value "
     "would be 655.5)"),
    ({}, 2, "bool", "expected true or false, got 2"),
    ({}, "on", "bool", "expected true or false, got 'on'"),
    ({}, "7", "integer", "expected a number, got '7'"),
    ({}, True, "number", "expected a number, got True"),
    ({}, 7, "string", "expected a string, got 7"),
])
def test_refusals_say_why(spec: dict[str, Any], value: Any, raw: RawKind | None,
                          message: str) -> None:
    with pytest.raises(WriteError) as refused:
        invert(spec, value, raw)
    assert refused.value.point == "dev.p"
    assert refused.value.category is ErrorCategory.CONFIG
    assert refused.value.reason.startswith(message)


@pytest.mark.parametrize("spec", [SCALED, {"scale": 0.5}, {"offset": 273.15}, LABELLED])
def test_the_inverse_undoes_the_transform(spec: dict[str, Any]) -> None:
    point = PointBase.model_validate({"name": "p", **spec})
    forward = compile_transform(point)
    for raw in (0, 1, 655):
        try:
            value = forward(raw)
        except DecodeError:  # an enum without this key: nothing to invert
            continue
        assert invert(spec, value, "integer") == raw
