"""The BACnet mapping: a property's value through each point's program.

Readings arrive as event values already (numbers, booleans, texts; lists as JSON text). A
multi-state present-value whose point has no ``enum`` becomes the object's state text, and a
point without a ``unit`` takes the one the object's ``units`` property gives.
"""

from __future__ import annotations

from collections.abc import Sequence

from bridge.config.models import ResolvedPoint
from bridge.core.mapping import PointProgram
from bridge.core.model import Event, Quality, Reading, Value
from bridge.errors import DecodeError
from protocols.bacnet.config import PROTOCOL, BacnetPoint
from protocols.bacnet.device import point_address


class BacnetMapper:
    """Compiled mapping of one BACnet source: each property address to its points."""

    def __init__(self, points: Sequence[ResolvedPoint], *, bridge_id: str) -> None:
        self._programs: dict[str, list[tuple[PointProgram, BacnetPoint]]] = {}
        for point in points:
            spec = point.spec
            if not isinstance(spec, BacnetPoint) or point.device is None:
                raise TypeError(f"point {point.id} is not a BACnet point of a device")
            program = PointProgram(point, protocol=PROTOCOL, bridge_id=bridge_id)
            self._programs.setdefault(point_address(point.device, spec), []).append(
                (program, spec))

    @property
    def addresses(self) -> list[str]:
        """Every property address the source serves, in configuration order."""
        return list(self._programs)

    def map(self, reading: Reading) -> list[Event]:
        """Events of every point on the reading's property; ``bad`` ones for a bad reading."""
        programs = self._programs.get(str(reading.address))
        if programs is None:
            raise DecodeError(f"no point reads {reading.address}")
        meta = reading.meta or {}
        events: list[Event] = []
        for program, spec in programs:
            if spec.unit is None and meta.get("unit") is not None:
                program.unit = meta["unit"]
            if reading.quality is Quality.BAD:
                event = program.bad(reading.reason or "bad", received_at=reading.received_at,
                                    ts=reading.ts)
            else:
                event = program.produce(
                    _labelled(reading.value, spec, meta.get("state_text")),
                    received_at=reading.received_at, ts=reading.ts, quality=reading.quality,
                    reason=reading.reason)
            if event is not None:
                events.append(event)
        return events


def _labelled(value: Value, spec: BacnetPoint, texts: object) -> Value:
    """A multi-state value as its state text when the point has no enum of its own."""
    if spec.enum is not None or not isinstance(texts, list) or isinstance(value, bool):
        return value
    if isinstance(value, int) and 1 <= value <= len(texts):
        return str(texts[value - 1])
    return value
