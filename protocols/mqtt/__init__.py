"""The MQTT connector: subscribes to topic filters and maps JSON, text, number and binary
payloads to points; publishes the outbox to a broker (see README.md)."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.config.models import ResolvedPoint, SinkBase, SourceBase
from bridge.config.yamlsource import KeyPath
from bridge.core.message_points import resolve_points
from bridge.core.sink import Sink
from bridge.core.source import BuildContext, SourceUnit
from bridge.registry import ProtocolSpec
from protocols.mqtt import discover
from protocols.mqtt.config import MqttPoint, MqttSourceConfig
from protocols.mqtt.mapping import compile_mapper
from protocols.mqtt.sink import MqttSink
from protocols.mqtt.sink_config import MqttSinkConfig
from protocols.mqtt.source import PROTOCOL, MqttAcknowledger, MqttSource
from protocols.mqtt.sparkplug_sink import SparkplugSink

__all__ = ["SPEC", "MqttAcknowledger", "MqttPoint", "MqttSink", "MqttSinkConfig", "MqttSource",
           "MqttSourceConfig", "SparkplugSink", "build", "build_sink"]


def _mqtt_source(source: SourceBase) -> MqttSourceConfig:
    if not isinstance(source, MqttSourceConfig):
        raise TypeError(f"source {source.id} is not an MQTT source")
    return source


def build(source: SourceBase, points: Sequence[ResolvedPoint],
          context: BuildContext) -> SourceUnit:
    """Compile the mapping and create the source."""
    config = _mqtt_source(source)
    mapper = compile_mapper(config, points, bridge_id=context.bridge_id)
    client_id = config.client_id
    if client_id is None and not config.clean_session:
        client_id = f"fieldbridge-{context.bridge_id}-{config.id}"
    share_group = config.share_group
    if config.workers > 1:
        share_group = share_group or f"fieldbridge-{context.bridge_id}-{config.id}"
        if client_id is not None and context.worker is not None:
            client_id = f"{client_id}-{context.worker}"  # one session per worker
    return SourceUnit(source=MqttSource(config, client_id=client_id, share_group=share_group),
                      mapper=mapper)


def build_sink(sink: SinkBase, context: BuildContext) -> Sink:
    """Create the sink for its ``format``."""
    if not isinstance(sink, MqttSinkConfig):
        raise TypeError(f"sink {sink.id} is not an MQTT sink")
    if sink.format == "sparkplug_b":
        return SparkplugSink(sink, bridge_id=context.bridge_id, state_dir=context.state_dir)
    return MqttSink(sink, bridge_id=context.bridge_id)


def _points(source: SourceBase, path: KeyPath) -> list[ResolvedPoint]:
    return resolve_points(_mqtt_source(source), path)


SPEC = ProtocolSpec(
    name=PROTOCOL,
    source_model=MqttSourceConfig,
    build=build,
    source_points=_points,
    sink_model=MqttSinkConfig,
    build_sink=build_sink,
    shared_workers=True,
    discovery=discover.SPEC,
)
"""The MQTT entry of the protocol registry."""
