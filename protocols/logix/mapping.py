"""The compiled Logix mapping: tag readings to point events, and values to what is written.

The source publishes one ``Reading`` per read item (a tag, a slice or a CIP attribute); its
address is a ``TagAddress`` and its value the tag's value, or the list of a slice's
elements. The mapper knows, per item, which points it feeds.

Imports ``bridge.config``, ``bridge.core``, ``bridge.errors`` and the Logix config and points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.config.models import ResolvedPoint
from bridge.core.inverse import RawKind, compile_inverse_transform
from bridge.core.mapping import PointProgram
from bridge.core.model import Event, Quality, Reading, Value
from bridge.errors import DecodeError, ErrorCategory, WriteError
from protocols.logix.config import INTEGER_TYPES, LogixPoint, split_element
from protocols.logix.points import ReadItem

PROTOCOL = "logix"


@dataclass(frozen=True, slots=True)
class TagAddress:
    """What one reading of a Logix source covers: one read item."""

    request: str

    def __str__(self) -> str:
        return self.request


Encoder = Callable[[Value], Any]
"""A point value to what is written to its tag."""


def _raw_kind(spec: LogixPoint) -> RawKind:
    if spec.type == "BOOL":
        return "bool"
    if spec.type == "STRING":
        return "string"
    return "integer" if spec.type in INTEGER_TYPES else "number"


def compile_encoder(point_id: str, spec: LogixPoint) -> Encoder:
    """The core's inverse transform, then the tag's range (``WriteError`` outside it)."""
    raw_of = compile_inverse_transform(point_id, spec, raw=_raw_kind(spec))
    limits = INTEGER_TYPES.get(spec.type)

    def encode(value: Value) -> Any:
        raw = raw_of(value)
        if limits is not None and isinstance(raw, int) and not limits[0] <= raw <= limits[1]:
            raise WriteError(point_id, f"{raw} is outside the range of a {spec.type} "
                             f"({limits[0]}..{limits[1]})", ErrorCategory.CONFIG)
        return raw

    return encode


@dataclass(frozen=True, slots=True)
class _Slot:
    """A point fed by one read item: the element it takes (``None``: the whole value)."""

    index: int | None
    program: PointProgram
    type: str


def _check(value: Any, type_name: str) -> Value:
    """The value as the point's type reads it; ``DecodeError`` for anything else."""
    if type_name == "BOOL":
        if isinstance(value, bool | int):
            return bool(value)
    elif type_name == "STRING":
        if isinstance(value, str):
            return value
    elif type_name in INTEGER_TYPES:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number):
            return number
        raise DecodeError(f"the {type_name} is not a finite number ({number})")
    raise DecodeError(f"expected a {type_name}, got {type(value).__name__} {value!r}")


class LogixMapper:
    """Implements ``bridge.core.source.Mapper`` for Logix tag readings."""

    def __init__(self, points: Sequence[ResolvedPoint], items: Sequence[ReadItem], *,
                 bridge_id: str) -> None:
        self._slots: dict[str, list[_Slot]] = {item.request: [] for item in items}
        self._encoders: dict[str, Encoder] = {}
        self._programs: dict[str, PointProgram] = {}
        slices = {(item.request.partition("[")[0], item.type): item
                  for item in items if item.first is not None}
        for point in points:
            spec = point.spec
            if not isinstance(spec, LogixPoint):
                raise TypeError(f"point {point.id} is not a Logix point")
            program = PointProgram(point, protocol=PROTOCOL, bridge_id=bridge_id)
            self._programs[point.id] = program
            self._encoders[point.id] = compile_encoder(point.id, spec)
            request = str(spec.cip) if spec.cip is not None else spec.tag or ""
            index: int | None = None
            located = split_element(request)
            if located is not None and spec.type != "BOOL" and spec.cip is None:
                item = slices.get((located[0], spec.type))
                if item is not None and item.first is not None \
                        and item.first <= located[1] < item.first + item.elements:
                    request, index = item.request, located[1] - item.first
            self._slots.setdefault(request, []).append(_Slot(index, program, spec.type))

    def encoder(self, point_id: str) -> Encoder | None:
        """How a value of the point is written, or ``None`` for an unknown point."""
        return self._encoders.get(point_id)

    def programs(self) -> dict[str, PointProgram]:
        """Every point's program, by point id."""
        return dict(self._programs)

    def map(self, reading: Reading) -> list[Event]:
        """Events for the points the reading's item feeds."""
        address = reading.address
        if not isinstance(address, TagAddress):
            raise DecodeError(f"not a Logix tag address: {address!r}")
        slots = self._slots.get(address.request)
        if slots is None:
            raise DecodeError(f"no points are mapped to tag '{address.request}'")
        received_at, ts = reading.received_at, reading.ts
        events: list[Event] = []
        for slot in slots:
            if reading.quality is Quality.BAD or reading.value is None:
                event = slot.program.bad(reading.reason or f"tag {address} was not read",
                                         received_at=received_at, ts=ts)
            else:
                try:
                    value = reading.value
                    if slot.index is not None:
                        if not isinstance(value, list) or slot.index >= len(value):
                            raise DecodeError(f"tag {address}: expected a list of elements")
                        value = value[slot.index]
                    raw = _check(value, slot.type)
                except DecodeError as exc:
                    event = slot.program.bad(exc.reason, received_at=received_at, ts=ts)
                else:
                    event = slot.program.produce(raw, received_at=received_at, ts=ts,
                                                 quality=reading.quality,
                                                 reason=reading.reason)
            if event is not None:
                events.append(event)
        return events
