"""Configuration of S7 sources and points.

A point's address is written either in the classic notation (``address: DB10.DBD4:REAL``)
or as structured keys (``area: DB, db: 10, start: 4, type: REAL``); ``count`` makes it an
array whose elements are points of their own (``name.0``, ``name.1`` …). A source is one
PLC: rack and slot, or the TSAP pair, the connection type and the PDU size asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, field_validator, model_validator

from bridge.config.models import (
    Duration,
    PlainText,
    PointBase,
    ReportSpec,
    ResolvedPoint,
    SourceBase,
    ValueType,
)
from bridge.config.validation import field_error
from bridge.config.yamlsource import KeyPath
from protocols.s7.address import (
    ELEMENT_AREAS,
    MAX_STRING,
    Area,
    DataType,
    Location,
    data_size,
    parse,
    parse_type,
)

PROTOCOL = "s7"

READ_OVERHEAD = 18
"""Bytes of a read response's PDU that are not data (header, parameters, item header)."""
MIN_PDU = 240
MAX_PDU = 960

ConnectionType = Literal["PG", "OP", "S7_BASIC"]
CONNECTION_TYPES: dict[str, int] = {"PG": 1, "OP": 2, "S7_BASIC": 3}
"""The high byte of the remote TSAP for each connection type."""

_NUMBER_TYPES = frozenset({"BYTE", "WORD", "DWORD", "INT", "DINT", "REAL", "LREAL",
                           "TIMER", "COUNTER"})
_READ_ONLY_TYPES = frozenset({"TIMER"})


class S7Point(PointBase):
    """One value (or array of values) in a PLC's memory."""

    address: PlainText | None = Field(
        default=None,
        description="Classic address: `DB10.DBD4:REAL`, `DB1.DBX0.3`, `DB2.DBB0:STRING[20]`, "
        "`M0.1`, `MW2`, `IW2`, `QB0`, `T1`, `C1` (German `E`, `A`, `Z` too). Without a "
        "`:TYPE`, X is BOOL, B BYTE, W WORD, D DWORD. Or give `area` and the keys below.")
    area: Area | None = Field(
        default=None, description="Structured form: `DB`, `M`, `I`, `Q`, `T` or `C`.")
    db: int | None = Field(default=None, ge=1, le=65535, description="DB number (area DB).")
    start: int | None = Field(
        default=None, ge=0, le=65535,
        description="Structured form: byte offset in the area, or the timer/counter number.")
    bit: int | None = Field(default=None, ge=0, le=7, description="Bit 0-7 of a BOOL.")
    type: PlainText | None = Field(
        default=None, description="Structured form: BOOL, BYTE, WORD, DWORD, INT, DINT, REAL, "
        "LREAL, STRING[n], WSTRING[n] or DATE_AND_TIME (T and C areas: leave out).")
    count: int = Field(
        default=1, ge=1, le=1000,
        description="Above 1: an array of this many values one after the other; each is a "
        "point `<name>.<index>` from 0.")

    @property
    def location(self) -> Location:
        """Where the point (an array's first element) lives."""
        if self.address is not None:
            return parse(self.address)
        assert self.area is not None
        assert self.start is not None
        if self.area in ELEMENT_AREAS:
            return Location(self.area, 0, self.start,
                            "TIMER" if self.area == "T" else "COUNTER")
        data_type, length = parse_type(self.type or "BYTE")
        return Location(self.area, self.db or 0, self.start, data_type,
                        bit=self.bit if data_type == "BOOL" else None, length=length)

    def elements(self) -> list[Location]:
        """The location of each array element (one for a scalar)."""
        first = self.location
        if first.data_type == "BOOL":
            base = first.start * 8 + (first.bit or 0)
            return [Location(first.area, first.db, (base + index) // 8, "BOOL",
                             bit=(base + index) % 8) for index in range(self.count)]
        return [Location(first.area, first.db, first.start + index * first.size,
                         first.data_type, length=first.length) for index in range(self.count)]

    @property
    def data_type(self) -> DataType:
        """The decoded type."""
        return self.location.data_type

    def value_type(self) -> ValueType | None:
        """What the decoded type gives, unless an enum or a scale decides."""
        mapped = super().value_type()
        if mapped is not None:
            return mapped
        data_type = self.data_type
        if data_type == "BOOL":
            return "bool"
        if data_type in ("STRING", "WSTRING", "DATE_AND_TIME"):
            return "string"
        return "number"

    @model_validator(mode="after")
    def _consistent(self) -> S7Point:
        structured = {"area": self.area, "db": self.db, "start": self.start, "bit": self.bit,
                      "type": self.type}
        if self.address is not None:
            for key, value in structured.items():
                if value is not None:
                    raise field_error(key, f"`{key}` belongs to the structured form; with "
                                      "`address` the address says it", value)
            try:
                location = parse(self.address)
            except ValueError as exc:
                raise field_error("address", str(exc), self.address) from None
        else:
            if self.area is None:
                raise field_error("address", "give `address` (e.g. DB10.DBD4:REAL) or `area` "
                                  "with `start` and `type`")
            if self.start is None:
                raise field_error("start", "the structured form needs `start`")
            if self.area == "DB" and self.db is None:
                raise field_error("db", "area DB needs `db`, the data block number")
            if self.area != "DB" and self.db is not None:
                raise field_error("db", f"`db` applies to area DB, not {self.area}", self.db)
            if self.area in ELEMENT_AREAS:
                if self.type is not None or self.bit is not None:
                    key = "type" if self.type is not None else "bit"
                    raise field_error(key, f"a {'timer' if self.area == 'T' else 'counter'} "
                                      "has its own type", structured[key])
            else:
                if self.type is None:
                    raise field_error("type", "the structured form needs `type`")
                try:
                    data_type, length = parse_type(self.type)
                except ValueError as exc:
                    raise field_error("type", str(exc), self.type) from None
                if data_type in ("TIMER", "COUNTER"):
                    raise field_error("type", f"{data_type} lives in area {data_type[0]}",
                                      self.type)
                if data_type in ("STRING", "WSTRING") and length is None:
                    raise field_error("type", f"{data_type} needs its length: "
                                      f"{data_type}[n]", self.type)
                if (data_type == "BOOL") != (self.bit is not None):
                    raise field_error("bit", "a BOOL needs `bit` (0-7), and only a BOOL has one",
                                      self.bit if self.bit is not None else self.type)
            location = self.location
        key = "address" if self.address is not None else "type"
        if location.length is not None and not 1 <= location.length <= MAX_STRING:
            raise field_error(key, f"a string holds 1-{MAX_STRING} characters",
                              self.address or self.type)
        if self.writable and location.data_type in _READ_ONLY_TYPES:
            raise field_error("writable", "timers are read-only", self.writable)
        if self.writable and self.scale == 0.0:
            raise field_error("scale", "a writable point needs a non-zero scale", self.scale)
        if (location.data_type not in _NUMBER_TYPES and self.enum is None
                and (self.scale != 1.0 or self.offset != 0.0 or self.round is not None)):
            raise field_error("scale", f"scale, offset and round apply to numbers, not to a "
                              f"{location.data_type}", self.scale)
        return self


class S7SourceConfig(SourceBase):
    """One S7 PLC (S7-300/400/1200/1500, or a compatible) and the points polled from it."""

    protocol: Literal["s7"] = Field(description="Always `s7`.")
    host: PlainText = Field(description="The PLC's host name or address.")
    port: int = Field(default=102, ge=1, le=65535, description="ISO-on-TCP port.")
    rack: int = Field(default=0, ge=0, le=7, description="Rack of the CPU.")
    slot: int = Field(
        default=1, ge=0, le=31,
        description="Slot of the CPU: 2 on an S7-300, 1 on an S7-1200/1500 (the default).")
    local_tsap: int | None = Field(
        default=None, ge=0, le=0xFFFF,
        description="Local TSAP (e.g. `0x0100`); with `remote_tsap`, instead of rack and slot.")
    remote_tsap: int | None = Field(
        default=None, ge=0, le=0xFFFF,
        description="Remote TSAP (e.g. `0x0201`): its high byte is the connection type, its "
        "low byte rack * 32 + slot.")
    connection_type: ConnectionType = Field(
        default="PG", description="`PG` (programming device), `OP` (operator panel) or "
        "`S7_BASIC`; some CPUs limit the connections of each type.")
    pdu_size: int = Field(
        default=480, ge=MIN_PDU, le=MAX_PDU,
        description="PDU size asked for; the PLC may grant less (the negotiated size is shown "
        "in the inventory, and reads are planned to fit it).")
    interval: Duration = Field(default=1.0, gt=0, description="Poll interval.")
    timeout: Duration = Field(
        default=2.0, gt=0, description="Wait this long for connecting and for each answer.")
    max_gap: int = Field(
        default=16, ge=0, le=MAX_PDU,
        description="Read through gaps of up to this many unused bytes to save requests.")
    prefix: PlainText | None = Field(
        default=None, description="Prefix of this source's point ids; default `<source id>.`.")
    report: ReportSpec | None = Field(
        default=None, description="Default report-by-exception settings of the points.")
    points: Sequence[S7Point] = Field(min_length=1, description="The values to poll.")

    @field_validator("local_tsap", "remote_tsap", mode="before")
    @classmethod
    def _hex(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                raise ValueError(f"{value!r} is not a TSAP such as 0x0100") from None
        return value

    @model_validator(mode="after")
    def _connection(self) -> S7SourceConfig:
        if (self.local_tsap is None) != (self.remote_tsap is None):
            missing = "remote_tsap" if self.remote_tsap is None else "local_tsap"
            raise field_error(missing, "give both TSAPs, or neither (then rack and slot)")
        if self.remote_tsap is not None:
            for key in ("rack", "slot", "connection_type"):
                if key in self.model_fields_set:
                    raise field_error(key, f"`{key}` is part of `remote_tsap`; give one or the "
                                      "other", getattr(self, key))
            if (self.remote_tsap >> 8) not in CONNECTION_TYPES.values():
                raise field_error("remote_tsap", "the high byte of a remote TSAP is the "
                                  "connection type: 1 (PG), 2 (OP) or 3 (S7 basic)",
                                  hex(self.remote_tsap))
        limit = self.pdu_size - READ_OVERHEAD
        for index, point in enumerate(self.points):
            location = point.location
            size = data_size(location.data_type, location.length)
            if size > limit:
                raise field_error(("points", index, "address" if point.address else "type"),
                                  f"a value of {size} bytes does not fit in one read with a "
                                  f"PDU of {self.pdu_size} bytes (at most {limit})")
        return self

    def endpoint(self) -> str:
        """``s7://host:102?rack=0&slot=1`` or ``s7://host:102?tsap=0100/0201``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.remote_tsap is not None and self.local_tsap is not None:
            return f"s7://{host}:{self.port}?tsap={self.local_tsap:04X}/{self.remote_tsap:04X}"
        return f"s7://{host}:{self.port}?rack={self.rack}&slot={self.slot}"

    @property
    def point_prefix(self) -> str:
        """What point ids start with."""
        return self.prefix if self.prefix is not None else f"{self.id}."

    @property
    def tsaps(self) -> tuple[int, int]:
        """The local and remote TSAP this connection uses."""
        if self.local_tsap is not None and self.remote_tsap is not None:
            return self.local_tsap, self.remote_tsap
        remote = CONNECTION_TYPES[self.connection_type] << 8 | self.rack << 5 | self.slot
        return 0x0100, remote


def s7_source(source: SourceBase) -> S7SourceConfig:
    """``source`` as an S7 source (the registry only hands us our own)."""
    if not isinstance(source, S7SourceConfig):
        raise TypeError(f"source {source.id} is not an S7 source")
    return source


def source_points(source: SourceBase, path: KeyPath) -> list[ResolvedPoint]:
    """The source's points, each array element a point of its own (``name.0`` …)."""
    config = s7_source(source)
    resolved = []
    base = ReportSpec().merged(config.report)
    for index, point in enumerate(config.points):
        names = [point.name] if point.count == 1 else \
            [f"{point.name}.{element}" for element in range(point.count)]
        for name, location in zip(names, point.elements(), strict=True):
            spec = point if point.count == 1 else point.model_copy(update={
                "name": name, "address": location.classic(), "area": None, "db": None,
                "start": None, "bit": None, "type": None, "count": 1})
            resolved.append(ResolvedPoint(
                id=f"{config.point_prefix}{name}", source=config.id, device=None, spec=spec,
                tags={**config.tags, **point.tags}, report=base.merged(point.report),
                path=(*path, "points", index)))
    return resolved
