"""AMQP sink configuration, its shipped example, routing keys and declare arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.sink_config import event

from bridge.config.models import Config
from bridge.errors import ConfigError
from bridge.registry import load_config
from protocols.amqp import AmqpSinkConfig
from protocols.amqp.sink import compile_routing_key, escape_word

EXAMPLE = Path(__file__).resolve().parents[2] / "mappings" / "amqp-sink-example.yaml"


def load(tmp_path: Path, sink: dict[str, Any] | None = None, **top: Any) -> Config:
    """A configuration with one MQTT source and, given, one sink."""
    document: dict[str, Any] = {
        "sources": [{"id": "plant", "protocol": "mqtt", "host": "127.0.0.1",
                     "points": [{"name": "t", "topic": "t", "format": "number"}]}],
        **top,
    }
    if sink is not None:
        document["sinks"] = [{"id": "rabbit", "protocol": "amqp", **sink}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return load_config(path)


def sink_config(tmp_path: Path, **options: Any) -> AmqpSinkConfig:
    """One loaded sink."""
    (sink,) = load(tmp_path, options).sinks
    assert isinstance(sink, AmqpSinkConfig)
    return sink


def test_example_validates_with_the_documented_topology() -> None:
    config = load_config(EXAMPLE)
    (sink,) = config.sinks
    assert isinstance(sink, AmqpSinkConfig)
    assert (config.outbox.max_bytes, config.outbox.policy) == (512 << 20, "block")
    assert sink.endpoint() == "amqp://guest@127.0.0.1:5672/%2F?exchange=fieldbridge.events"
    queues = {queue.name: queue.declare_arguments() for queue in sink.topology.queues}
    assert queues == {
        "fieldbridge.all": {"x-queue-type": "quorum", "x-message-ttl": 7 * 86400 * 1000,
                            "x-dead-letter-exchange": "fieldbridge.dead"},
        "fieldbridge.plant": {"x-queue-type": "quorum", "x-max-length": 100000,
                              "x-overflow": "reject-publish"},
        "fieldbridge.log": {"x-queue-type": "stream", "x-max-age": "86400s",
                            "x-max-length-bytes": 2 << 30},
        "fieldbridge.dead-letters": {"x-queue-type": "classic"},
    }


def test_defaults() -> None:
    sink = AmqpSinkConfig.model_validate({"id": "r", "protocol": "amqp"})
    assert (sink.exchange.name, sink.exchange.type, sink.exchange.durable) == (
        "fieldbridge.events", "topic", True)
    assert (sink.routing_key, sink.window) == ("{source}.{point}", 1000)


def test_routing_key_words_are_escaped() -> None:
    key = compile_routing_key("{source}.{point}.{quality}")
    assert key(event("boiler.supply_temp")) == "plant.boiler%2Esupply_temp.good"
    assert escape_word("a.b*c#d%e") == "a%2Eb%2Ac%23d%25e"
    tagged = compile_routing_key("site.{tags.site}.{tags.missing}.{unit}")
    assert tagged(event(tags={"site": "north.1"}, unit=None)) == "site.north%2E1.."
    long = compile_routing_key("{point}")(event("p" * 200 + "é" * 40))
    assert len(long.encode()) <= 255
    assert long.startswith("p" * 200)


@pytest.mark.parametrize(("sink", "message"), [
    ({"routing_key": "{source}.{device}"}, "placeholder {device} is not known"),
    ({"routing_key": "{source"}, "unbalanced brace"),
    ({"exchange": {"name": "amq.topic"}}, "set `declare: false`"),
    ({"window": 0}, "greater than or equal to 1"),
    ({"topology": {"queues": [{"name": "q", "type": "stream", "message_ttl": "1h"}]}},
     "a stream has no `message_ttl`"),
    ({"topology": {"queues": [{"name": "q", "durable": False}]}},
     "a quorum queue is always durable"),
    ({"topology": {"queues": [{"name": "q", "arguments": {"x-queue-type": "classic"}}]}},
     "set `type` instead of the argument `x-queue-type`"),
    ({"topology": {"queues": [{"name": "q", "overflow": "reject-publish-dlx"}]}},
     "quorum queues support"),
    ({"topology": {"queues": [{"name": "q", "max_age": "1d"}]}}, "`max_age` is for streams"),
    ({"topology": {"queues": [{"name": "q", "kind": "quorum"}]}}, "unknown key"),
    ({"sources": ["nowhere"]}, "no source has the id 'nowhere'"),
    ({"url": "amqp://u:secret@h", "port": 5673}, "give `url` or port, not both"),
])
def test_config_errors(tmp_path: Path, sink: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, sink)
    assert message in str(caught.value)
    assert "secret" not in str(caught.value)


def test_outbox_errors_and_sizes(tmp_path: Path) -> None:
    assert load(tmp_path, outbox={"max_bytes": "1.5KiB"}).outbox.max_bytes == 1536
    with pytest.raises(ConfigError, match=r"outbox\.policy"):
        load(tmp_path, outbox={"policy": "drop_newest"})
    with pytest.raises(ConfigError, match="sink id 'rabbit' is used twice"):
        load(tmp_path, sinks=[{"id": "rabbit", "protocol": "amqp"},
                              {"id": "rabbit", "protocol": "amqp"}])
    with pytest.raises(ConfigError, match="unknown protocol"):
        load(tmp_path, sinks=[{"id": "k", "protocol": "kafka"}])
