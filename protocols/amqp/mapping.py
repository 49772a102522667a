"""The AMQP mapping: routing keys and headers routed to message points."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bridge.config.models import ResolvedPoint
from bridge.core.message_mapper import MessageMapper, Route
from bridge.core.model import Reading
from protocols.amqp.config import AmqpPoint, AmqpSourceConfig

PROTOCOL = "amqp"


def message_variables(reading: Reading) -> Mapping[str, str]:
    """``{routing_key}``, ``{exchange}`` and ``{headers.NAME}`` of one message."""
    meta = reading.meta or {}
    variables = {"routing_key": str(reading.address), "exchange": str(meta.get("exchange", ""))}
    headers = meta.get("headers") or {}
    for name, value in headers.items():
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                continue
        if isinstance(value, bool):
            variables[f"headers.{name}"] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            variables[f"headers.{name}"] = str(value)
    return variables


def compile_mapper(
    config: AmqpSourceConfig, points: Sequence[ResolvedPoint], *, bridge_id: str
) -> MessageMapper:
    """Compile every point of an AMQP source once; messages are then matched by routing key."""
    routes = []
    for point in points:
        spec = point.spec
        if not isinstance(spec, AmqpPoint):
            raise TypeError(f"point {point.id} is not an AMQP point")
        routes.append(Route(point, spec.pattern(), config.timestamp))
    return MessageMapper(routes, protocol=PROTOCOL, bridge_id=bridge_id,
                         address_label="routing key", max_points=config.max_points,
                         variables=message_variables)
