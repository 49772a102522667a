"""The compiled S7 mapping: block readings to point events.

The source publishes one ``Reading`` per block it read; its address is the ``Block`` and its
value the block's bytes. The mapper finds, once per block, the points inside it with their
byte offsets and compiled decoders; each reading then only slices and decodes. A block that
could not be read gives each of its points a ``bad`` event whose reason starts with the
point's own address.

Imports ``bridge.config``, ``bridge.core``, ``bridge.errors`` and the S7 config, address,
codec and planner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bridge.config.models import ResolvedPoint
from bridge.core.inverse import RawKind, compile_inverse_transform
from bridge.core.mapping import PointProgram
from bridge.core.model import Event, Quality, Reading, Value
from bridge.errors import DecodeError
from protocols.s7.address import ELEMENT_AREAS, Location
from protocols.s7.codec import Decoder, compile_decoder, compile_encoder
from protocols.s7.config import PROTOCOL, S7Point
from protocols.s7.planner import ELEMENT_BYTES, Block

Encode = Callable[[Value, bytes], bytes]
"""A written value (and the byte it changes, for a bit) to the bytes to write."""


def span_of(location: Location) -> Block:
    """The units one location occupies."""
    return Block(location.area, location.db, location.start, location.size)


def _raw_kind(location: Location) -> RawKind:
    data_type = location.data_type
    if data_type == "BOOL":
        return "bool"
    if data_type in ("STRING", "WSTRING", "DATE_AND_TIME"):
        return "string"
    return "number" if data_type in ("REAL", "LREAL") else "integer"


@dataclass(frozen=True, slots=True)
class PointLocation:
    """Where a point is read and written, and how a written value becomes bytes."""

    point_id: str
    location: Location
    span: Block
    encode: Encode


def _compile_write(point_id: str, spec: S7Point, location: Location) -> Encode:
    """The core's inverse transform, then the S7 encoding."""
    raw_of = compile_inverse_transform(point_id, spec, raw=_raw_kind(location))
    if location.data_type == "TIMER":

        def refuse(value: Value, current: bytes) -> bytes:
            raise ValueError("timers are read-only")

        return refuse
    to_bytes = compile_encoder(location)

    def encode(value: Value, current: bytes) -> bytes:
        return to_bytes(raw_of(value), current)

    return encode


@dataclass(frozen=True, slots=True)
class _Slot:
    offset: int
    end: int
    address: str
    decode: Decoder
    program: PointProgram


@dataclass(frozen=True, slots=True)
class _Compiled:
    location: PointLocation
    decode: Decoder
    program: PointProgram


class S7Mapper:
    """Implements ``bridge.core.source.Mapper`` for S7 block readings."""

    def __init__(self, points: Sequence[ResolvedPoint], *, bridge_id: str) -> None:
        self._points: list[_Compiled] = []
        self._locations: dict[str, PointLocation] = {}
        self._layouts: dict[Block, tuple[_Slot, ...]] = {}
        for point in points:
            spec = point.spec
            if not isinstance(spec, S7Point):
                raise TypeError(f"point {point.id} is not an S7 point")
            location = spec.location
            placed = PointLocation(point.id, location, span_of(location),
                                   _compile_write(point.id, spec, location))
            self._points.append(_Compiled(placed, compile_decoder(location),
                                          PointProgram(point, protocol=PROTOCOL,
                                                       bridge_id=bridge_id)))
            self._locations[point.id] = placed

    def spans(self) -> list[Block]:
        """What the planner must read: one span per point."""
        return [compiled.location.span for compiled in self._points]

    def locate(self, point_id: str) -> PointLocation | None:
        """Where a point is read, or ``None`` for an unknown point id."""
        return self._locations.get(point_id)

    def locations(self) -> dict[str, PointLocation]:
        """Every point's location by point id."""
        return dict(self._locations)

    def programs(self) -> dict[str, PointProgram]:
        """Every point's program, by point id."""
        return {compiled.location.point_id: compiled.program for compiled in self._points}

    def _layout(self, block: Block) -> tuple[_Slot, ...]:
        layout = self._layouts.get(block)
        if layout is not None:
            return layout
        width = ELEMENT_BYTES if block.area in ELEMENT_AREAS else 1
        slots = []
        for compiled in self._points:
            span = compiled.location.span
            if block.covers(span):
                offset = (span.start - block.start) * width
                slots.append(_Slot(offset, offset + span.count * width,
                                   compiled.location.location.classic(), compiled.decode,
                                   compiled.program))
        layout = tuple(slots)
        self._layouts[block] = layout
        return layout

    def map(self, reading: Reading) -> list[Event]:
        """Events for the points inside the block the reading covers."""
        block = reading.address
        if not isinstance(block, Block):
            raise DecodeError(f"not an S7 block: {block!r}")
        layout = self._layout(block)
        data = reading.value
        received_at, ts = reading.received_at, reading.ts
        events: list[Event] = []
        if reading.quality is Quality.BAD or not isinstance(data, bytes | bytearray):
            reason = reading.reason or "no value read"
            for slot in layout:
                event = slot.program.bad(f"{slot.address}: {reason}", received_at=received_at,
                                         ts=ts)
                if event is not None:
                    events.append(event)
            return events
        for slot in layout:
            chunk = bytes(data[slot.offset:slot.end])
            try:
                if len(chunk) != slot.end - slot.offset:
                    raise DecodeError(f"{len(chunk)} bytes read, {slot.end - slot.offset} "
                                      "expected")
                raw = slot.decode(chunk)
            except DecodeError as exc:
                event = slot.program.bad(f"{slot.address}: {exc.reason}",
                                         received_at=received_at, ts=ts)
            else:
                event = slot.program.produce(raw, received_at=received_at, ts=ts,
                                             quality=reading.quality, reason=reading.reason)
            if event is not None:
                events.append(event)
        return events
