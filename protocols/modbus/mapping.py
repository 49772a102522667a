"""The compiled Modbus mapping: block readings to point events.

The source publishes one ``Reading`` per block it read; its address is a ``BlockAddress`` and
its value the tuple of registers (ints) or bits (bools). The mapper finds, once per block
address, the points inside the block with their offsets and compiled decoders; each reading
then only slices and decodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.config.models import ResolvedPoint
from bridge.core.codec import compile_register_decoder, compile_register_encoder
from bridge.core.inverse import RawKind, compile_inverse_transform
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
    encode: Encoder
    bit: int | None = None


def _raw_kind(spec: ModbusPoint) -> RawKind:
    """What is written for a point: a bit, a whole number, any number or a string."""
    if spec.resolved_table in BIT_TABLES or spec.value_kind == "bool":
        return "bool"
    if spec.data_type == "string":
        return "string"
    return "number" if spec.data_type in ("float32", "float64") else "integer"


def compile_encoder(point_id: str, spec: ModbusPoint) -> Encoder:
    """What is written for a value of the point: the core's inverse transform, then the
    registers (or the state of a coil or bit).

    The encoder raises ``WriteError`` for a value the point cannot hold and ``ValueError``
    for one its registers cannot (out of range, too long).
    """
    raw_of = compile_inverse_transform(point_id, spec, raw=_raw_kind(spec))
    if spec.resolved_table in BIT_TABLES or spec.bit is not None:

        def encode_bit(value: Value) -> list[int] | bool:
            return bool(raw_of(value))

        return encode_bit
    to_registers = compile_register_encoder(spec.data_type, spec.byte_order,
                                            length=spec.length)

    def encode(value: Value) -> list[int] | bool:
        return to_registers(raw_of(value))

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
                compile_encoder(point.id, spec), bit=spec.bit)
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
