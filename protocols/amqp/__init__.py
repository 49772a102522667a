"""The AMQP connector: consumes a RabbitMQ queue and maps JSON, text, number and binary
payloads to points; publishes the outbox to an exchange (see README.md)."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.config.models import ResolvedPoint, SinkBase, SourceBase
from bridge.config.yamlsource import KeyPath
from bridge.core.message_points import resolve_points
from bridge.core.sink import Sink
from bridge.core.source import BuildContext, SourceUnit
from bridge.registry import ProtocolSpec
from protocols.amqp.config import AmqpPoint, AmqpSourceConfig
from protocols.amqp.mapping import PROTOCOL, compile_mapper
from protocols.amqp.sink import AmqpSink
from protocols.amqp.sink_config import AmqpSinkConfig
from protocols.amqp.source import AmqpAcknowledger, AmqpSource

__all__ = ["SPEC", "AmqpAcknowledger", "AmqpPoint", "AmqpSink", "AmqpSinkConfig", "AmqpSource",
           "AmqpSourceConfig", "build", "build_sink"]


def _amqp_source(source: SourceBase) -> AmqpSourceConfig:
    if not isinstance(source, AmqpSourceConfig):
        raise TypeError(f"source {source.id} is not an AMQP source")
    return source


def build(source: SourceBase, points: Sequence[ResolvedPoint],
          context: BuildContext) -> SourceUnit:
    """Compile the mapping and create the source."""
    config = _amqp_source(source)
    mapper = compile_mapper(config, points, bridge_id=context.bridge_id)
    return SourceUnit(source=AmqpSource(config), mapper=mapper)


def build_sink(sink: SinkBase, context: BuildContext) -> Sink:
    """Create the sink."""
    if not isinstance(sink, AmqpSinkConfig):
        raise TypeError(f"sink {sink.id} is not an AMQP sink")
    return AmqpSink(sink, bridge_id=context.bridge_id)


def _points(source: SourceBase, path: KeyPath) -> list[ResolvedPoint]:
    return resolve_points(_amqp_source(source), path)


SPEC = ProtocolSpec(
    name=PROTOCOL,
    source_model=AmqpSourceConfig,
    build=build,
    source_points=_points,
    sink_model=AmqpSinkConfig,
    build_sink=build_sink,
    shared_workers=True,
)
"""The AMQP entry of the protocol registry."""
