"""The AMQP connector: consumes a RabbitMQ queue and maps JSON, text, number and binary
payloads to points (see README.md)."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.config import ResolvedPoint, SourceBase
from bridge.payload import resolve_points
from bridge.registry import ProtocolSpec
from bridge.source import BuildContext, SourceUnit
from bridge.yamlsource import KeyPath
from protocols.amqp.config import AmqpPoint, AmqpSourceConfig
from protocols.amqp.mapping import PROTOCOL, compile_mapper
from protocols.amqp.source import AmqpAcknowledger, AmqpSource

__all__ = ["SPEC", "AmqpAcknowledger", "AmqpPoint", "AmqpSource", "AmqpSourceConfig", "build"]


def _amqp_source(source: SourceBase) -> AmqpSourceConfig:
    if not isinstance(source, AmqpSourceConfig):
        raise TypeError(f"source {source.id} is not an AMQP source")
    return source


def build(source: SourceBase, points: Sequence[ResolvedPoint],
          context: BuildContext) -> SourceUnit:
    """Compile the mapping and create the source."""
    config = _amqp_source(source)
    mapper = compile_mapper(config, points, bridge_id=context.bridge_id)
    return SourceUnit(source=AmqpSource(config, mapper), mapper=mapper)


def _points(source: SourceBase, path: KeyPath) -> list[ResolvedPoint]:
    return resolve_points(_amqp_source(source), path)


SPEC = ProtocolSpec(
    name=PROTOCOL,
    source_model=AmqpSourceConfig,
    build=build,
    source_points=_points,
)
"""The AMQP entry of the protocol registry."""
