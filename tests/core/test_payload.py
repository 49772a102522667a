"""The shared message-payload engine: templates, topic patterns, extraction, bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from helpers.brokers import write_config
from helpers.payload import RECEIVED, config_error, mapper_for, reading

from bridge.core.model import Quality, parse_timestamp
from bridge.core.source import BuildContext
from bridge.core.status import EndpointStatus
from bridge.core.templates import AMQP_ROUTING_KEY, MQTT_TOPIC, AddressPattern, Template
from bridge.errors import DecodeError
from bridge.pipeline.supervisor import source_status
from bridge.registry import load_config
from protocols.mqtt import SPEC

# --- templates and patterns -------------------------------------------------------------------


def test_template_expands_placeholders() -> None:
    template = Template.parse("{site}.{device}.t")
    assert template.names == ("site", "device")
    assert template.expand({"site": "n", "device": "b1"}) == "n.b1.t"
    assert Template.parse("plain").is_static
    with pytest.raises(KeyError):
        template.expand({"site": "n"})


@pytest.mark.parametrize("text", ["{", "a}", "{1x}", "{a b}", "{}"])
def test_template_rejects_bad_placeholders(text: str) -> None:
    with pytest.raises(ValueError, match=r"placeholder|brace"):
        Template.parse(text)


@pytest.mark.parametrize(("pattern", "topic", "expected"), [
    ("sensors/{site}/{device}/telemetry", "sensors/n/b1/telemetry", {"site": "n", "device": "b1"}),
    ("sensors/{site}/{device}/telemetry", "sensors/n/b1/other", None),
    ("sensors/{site}/{device}/telemetry", "sensors/n/telemetry", None),
    ("sensors/+/x", "sensors//x", {}),
    ("sensors/#", "sensors", {}),
    ("sensors/#", "sensors/a/b/c", {}),
    ("sensors/#", "sensorsX/a", None),
    ("#", "any/topic/at/all", {}),
    ("a.b", "a/b", None),
])
def test_mqtt_topic_patterns(pattern: str, topic: str, expected: dict[str, str] | None) -> None:
    assert AddressPattern.parse(pattern, MQTT_TOPIC).match(topic) == expected


def test_mqtt_subscription_replaces_named_levels() -> None:
    pattern = AddressPattern.parse("sensors/{site}/{device}/#", MQTT_TOPIC)
    assert pattern.subscription == "sensors/+/+/#"
    assert pattern.names == ("site", "device")


@pytest.mark.parametrize(("pattern", "message"), [
    ("a/#/b", "last level"),
    ("a/b#", "whole level"),
    ("a/dev-{id}", "whole level"),
    ("a/{x}/{x}", "used twice"),
    ("a/{1x}", "level name"),
    ("", "empty"),
])
def test_mqtt_topic_pattern_errors(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AddressPattern.parse(pattern, MQTT_TOPIC)


@pytest.mark.parametrize(("pattern", "key", "expected"), [
    ("sensors.{site}.{device}", "sensors.n.b1", {"site": "n", "device": "b1"}),
    ("sensors.*", "sensors.", None),
    ("sensors.#", "sensors", {}),
    ("a.#.z", "a.z", {}),
    ("a.#.z", "a.b.c.z", {}),
    ("#.z", "z", {}),
    ("#.z", "x.y.z", {}),
    ("#.z", "x.y", None),
    ("#", "", {}),
])
def test_amqp_routing_key_patterns(pattern: str, key: str,
                                   expected: dict[str, str] | None) -> None:
    assert AddressPattern.parse(pattern, AMQP_ROUTING_KEY).match(key) == expected


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(("point", "message"), [
    ({"format": "text", "path": "a"}, "`path` applies to json"),
    ({"format": "binary"}, "needs a `type`"),
    ({"format": "json", "type": "int16"}, "applies to binary payloads"),
    ({"format": "binary", "type": "float32", "length": 4}, "length applies to strings"),
    ({"path": "a["}, "invalid JMESPath"),
    ({"each": "items"}, "needs `{item.FIELD}` or `{index}`"),
    ({"tags": {"line": "{line}"}}, "tag 'line' uses {line}"),
    ({"writable": True}, "cannot be written back"),
    ({"name": "{nowhere}.t"}, "placeholder {nowhere} is not known"),
    ({"name": "bad name"}, "should match pattern"),
    ({"timestamp": {"path": "ts", "on": "item"}}, "needs `each`"),
    ({"timestamp": {"path": "ts", "format": "unix"}}, "iso8601"),
])
def test_point_config_errors(tmp_path: Path, point: dict[str, Any], message: str) -> None:
    spec = {"name": "{device}.value", "topic": "s/{device}", **point}
    text = config_error(tmp_path, [spec])
    assert message in text
    assert "config.yaml:" in text


def test_source_tags_may_not_hold_placeholders(tmp_path: Path) -> None:
    text = config_error(tmp_path, [{"name": "a", "topic": "a"}], tags={"site": "{site}"})
    assert "source tags are fixed" in text


def test_templated_point_ids_are_listed_as_templates(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.yaml", {
        "id": "m", "protocol": "mqtt", "host": "h", "prefix": "p.",
        "points": [{"name": "{device}.t", "topic": "s/{device}"}]})
    config = load_config(path)
    assert [point.id for point in config.points["m"]] == ["p.{device}.t"]


# --- extraction -------------------------------------------------------------------------------


def test_json_message_yields_several_points_with_topic_segments(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, [
        {"name": "{site}.{device}.temperature", "topic": "sensors/{site}/{device}/telemetry",
         "path": "values.temp", "unit": "degC", "tags": {"site": "{site}", "kind": "t"}},
        {"name": "{site}.{device}.humidity", "topic": "sensors/{site}/{device}/telemetry",
         "path": "values.hum"},
    ], tags={"plant": "p1"})
    events = mapper.map(reading("sensors/north/boiler-1/telemetry",
                                '{"values": {"temp": 21.5, "hum": 40}}'))
    assert [(event.point, event.value) for event in events] == [
        ("north.boiler-1.temperature", 21.5), ("north.boiler-1.humidity", 40)]
    assert events[0].tags == {"plant": "p1", "site": "north", "kind": "t"}
    assert events[0].unit == "degC"
    assert events[0].ts == RECEIVED
    assert events[0].protocol == "mqtt"


def test_each_fans_out_over_a_list(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, [{
        "name": "meters.{item.id}.power", "topic": "meters/batch", "each": "readings",
        "path": "kw", "timestamp": {"path": "at", "format": "epoch_s", "on": "item"}}])
    payload = {"readings": [{"id": "p1", "kw": 3.2, "at": 1000}, {"id": "p2", "kw": 1.5,
                                                                "at": 2000}]}
    events = mapper.map(reading("meters/batch", json.dumps(payload)))
    assert [(event.point, event.value, event.ts) for event in events] == [
        ("meters.p1.power", 3.2, 1000.0), ("meters.p2.power", 1.5, 2000.0)]


def test_each_that_finds_no_list_is_counted(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, [{
        "name": "m.{index}", "topic": "t", "each": "readings", "path": "kw"}])
    assert mapper.map(reading("t", '{"readings": 5}')) == []
    assert mapper.counters["dropped_points"] == 1
    assert "expected a list" in mapper.details["last_dropped_point"]["reason"]


@pytest.mark.parametrize(("payload", "reason"), [
    ('{"other": 1}', "path 'temp' found nothing"),
    ('{"temp": {"v": 1}}', "found an object"),
    ('{"temp": [1, 2]}', "found a list"),
    ('{"temp": "warm"}', "cannot scale"),
])
def test_value_problems_become_bad_events(tmp_path: Path, payload: str, reason: str) -> None:
    mapper = mapper_for(tmp_path, [{"name": "t", "topic": "t", "path": "temp", "scale": 2}])
    (event,) = mapper.map(reading("t", payload))
    assert event.quality is Quality.BAD
    assert event.value is None
    assert reason in (event.reason or "")
    if "cannot scale" not in reason:
        assert mapper.counters["bad_values"] == 1
        assert mapper.details["last_bad_value"]["address"] == "t"


@pytest.mark.parametrize(("payload", "reason"), [
    ("{not json", "topic t/x: invalid JSON"),
    ("", "topic t/x: empty payload"),
    (b"\xff\xfe{", "topic t/x: invalid JSON"),
])
def test_malformed_json_rejects_the_message_naming_the_topic(
    tmp_path: Path, payload: bytes | str, reason: str
) -> None:
    mapper = mapper_for(tmp_path, [{"name": "v", "topic": "t/x", "path": "v"}])
    with pytest.raises(DecodeError, match=reason):
        mapper.map(reading("t/x", payload))


def test_message_no_point_matches_is_rejected(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, [{"name": "v", "topic": "t/+", "path": "v"}])
    with pytest.raises(DecodeError, match="topic u/1: no configured point matches"):
        mapper.map(reading("u/1", "{}"))


def test_number_and_text_payloads(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, [
        {"name": "{line}.speed", "topic": "lines/{line}/speed", "format": "number",
         "round": 1},
        {"name": "{line}.count", "topic": "lines/{line}/count", "format": "number"},
        {"name": "{line}.state", "topic": "lines/{line}/state", "format": "text"},
    ])
    assert mapper.map(reading("lines/l1/speed", " 42.71\n"))[0].value == 42.7
    assert mapper.map(reading("lines/l1/count", "17"))[0].value == 17
    assert mapper.map(reading("lines/l1/state", "RUNNING\n"))[0].value == "RUNNING"
    with pytest.raises(DecodeError, match="topic lines/l1/speed: payload 'fast' is not a "
                       "number"):
        mapper.map(reading("lines/l1/speed", "fast"))
    with pytest.raises(DecodeError, match="not UTF-8"):
        mapper.map(reading("lines/l1/state", b"\xff"))


def test_binary_float32_with_swapped_words(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, [{"name": "p", "topic": "raw", "format": "binary",
                                    "type": "float32", "order": "CDAB"}])
    big_endian = struct.pack(">f", 12.5)
    swapped = big_endian[2:] + big_endian[:2]
    assert mapper.map(reading("raw", swapped))[0].value == 12.5
    with pytest.raises(DecodeError, match="topic raw: binary payload of 5 bytes: float32 "
                       "needs 4 bytes"):
        mapper.map(reading("raw", swapped + b"\x00"))


def test_binary_fields_of_a_frame(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, [
        {"name": "flow", "topic": "frame", "format": "binary", "type": "uint16",
         "byte_offset": 4, "scale": 0.1},
        {"name": "running", "topic": "frame", "format": "binary", "type": "bool",
         "byte_offset": 0},
        {"name": "label", "topic": "frame", "format": "binary", "type": "string",
         "byte_offset": 6},
    ])
    frame = b"\x01\x00\x00\x00" + struct.pack(">H", 123) + b"pump\x00\x00"
    assert [(event.point, event.value) for event in mapper.map(reading("frame", frame))] == [
        ("flow", 12.3), ("running", True), ("label", "pump")]
    with pytest.raises(DecodeError, match="too short for uint16 at offset 4"):
        mapper.map(reading("frame", b"\x01\x00\x00\x00\x01"))


@pytest.mark.parametrize(("stamp", "form", "expected"), [
    ("2024-06-10T08:00:00Z", "iso8601", parse_timestamp("2024-06-10T08:00:00Z")),
    ("2024-06-10T10:00:00+02:00", "iso8601", parse_timestamp("2024-06-10T08:00:00Z")),
    (1718006400, "epoch_s", 1718006400.0),
    ("1718006400.5", "epoch_s", 1718006400.5),
    (1718006400123, "epoch_ms", 1718006400.123),
])
def test_payload_timestamp_is_the_event_time(tmp_path: Path, stamp: Any, form: str,
                                             expected: float) -> None:
    mapper = mapper_for(tmp_path, [{"name": "v", "topic": "t", "path": "v"}],
                        timestamp={"path": "meta.ts", "format": form})
    (event,) = mapper.map(reading("t", json.dumps({"v": 1, "meta": {"ts": stamp}})))
    assert event.ts == pytest.approx(expected)
    assert event.quality is Quality.GOOD
    assert event.received_at == RECEIVED


@pytest.mark.parametrize(("meta", "reason"), [
    ({}, "not found"),
    ({"ts": "yesterday"}, "unreadable"),
    ({"ts": 1e20}, "out of range"),
    ({"ts": True}, "expected a number"),
])
def test_unreadable_timestamp_falls_back_to_receive_time(
    tmp_path: Path, meta: dict[str, Any], reason: str
) -> None:
    mapper = mapper_for(tmp_path, [{"name": "v", "topic": "t", "path": "v",
                                    "timestamp": {"path": "ts", "format": "epoch_ms"}}])
    (event,) = mapper.map(reading("t", json.dumps({"v": 1, **meta})))
    assert event.ts == RECEIVED
    assert event.quality is Quality.UNCERTAIN
    assert event.value == 1
    assert reason in (event.reason or "")


def test_dynamic_points_are_capped_and_counted(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, [{"name": "{device}.v", "topic": "d/{device}", "path": "v"}],
                        max_points=2)
    status = EndpointStatus(name="m", kind="source", protocol="mqtt", endpoint="x")
    mapper.attach(status)
    for device in ("a", "b", "c", "a"):
        mapper.map(reading(f"d/{device}", '{"v": 1}'))
    assert mapper.point_count == 2
    assert status.counters["dropped_points"] == 1
    assert "max_points=2" in status.details["last_dropped_point"]["reason"]
    assert status.details["last_dropped_point"]["address"] == "d/c"


def test_invalid_expanded_point_ids_are_dropped(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, [{"name": "{device}.v", "topic": "d/{device}", "path": "v"}])
    assert mapper.map(reading("d/bad device", '{"v": 1}')) == []
    assert mapper.counters["dropped_points"] == 1
    assert "not a valid point id" in mapper.details["last_dropped_point"]["reason"]


def test_two_templates_cannot_produce_the_same_point(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, [
        {"name": "boiler.v", "topic": "fixed", "path": "v"},
        {"name": "{device}.v", "topic": "d/{device}", "path": "v"},
    ])
    assert len(mapper.map(reading("fixed", '{"v": 1}'))) == 1
    assert mapper.map(reading("d/boiler", '{"v": 2}')) == []
    assert "already produced by point 'boiler.v'" in (
        mapper.details["last_dropped_point"]["reason"])


def test_each_expanded_point_has_its_own_report_state(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, [{"name": "{device}.v", "topic": "d/{device}", "path": "v",
                                    "report": {"mode": "change"}}])
    assert len(mapper.map(reading("d/a", '{"v": 1}'))) == 1
    assert len(mapper.map(reading("d/b", '{"v": 1}'))) == 1
    assert mapper.map(reading("d/a", '{"v": 1}')) == []
    assert len(mapper.map(reading("d/a", '{"v": 2}'))) == 1


def test_the_framework_attaches_the_mapping_to_the_source_status(tmp_path: Path) -> None:
    """The status the framework makes for a message source receives the mapping's counts
    before the source runs: no source attaches its mapping itself."""
    path = write_config(tmp_path / "config.yaml", {
        "id": "m", "protocol": "mqtt", "host": "127.0.0.1",
        "points": [{"name": "v", "topic": "t", "path": "v"}]})
    config = load_config(path)
    unit = SPEC.source_unit(config.sources[0], config.points["m"], BuildContext("test", tmp_path))
    status = source_status(unit)
    (event,) = unit.mapper.map(reading("t", '{"other": 1}'))
    assert event.quality is Quality.BAD
    assert status.counters["bad_values"] == 1
    assert status.details["last_bad_value"]["point"] == "v"
