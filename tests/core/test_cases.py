"""Mapping behaviour from data: every folder under ``tests/cases/`` is one case.

A case holds ``mapping.yaml`` (a configuration with one source, loaded as the daemon loads
it) and either

- ``input.yaml`` (the readings the source would publish) and ``expected.yaml`` (the events
  the mapping must produce from them, in order), or
- ``error.yaml`` (the configuration error it must be refused with: a message substring, the
  line, and optionally the key path and file).

Modbus input, one entry per block the source read::

    readings:
      - table: holding          # coil | discrete | input | holding
        start: 0                # 0-based offset of the block
        registers: [0x42F6, 0xE979]   # or `bits: [true, false]` for coil/discrete blocks
        device: meter           # default: the source's only device
        at: 10.5                # received_at in seconds (default: the entry's index)
        quality: bad            # a failed read, with `reason` and `count` instead of values
        count: 3                # the block's size; default the number of values

MQTT input, one entry per message (``json`` is encoded as JSON, ``payload`` is sent as text,
``hex:...`` as bytes)::

    readings:
      - {topic: sensors/north/b1/telemetry, json: {temp: 21.5}, at: 3}

AMQP input: ``routing_key`` instead of ``topic``, with an optional ``timestamp`` (POSIX seconds)
and ``message_id``. OPC-UA input, one entry per data change: ``node`` (as the point names it),
``value``, and optionally ``quality``, ``reason`` and ``ts``. S7 input, one entry per block
the source read: ``area`` (DB, M, I, Q, T, C), ``db``, ``start`` and the block's bytes as
``hex``; or ``quality: bad`` with ``reason`` and ``count``.
BACnet input, one entry per
property read: ``device``, ``object``, ``property`` (default ``present-value``), ``value``, and
optionally ``quality``, ``reason``, ``unit`` (what the object's ``units`` gave) and
``state_text``.

Expected events::

    events:
      - point: meter.voltage
        value: 123.456          # floats compare to 1e-6 relative
        quality: good           # default good
        unit: V                 # checked when given
        reason: timeout         # a substring of the event's reason, checked when given
        ts: "2026-01-01T00:00:00Z"   # the source time, checked when given
      - rejected: invalid JSON  # the reading is refused (DecodeError) with this in its message
        at: 10.5                # received_at, checked when given

Name a regression case after the bug it pins down.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config.models import Config, DeviceSourceBase
from bridge.core.model import Event, Quality, Reading, parse_timestamp
from bridge.core.source import BuildContext, Mapper
from bridge.errors import ConfigError, DecodeError
from bridge.registry import load_config, protocols
from protocols.modbus.mapping import BlockAddress
from protocols.s7.planner import Block as S7Block

CASES = Path(__file__).resolve().parents[1] / "cases"
CASE_DIRECTORIES = sorted(path.parent for path in CASES.glob("*/*/mapping.yaml"))


def _load(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _modbus_reading(config: Config, source_id: str, index: int, entry: dict[str, Any]
                    ) -> Reading:
    source = config.sources[0]
    assert isinstance(source, DeviceSourceBase)
    devices = [device.id for device in source.devices]
    device = entry.get("device") or (devices[0] if len(devices) == 1 else None)
    assert device is not None, "input names no device and the source has several"
    received_at = float(entry.get("at", index))
    quality = Quality(entry.get("quality", "good"))
    values: tuple[Any, ...] | None = None
    if "registers" in entry:
        values = tuple(int(register) for register in entry["registers"])
    elif "bits" in entry:
        values = tuple(bool(bit) for bit in entry["bits"])
    # An explicit count with fewer values is a short answer.
    count = int(entry["count"]) if "count" in entry else len(values or ())
    address = BlockAddress(device, entry["table"], int(entry["start"]), count)
    return Reading(source_id, address, values, received_at, quality=quality,
                   reason=entry.get("reason"))


def _payload(entry: dict[str, Any]) -> bytes:
    """A message body: ``payload`` as text, or ``json`` (any YAML value) encoded as JSON."""
    if "json" in entry:
        return json.dumps(entry["json"]).encode()
    payload = entry["payload"]
    return bytes.fromhex(payload[4:]) if payload.startswith("hex:") else payload.encode()


def _mqtt_reading(config: Config, source_id: str, index: int, entry: dict[str, Any]) -> Reading:
    return Reading(source_id, entry["topic"], _payload(entry), float(entry.get("at", index)),
                   meta={"qos": int(entry.get("qos", 0)), "retain": False})


def _amqp_reading(config: Config, source_id: str, index: int, entry: dict[str, Any]) -> Reading:
    stamp = entry.get("timestamp")
    return Reading(source_id, entry["routing_key"], _payload(entry),
                   float(entry.get("at", index)),
                   ts=float(stamp) if stamp is not None else None,
                   message_id=entry.get("message_id"),
                   meta={"exchange": entry.get("exchange", ""), "headers": {},
                         "redelivered": False, "content_type": entry.get("content_type"),
                         "message_id": entry.get("message_id")})


def _opcua_reading(config: Config, source_id: str, index: int, entry: dict[str, Any]) -> Reading:
    quality = Quality(entry.get("quality", "good"))
    return Reading(source_id, entry["node"], entry.get("value"), float(entry.get("at", index)),
                   ts=entry.get("ts"), quality=quality, reason=entry.get("reason"))


def _s7_reading(config: Config, source_id: str, index: int, entry: dict[str, Any]) -> Reading:
    data = bytes.fromhex(entry["hex"].replace(" ", "")) if "hex" in entry else None
    count = int(entry["count"]) if "count" in entry else len(data or b"")
    if entry["area"] in ("T", "C") and "count" not in entry:
        count //= 2
    address = S7Block(entry["area"], int(entry.get("db", 0)), int(entry["start"]), count)
    return Reading(source_id, address, data, float(entry.get("at", index)),
                   quality=Quality(entry.get("quality", "good")), reason=entry.get("reason"))


def _bacnet_reading(config: Config, source_id: str, index: int, entry: dict[str, Any]
                    ) -> Reading:
    address = f"{entry['device']}/{entry['object']}/{entry.get('property', 'present-value')}"
    meta: dict[str, Any] = {"unit": entry.get("unit")}
    if "state_text" in entry:
        meta["state_text"] = entry["state_text"]
    return Reading(source_id, address, entry.get("value"), float(entry.get("at", index)),
                   quality=Quality(entry.get("quality", "good")), reason=entry.get("reason"),
                   meta=meta)


READINGS: dict[str, Callable[[Config, str, int, dict[str, Any]], Reading]] = {
    "modbus": _modbus_reading,
    "mqtt": _mqtt_reading,
    "amqp": _amqp_reading,
    "opcua": _opcua_reading,
    "s7": _s7_reading,
    "bacnet": _bacnet_reading,
}
"""How each protocol's input entries become readings."""


def _check_event(event: Event, expected: dict[str, Any], position: int) -> None:
    where = f"event {position} ({event.point})"
    assert event.point == expected["point"], where
    assert event.quality is Quality(expected.get("quality", "good")), (where, event.reason)
    if "value" in expected:
        value = expected["value"]
        if isinstance(value, float) and not isinstance(event.value, bool):
            assert event.value == pytest.approx(value, rel=1e-6), where
        else:
            assert event.value == value, where
            assert type(event.value) is type(value), where
    if "unit" in expected:
        assert event.unit == expected["unit"], where
    if "reason" in expected:
        assert event.reason is not None, where
        assert expected["reason"] in event.reason, where
    if "ts" in expected:
        assert event.ts == parse_timestamp(expected["ts"]), where
    if "at" in expected:
        assert event.received_at == float(expected["at"]), where


CASE_IDS = [f"{path.parent.name}/{path.name}" for path in CASE_DIRECTORIES]


@pytest.mark.parametrize("case", CASE_DIRECTORIES, ids=CASE_IDS)
def test_case(case: Path, tmp_path: Path) -> None:
    mapping = case / "mapping.yaml"
    if (case / "error.yaml").is_file():
        expected_error = _load(case / "error.yaml")
        with pytest.raises(ConfigError) as raised:
            load_config(mapping)
        file = str((case / expected_error.get("file", "mapping.yaml")).resolve())
        matching = [issue for issue in raised.value.issues
                    if expected_error["error"] in issue.message]
        assert matching, f"no issue mentions {expected_error['error']!r}: {raised.value}"
        issue = matching[0]
        assert (issue.file, issue.line) == (file, expected_error["line"]), str(issue)
        if "path" in expected_error:
            assert issue.path == expected_error["path"]
        return

    config = load_config(mapping)
    assert len(config.sources) == 1, "a case configures one source"
    source = config.sources[0]
    spec = protocols()[source.protocol]
    unit = spec.source_unit(source, config.points[source.id],
                      BuildContext(bridge_id="cases", state_dir=tmp_path))
    mapper: Mapper = unit.mapper
    entries = _load(case / "input.yaml")["readings"]
    outcomes: list[Event | DecodeError] = []
    for index, entry in enumerate(entries):
        reading = READINGS[source.protocol](config, source.id, index, entry)
        try:
            outcomes.extend(mapper.map(reading))
        except DecodeError as rejection:
            outcomes.append(rejection)
    expected = _load(case / "expected.yaml")["events"] or []
    produced = [f"rejected: {outcome}" if isinstance(outcome, DecodeError)
                else f"{outcome.point}={outcome.value!r} {outcome.quality}" for outcome in outcomes]
    assert len(outcomes) == len(expected), f"events: {produced}"
    for position, (outcome, wanted) in enumerate(zip(outcomes, expected, strict=True)):
        if "rejected" in wanted:
            assert isinstance(outcome, DecodeError), f"event {position}: {produced[position]}"
            assert wanted["rejected"] in str(outcome), f"event {position}: {outcome}"
        else:
            assert isinstance(outcome, Event), f"event {position}: {outcome}"
            _check_event(outcome, wanted, position)


def test_cases_are_found() -> None:
    assert len(CASE_DIRECTORIES) >= 10
    assert {case.parent.name for case in CASE_DIRECTORIES} >= set(READINGS)
    for case in CASE_DIRECTORIES:
        has_io = (case / "input.yaml").is_file() and (case / "expected.yaml").is_file()
        assert has_io != (case / "error.yaml").is_file(), f"{case.name}: input+expected or error"
