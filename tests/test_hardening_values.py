"""Oversized values and declared types (issue "Hardening", measured item 9).

A 10 MB JSON string in an MQTT payload became a `good` event, stored and published; and a
number sent as text (`"21.5"`) could not be declared numeric. A payload point now declares
`type:` and every source bounds a string value with `max_value_bytes`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_payload import config_error, mapper_for, reading

from bridge.core.model import Quality


def _one(tmp_path: Path, payload: Any, point: dict[str, Any], **source: Any) -> Any:
    mapper = mapper_for(tmp_path, [{"name": "t", "topic": "s/t", **point}], **source)
    (event,) = mapper.map(reading("s/t", payload if isinstance(payload, bytes | str)
                                  else json.dumps(payload)))
    return event


def test_a_string_past_max_value_bytes_is_a_bad_event_without_the_value(
    tmp_path: Path
) -> None:
    big = "x" * 10_000_000
    event = _one(tmp_path, {"v": big}, {"path": "v"})
    assert event.quality is Quality.BAD
    assert event.value is None
    assert event.reason == ("a string of 10,000,000 bytes is larger than max_value_bytes "
                            "(65,536)")
    assert len(event.to_json()) < 1_000  # what is stored and published


def test_max_value_bytes_is_set_per_source_and_counts_utf8_bytes(tmp_path: Path) -> None:
    event = _one(tmp_path, "é" * 600, {"format": "text"}, max_value_bytes="1KiB")
    assert event.quality is Quality.BAD
    assert event.reason == "a string of 1,200 bytes is larger than max_value_bytes (1,024)"
    event = _one(tmp_path, "é" * 500, {"format": "text"}, max_value_bytes="1KiB")
    assert event.quality is Quality.GOOD
    assert event.value == "é" * 500


@pytest.mark.parametrize(("declared", "raw", "expected"), [
    ("number", "21.5", 21.5),
    ("number", 21.5, 21.5),
    ("number", " 7 ", 7),
    ("integer", "42", 42),
    ("integer", 42.0, 42),
    ("bool", "on", True),
    ("bool", 0, False),
    ("bool", "False", False),
    ("string", 21.5, "21.5"),
    ("string", True, "true"),
])
def test_a_declared_type_converts_what_it_can(
    tmp_path: Path, declared: str, raw: Any, expected: Any
) -> None:
    event = _one(tmp_path, {"v": raw}, {"path": "v", "type": declared})
    assert event.quality is Quality.GOOD, event.reason
    assert event.value == expected
    assert type(event.value) is type(expected)


@pytest.mark.parametrize(("declared", "raw", "reason"), [
    ("number", "abc", "expected a number, got \"'abc'\""),
    ("number", True, "expected a number, got 'True'"),
    ("integer", "21.5", "expected an integer, got \"'21.5'\""),
    ("bool", "maybe", "expected a bool, got \"'maybe'\""),
    ("number", "nan", "expected a finite number, got \"'nan'\""),
])
def test_a_value_that_is_not_the_declared_type_is_bad_with_the_reason(
    tmp_path: Path, declared: str, raw: Any, reason: str
) -> None:
    event = _one(tmp_path, {"v": raw}, {"path": "v", "type": declared})
    assert event.quality is Quality.BAD
    assert event.value is None
    assert event.reason == reason


def test_a_text_point_declared_number(tmp_path: Path) -> None:
    assert _one(tmp_path, "21.5", {"format": "text", "type": "number"}).value == 21.5
    assert _one(tmp_path, "abc", {"format": "text", "type": "number"}).quality is Quality.BAD


def test_declared_types_and_register_types_do_not_mix(tmp_path: Path) -> None:
    assert "`type: float32` applies to binary payloads" in config_error(
        tmp_path, [{"name": "t", "topic": "s/t", "type": "float32"}])
    assert "`type: number` is for json and text payloads" in config_error(
        tmp_path, [{"name": "t", "topic": "s/t", "format": "binary", "type": "number"}])
