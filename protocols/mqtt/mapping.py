"""The MQTT mapping: topic filters routed to message points."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.config.models import ResolvedPoint
from bridge.core.message_mapper import MessageMapper, Route
from protocols.mqtt.config import MqttPoint, MqttSourceConfig
from protocols.mqtt.source import PROTOCOL


def compile_mapper(
    config: MqttSourceConfig, points: Sequence[ResolvedPoint], *, bridge_id: str
) -> MessageMapper:
    """Compile every point of an MQTT source once; messages are then matched by topic."""
    routes = []
    for point in points:
        spec = point.spec
        if not isinstance(spec, MqttPoint):
            raise TypeError(f"point {point.id} is not an MQTT point")
        routes.append(Route(point, spec.pattern(), config.timestamp))
    return MessageMapper(routes, protocol=PROTOCOL, bridge_id=bridge_id, address_label="topic",
                         max_points=config.max_points)
