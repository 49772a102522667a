"""MQTT sink configuration: defaults, the shipped example, topics and their escaping, the
Sparkplug B keys, the window, and errors that name the file, the line and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.sink_config import event

from bridge.config.models import Config
from bridge.core.source import BuildContext
from bridge.errors import ConfigError
from bridge.registry import load_config
from protocols.mqtt import SPEC, MqttSink, MqttSinkConfig, SparkplugSink
from protocols.mqtt.sink import escape_level

EXAMPLE = Path(__file__).resolve().parents[2] / "mappings" / "mqtt-sink-example.yaml"


def load(tmp_path: Path, sink: dict[str, Any]) -> Config:
    """A configuration with one MQTT source and one MQTT sink, written one key a line."""
    document = {
        "sources": [{"id": "plant", "protocol": "mqtt", "host": "127.0.0.1",
                     "points": [{"name": "t", "topic": "t", "format": "number"}]}],
        "sinks": [{"id": "north", "protocol": "mqtt", "host": "broker.local", **sink}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return load_config(path)


def sink_config(tmp_path: Path, **options: Any) -> MqttSinkConfig:
    """One loaded sink."""
    (sink,) = load(tmp_path, options).sinks
    assert isinstance(sink, MqttSinkConfig)
    return sink


def build(config: MqttSinkConfig, bridge_id: str = "edge-1") -> MqttSink:
    """The sink the registry builds."""
    sink = SPEC.sink(config, BuildContext(bridge_id, Path("/nonexistent")))
    assert isinstance(sink, MqttSink)
    return sink


def test_example_validates() -> None:
    config = load_config(EXAMPLE)
    (sink,) = config.sinks
    assert isinstance(sink, MqttSinkConfig)
    assert (sink.format, sink.qos, sink.retain, sink.mqtt_version) == ("json", 1, True, "5")
    assert sink.endpoint() == "mqtt://bridge@127.0.0.1:1883"
    assert build(sink, "edge-01").address(event("north.temperature")) == (
        "plant1/plant/north.temperature")


def test_defaults(tmp_path: Path) -> None:
    config = sink_config(tmp_path)
    assert (config.topic, config.qos, config.retain, config.format) == (
        "fieldbridge/{source}/{point}", 1, False, "json")
    assert (config.port_number, config.keepalive, config.commands) == (1883, 60, False)
    sink = build(config)
    assert sink.client_id == "fieldbridge-edge-1-sink-north"
    assert sink.window == 1000
    assert sink.address(event()) == "fieldbridge/plant/boiler.t"


def test_a_client_id_given_is_kept(tmp_path: Path) -> None:
    assert build(sink_config(tmp_path, client_id="line-3")).client_id == "line-3"


def test_topic_placeholders_are_one_level_each() -> None:
    assert escape_level("a/b+c#d%e") == "a%2Fb%2Bc%23d%25e"
    config = MqttSinkConfig.model_validate({
        "id": "s", "protocol": "mqtt", "host": "h",
        "topic": "site/{tags.site}/{source}/{point}/{quality}/{unit}/{tags.missing}"})
    sink = build(config)
    assert sink.address(event("room/1+#", tags={"site": "north/2"}, unit=None)) == (
        "site/north%2F2/plant/room%2F1%2B%23/good//")


@pytest.mark.parametrize(("qos", "version", "receive_maximum", "window"), [
    (1, "3.1.1", None, 1000),
    (2, "3.1.1", None, 20),
    (2, "5", None, 1000),
    (1, "5", 20, 20),
    (0, "5", 20, 1000),
])
def test_the_window_stays_within_what_the_broker_takes(
    tmp_path: Path, qos: int, version: str, receive_maximum: int | None, window: int
) -> None:
    config = sink_config(tmp_path, qos=qos, mqtt_version=version)
    assert config.pipeline(receive_maximum) == window
    assert sink_config(tmp_path, qos=qos, window=50).pipeline(receive_maximum) == min(
        50, receive_maximum if receive_maximum and qos else 50)


def test_sparkplug_keys_validate(tmp_path: Path) -> None:
    config = sink_config(tmp_path, format="sparkplug_b", group_id="plant",
                         edge_node_id="edge-01", commands=True)
    assert (config.group_id, config.edge_node_id, config.commands) == (
        "plant", "edge-01", True)


def test_sparkplug_takes_qos_0_a_primary_host_and_a_rebirth_interval(tmp_path: Path) -> None:
    config = sink_config(tmp_path, format="sparkplug_b", group_id="plant", edge_node_id="e",
                         qos=0, primary_host="scada-1", rebirth_interval="2s")
    assert (config.qos, config.primary_host, config.rebirth_interval) == (0, "scada-1", 2.0)
    defaults = sink_config(tmp_path, format="sparkplug_b", group_id="plant", edge_node_id="e")
    assert (defaults.primary_host, defaults.rebirth_interval) == (None, 5.0)


def test_sparkplug_builds_the_edge_node(tmp_path: Path) -> None:
    config = sink_config(tmp_path, format="sparkplug_b", group_id="plant", edge_node_id="e")
    assert isinstance(build(config), SparkplugSink)


ERRORS = [
    ({"topic": "plant/+/{point}"}, "topic", "no wildcards ('+')"),
    ({"topic": "plant/#"}, "topic", "no wildcards ('#')"),
    ({"topic": "$SYS/{point}"}, "topic", "the broker's"),
    ({"topic": "plant/{device}"}, "topic", "placeholder {device} is not known"),
    ({"topic": "plant/{point"}, "topic", "unbalanced brace"),
    ({"topic": "{unit}{tags.site}"}, "topic", "the topic would be empty"),
    ({"qos": 3}, "qos", "Input should be 0, 1 or 2"),
    ({"mqtt_version": "4"}, "mqtt_version", "Input should be '3.1.1' or '5'"),
    ({"window": 0}, "window", "greater than or equal to 1"),
    ({"format": "protobuf"}, "format", "Input should be 'json' or 'sparkplug_b'"),
    ({"group_id": "plant"}, "group_id", "is for `format: sparkplug_b`"),
    ({"commands": True}, "commands", "is for `format: sparkplug_b`"),
    ({"format": "sparkplug_b", "edge_node_id": "e"}, "group_id",
     "`format: sparkplug_b` needs `group_id`"),
    ({"format": "sparkplug_b", "group_id": "g", "edge_node_id": "a/b"}, "edge_node_id",
     "no `+`, `#` or `/`"),
    ({"format": "sparkplug_b", "group_id": "g+", "edge_node_id": "e"}, "group_id",
     "no `+`, `#` or `/`"),
    ({"format": "sparkplug_b", "group_id": "g", "edge_node_id": "e", "topic": "x/{point}"},
     "topic", "Sparkplug B publishes on its own topics"),
    ({"format": "sparkplug_b", "group_id": "g", "edge_node_id": "e", "retain": True},
     "retain", "`retain` is for `format: json`"),
    ({"format": "sparkplug_b", "group_id": "g", "edge_node_id": "e", "workers": 1},
     "workers", "runs in the daemon's process"),
    ({"format": "sparkplug_b", "group_id": "g", "edge_node_id": "e", "qos": 1},
     "qos", "Sparkplug B fixes its QoS"),
    ({"format": "sparkplug_b", "group_id": "g", "edge_node_id": "e", "qos": 2},
     "qos", "remove `qos`"),
    ({"primary_host": "scada"}, "primary_host", "is for `format: sparkplug_b`"),
    ({"format": "sparkplug_b", "group_id": "g", "edge_node_id": "e", "primary_host": "a/b"},
     "primary_host", "no `+`, `#` or `/`"),
    ({"format": "sparkplug_b", "group_id": "g", "edge_node_id": "e", "primary_host": ""},
     "primary_host", "at least 1 item"),
    ({"rebirth_interval": "2s"}, "rebirth_interval", "is for `format: sparkplug_b`"),
    ({"format": "sparkplug_b", "group_id": "g", "edge_node_id": "e",
      "rebirth_interval": -1}, "rebirth_interval", "greater than or equal to 0"),
    ({"tls": {"key": "/k.pem"}}, "tls", "go with `cert`"),
    ({"sources": ["nowhere"]}, "sources[0]", "no source has the id 'nowhere'"),
    ({"clean_session": True}, "clean_session", "unknown key"),
]
"""A sink's keys, the path of the key the error names (below the sink), what it says."""


@pytest.mark.parametrize(("sink", "key", "message"), ERRORS)
def test_errors_name_the_file_the_line_and_the_key(
    tmp_path: Path, sink: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, sink)
    (issue,) = caught.value.issues
    assert issue.file == str(tmp_path / "config.yaml")
    assert issue.path == f"sinks[0].{key}"
    lines = (tmp_path / "config.yaml").read_text(encoding="utf-8").splitlines()
    assert issue.line is not None
    named = lines[issue.line - 1].strip()
    # A key that is given is on its line (a list item on its own); a missing one has the
    # line of its sink.
    if key in sink:
        assert named.startswith(f"{key}:")
    elif key.endswith("]"):
        assert named.startswith("- ")
    else:
        assert named == "- id: north"
    assert message in issue.message


def test_a_password_without_user_is_refused_unseen(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"password": "s3cret"})
    (issue,) = caught.value.issues
    assert issue.path.startswith("sinks[0]")
    assert "`password` needs `username`" in issue.message
    assert "s3cret" not in str(caught.value)
