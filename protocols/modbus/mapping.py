"""The compiled Modbus mapping: block readings to point events.

The source publishes one ``Reading`` per block it read; its address is a ``BlockAddress`` and
its value the tuple of registers (ints) or bits (bools). The mapper finds, once per block
address, the points inside the block with their offsets and compiled decoders; each reading
then only slices and decodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.config.models import PointBase, ResolvedPoint
from bridge.core.codec import compile_register_decoder, compile_register_encoder
from bridge.core.mapping import PointProgram
from bridge.core.model import Event, Quality, Reading, Value
from bridge.errors import DecodeError
from protocols.modbus.config import BIT_TABLES, ModbusPoint, Table
from protocols.modbus.planner import Span

PROTOCOL = "modbus"

Decoder = Callable[[Sequence[Any]], Value]


@dataclass(frozen=True, slots=True)
class BlockAddress:
    """What one reading of a Modbus source covers: a block of one device's table.

    ``count`` is part of the address so a ``bad`` reading, which has no registers, still
    says which points it concerns.
    """

    device: str
    table: Table
    start: int
    count: int

    def __str__(self) -> str:
        return f"{self.device}/{self.table}[{self.start}:{self.start + self.count}]"


Encoder = Callable[[Value], list[int] | bool]
"""A point value to what is written: registers, or the state of a coil or bit."""


@dataclass(frozen=True, slots=True)
class PointLocation:
    """Where a point's value is read and written: its device, registers (or bits) and bit."""

    point_id: str
    device: str
    span: Span
    bit: int | None = None
    encode: Encoder | None = None
    """``None`` for a point that is not writable."""


def compile_inverse_transform(spec: PointBase) -> Callable[[Value], Value]:
    """The raw value to write for a point value: the inverse of enum or scale and offset.

    Raises ``ValueError`` for a label the enum does not have or a value that is no number.
    Protocol independent; it belongs next to ``compile_transform`` once a second protocol
    writes.
    """
    if spec.enum is not None:
        keys: dict[str, Value] = {}
        for key, label in spec.enum.items():
            is_number = isinstance(key, str) and key.lstrip("-").isdigit()
            keys[label] = int(key) if is_number else key

        def unlabel(value: Value) -> Value:
            if isinstance(value, str) and value in keys:
                return keys[value]
            raise ValueError(f"{value!r} is not one of the point's labels: "
                             f"{', '.join(sorted(keys))}")

        return unlabel
    scale, offset = spec.scale, spec.offset

    def unscale(value: Value) -> Value:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return value  # the encoder says what it expected
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value}")
        if scale == 1.0 and offset == 0.0:
            return value
        return (value - offset) / scale

    return unscale


def _compile_encoder(spec: ModbusPoint) -> Encoder:
    raw_of = compile_inverse_transform(spec)
    if spec.value_kind == "bool":

        def encode_bool(value: Value) -> list[int] | bool:
            raw = raw_of(value)
            if isinstance(raw, bool) or (isinstance(raw, int) and raw in (0, 1)):
                return bool(raw)
            raise ValueError(f"expected true or false, got {value!r}")

        return encode_bool
    to_registers = compile_register_encoder(spec.data_type, spec.byte_order,
                                            length=spec.length)
    whole = spec.data_type not in ("float32", "float64", "string")

    def encode(value: Value) -> list[int] | bool:
        raw = raw_of(value)
        if whole and isinstance(raw, float):
            nearest = round(raw)
            # Scaling back (25.5 / 0.1) leaves float noise; a real fraction is refused.
            if abs(raw - nearest) > 1e-6 * max(1.0, abs(raw)):
                raise ValueError(f"{value!r} is finer than the point resolves (the "
                                 f"{spec.data_type} register would hold {raw:g})")
            raw = nearest
        return to_registers(raw)

    return encode


@dataclass(frozen=True, slots=True)
class _Slot:
    """A point inside one block: which values to slice and how they decode."""

    offset: int
    end: int
    decode: Decoder
    program: PointProgram


def _decode_bit(values: Sequence[Any]) -> Value:
    value = values[0]
    if not isinstance(value, bool | int):
        raise DecodeError(f"expected a bit, got {type(value).__name__}")
    return bool(value)


def _compile_decoder(spec: ModbusPoint) -> Decoder:
    if spec.resolved_table in BIT_TABLES:
        return _decode_bit
    return compile_register_decoder(
        spec.data_type, spec.byte_order, bit=spec.bit, length=spec.length)


@dataclass(frozen=True, slots=True)
class _CompiledPoint:
    """A point with its location, decoder and program, before it is placed in blocks."""

    location: PointLocation
    decode: Decoder
    program: PointProgram


class ModbusMapper:
    """Implements ``bridge.core.source.Mapper`` for Modbus block readings."""

    def __init__(self, points: Sequence[ResolvedPoint], *, bridge_id: str) -> None:
        self._devices: dict[str, list[_CompiledPoint]] = {}
        self._layouts: dict[BlockAddress, tuple[_Slot, ...]] = {}
        self._locations: dict[str, PointLocation] = {}
        for point in points:
            spec = point.spec
            if not isinstance(spec, ModbusPoint) or point.device is None:
                raise TypeError(f"point {point.id} is not a Modbus device point")
            location = PointLocation(
                point.id, point.device, Span(spec.resolved_table, spec.start, spec.count),
                bit=spec.bit, encode=_compile_encoder(spec) if spec.writable else None)
            compiled = _CompiledPoint(
                location,
                _compile_decoder(spec),
                PointProgram(point, protocol=PROTOCOL, bridge_id=bridge_id),
            )
            self._devices.setdefault(point.device, []).append(compiled)
            self._locations[point.id] = location

    def spans(self, device: str) -> list[Span]:
        """What the planner must read for ``device``: one span per point."""
        return [compiled.location.span for compiled in self._devices.get(device, ())]

    def locate(self, point_id: str) -> PointLocation | None:
        """Where a point is read, or ``None`` for an unknown point id."""
        return self._locations.get(point_id)

    def programs(self) -> dict[str, PointProgram]:
        """Every point's program, by point id (counters such as ``suppressed``)."""
        return {
            compiled.location.point_id: compiled.program
            for points in self._devices.values() for compiled in points
        }

    def _layout(self, address: BlockAddress) -> tuple[_Slot, ...]:
        layout = self._layouts.get(address)
        if layout is not None:
            return layout
        points = self._devices.get(address.device)
        if points is None:
            raise DecodeError(f"no points are mapped for Modbus device '{address.device}'")
        end = address.start + address.count
        slots = []
        for compiled in points:
            span = compiled.location.span
            if span.table == address.table and address.start <= span.start and span.end <= end:
                offset = span.start - address.start
                slots.append(_Slot(offset, offset + span.count, compiled.decode,
                                   compiled.program))
        layout = tuple(slots)
        self._layouts[address] = layout
        return layout

    def map(self, reading: Reading) -> list[Event]:
        """Events for the points inside the block the reading covers."""
        address = reading.address
        if not isinstance(address, BlockAddress):
            raise DecodeError(f"not a Modbus block address: {address!r}")
        layout = self._layout(address)
        values = reading.value
        if reading.quality is Quality.BAD or values is None:
            return _all_bad(layout, reading, reading.reason or "no value read")
        if len(values) != address.count:
            return _all_bad(layout, reading,
                            f"block has {len(values)} values, expected {address.count}")
        received_at, ts = reading.received_at, reading.ts
        events: list[Event] = []
        for slot in layout:
            try:
                raw = slot.decode(values[slot.offset:slot.end])
            except DecodeError as exc:
                event = slot.program.bad(exc.reason, received_at=received_at, ts=ts)
            else:
                event = slot.program.produce(raw, received_at=received_at, ts=ts,
                                             quality=reading.quality, reason=reading.reason)
            if event is not None:
                events.append(event)
        return events


def _all_bad(layout: Sequence[_Slot], reading: Reading, reason: str) -> list[Event]:
    events = []
    for slot in layout:
        event = slot.program.bad(reason, received_at=reading.received_at, ts=reading.ts)
        if event is not None:
            events.append(event)
    return events
