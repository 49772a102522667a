"""Oversized values and declared types (issue "Hardening", measured item 9).

A 10 MB JSON string in an MQTT payload became a `good` event, stored and published; and a
number sent as text (`"21.5"`) could not be declared numeric. A payload point now declares
`type:` and every source bounds a string value with `max_value_bytes`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
import yaml
from helpers.brokers import MQTT_HOST, MQTT_PORT, require_broker, unique
from helpers.daemon import MIB, running_daemon
from helpers.payload import config_error, mapper_for, reading

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


async def test_the_daemon_turns_a_10_mb_mqtt_string_into_a_small_bad_event(
    tmp_path: Path
) -> None:
    """The whole path: the daemon receives the message, stores and serves a `bad` event
    without the value, and its resident memory stays bounded (``/proc``)."""
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    topic = unique("fbtest/big/")
    config = tmp_path / "fieldbridge.yaml"
    config.write_text(yaml.safe_dump({
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "api": {"host": "127.0.0.1", "port": 0},
        "sources": [{"id": "plant", "protocol": "mqtt", "host": MQTT_HOST, "port": MQTT_PORT,
                     "client_id": unique("fbtest-big-"), "qos": 1,
                     "points": [{"name": "v", "topic": topic, "path": "v"}]}],
    }), encoding="utf-8")
    publisher = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=unique("fbtest-pub-"))
    publisher.connect(MQTT_HOST, MQTT_PORT)
    publisher.loop_start()
    try:
        async with running_daemon(config) as daemon, httpx.AsyncClient(
                base_url=daemon.url, timeout=5) as api:
            async def value() -> Any:
                response = await api.get("/v1/points/v")
                return response.json() if response.status_code == 200 else None

            # Ready does not wait for the SUBACK: publish a small value until it arrives.
            async def small() -> bool:
                publisher.publish(topic, json.dumps({"v": "small"}), qos=1)
                return bool((await value() or {}).get("value") == "small")

            await daemon.poll(small, "the subscription")
            before = daemon.memory()["VmHWM"]
            publisher.publish(topic, json.dumps({"v": "x" * 10_000_000}), qos=1)
            async def bad() -> Any:
                point = await value()
                return point if point["quality"] == "bad" else None

            point = await daemon.poll(bad, "the bad event")
            assert point["value"] is None
            assert point["reason"] == ("a string of 10,000,000 bytes is larger than "
                                       "max_value_bytes (65,536)")
            history = (await api.get("/v1/points/v/history")).text
            assert len(history) < 10_000
            grown = daemon.memory()["VmHWM"] - before
            # The payload (10 MB), its decoded string (10 MB) and the client's buffers: the
            # value is never copied into events, the store or the API.
            assert grown < 80 * MIB, f"VmHWM grew by {grown / MIB:.0f} MiB"
    finally:
        publisher.loop_stop()
        publisher.disconnect()


@pytest.mark.parametrize(("raw", "point"), [
    (1.1e308, {"scale": 10}),
    (-1.7e308, {"offset": -1.7e308}),
    (10**400, {"scale": 0.5}),
])
def test_a_computed_value_that_is_not_finite_is_bad_with_the_reason(
    tmp_path: Path, raw: Any, point: dict[str, Any]
) -> None:
    """Before: 1.1e308 times 10 was Infinity, served as ``"value":NaN`` or ``null`` and `good`."""
    event = _one(tmp_path, {"v": raw}, {"path": "v", **point})
    assert event.quality is Quality.BAD
    assert event.value is None
    assert event.reason is not None
    assert "finite" in event.reason or "out of a number's range" in event.reason
    json.loads(event.to_json(), parse_constant=lambda name: pytest.fail(name))


def test_a_finite_scaled_value_stays_good(tmp_path: Path) -> None:
    event = _one(tmp_path, {"v": 1.1e307}, {"path": "v", "scale": 10, "round": 2})
    assert event.quality is Quality.GOOD
    assert event.value == pytest.approx(1.1e308)


def test_one_message_creates_at_most_1000_point_ids(tmp_path: Path) -> None:
    """Before: one payload with a list of 20,000 items took all 10,000 of ``max_points``,
    until the source restarted."""
    mapper = mapper_for(tmp_path, [{"name": "meters.{item.id}.power", "topic": "s/t",
                                    "each": "readings", "path": "kw"}])
    items = [{"id": f"m{index}", "kw": index} for index in range(20_000)]
    events = mapper.map(reading("s/t", json.dumps({"readings": items})))
    assert len(events) == 1_000
    assert mapper.point_count == 1_000
    assert mapper.counters["dropped_points"] == 19_000
    assert mapper.details["last_dropped_point"]["reason"] == (
        "more than 1,000 new point ids in one message")
    # A later message creates its own, and points known already are mapped as before.
    events = mapper.map(reading("s/t", json.dumps({"readings": items[:2_000]})))
    assert len(events) == 2_000
    assert mapper.point_count == 2_000
