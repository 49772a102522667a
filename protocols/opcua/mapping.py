"""The OPC-UA mapping: a variant's value, normalized, through each point's program.

Scalars map to event values: numbers, booleans and strings as they are; ``LocalizedText``
and ``XmlElement`` as their text; ``DateTime`` as ISO 8601 UTC; GUIDs and
``QualifiedName``/``NodeId`` values as their string form. A null String, ByteString or
XmlElement (how many stacks encode an empty one) is the empty string. Arrays, structures
(extension objects) and byte strings are not values an event can carry: such a point is
``bad`` with a reason that says so, never silently dropped or flattened into a string nobody
asked for.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from asyncua import ua

from bridge.config.models import ResolvedPoint
from bridge.core.mapping import PointProgram
from bridge.core.model import Event, Quality, Reading, Value, isoformat
from bridge.errors import DecodeError
from protocols.opcua.config import PROTOCOL, OpcuaPoint

_EMPTY_WHEN_NULL = frozenset({
    ua.VariantType.String, ua.VariantType.ByteString, ua.VariantType.XmlElement})


def variant_value(variant: ua.Variant | None) -> Any:
    """The Python value of a variant, a typed null String, ByteString or XmlElement being
    the empty string: an empty batch id or message is a value, not a missing one."""
    if variant is None:
        return None
    if variant.Value is None and variant.VariantType in _EMPTY_WHEN_NULL:
        return ""
    return variant.Value


def normalize(raw: Any) -> Value:
    """A variant's Python value as an event value; raises ``DecodeError`` for what is not one."""
    if raw is None:
        raise DecodeError("the node has no value (null variant)")
    if isinstance(raw, enum.Enum):
        raw = raw.value
    if isinstance(raw, bool | str):
        return raw
    if isinstance(raw, int):
        return int(raw)
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise DecodeError(f"value is {raw}")
        return float(raw)
    if isinstance(raw, ua.LocalizedText):
        return raw.Text or ""
    if isinstance(raw, ua.XmlElement):
        return raw.Value or ""
    if isinstance(raw, datetime):
        moment = raw if raw.tzinfo is not None else raw.replace(tzinfo=UTC)
        return isoformat(moment.timestamp())
    if isinstance(raw, uuid.UUID):
        return str(raw)
    if isinstance(raw, ua.QualifiedName | ua.NodeId):
        return raw.to_string()
    if isinstance(raw, list | tuple):
        raise DecodeError(f"the node holds an array ({len(raw)} elements); only scalar values "
                          "are bridged")
    if isinstance(raw, bytes | bytearray):
        raise DecodeError("the node holds a ByteString; only numbers, booleans and strings are "
                          "bridged")
    raise DecodeError(f"the node holds a {type(raw).__name__} structure; only numbers, "
                      "booleans and strings are bridged")


class OpcuaMapper:
    """Compiled mapping of one OPC-UA source: each node address to the points reading it."""

    def __init__(self, points: Sequence[ResolvedPoint], *, bridge_id: str) -> None:
        self._programs: dict[str, list[PointProgram]] = {}
        for point in points:
            spec = point.spec
            if not isinstance(spec, OpcuaPoint):
                raise TypeError(f"point {point.id} is not an OPC-UA point")
            program = PointProgram(point, protocol=PROTOCOL, bridge_id=bridge_id)
            self._programs.setdefault(spec.address, []).append(program)

    @property
    def addresses(self) -> list[str]:
        """Every node address the source must serve, in configuration order."""
        return list(self._programs)

    def map(self, reading: Reading) -> list[Event]:
        """Events of every point on the reading's node; ``bad`` ones if the value is unusable."""
        programs = self._programs.get(str(reading.address))
        if programs is None:
            raise DecodeError(f"no point reads node {reading.address}")
        events: list[Event] = []
        received_at, ts = reading.received_at, reading.ts
        if reading.quality is Quality.BAD:
            for program in programs:
                event = program.bad(reading.reason or "bad status", received_at=received_at,
                                    ts=ts)
                if event is not None:
                    events.append(event)
            return events
        try:
            value = normalize(reading.value)
        except DecodeError as exc:
            for program in programs:
                event = program.bad(exc.reason, received_at=received_at, ts=ts)
                if event is not None:
                    events.append(event)
            return events
        for program in programs:
            event = program.produce(value, received_at=received_at, ts=ts,
                                    quality=reading.quality, reason=reading.reason)
            if event is not None:
                events.append(event)
        return events
