"""Configuration of the Modbus TCP server: a register map per unit id, validated at load.

Each entry serves one bridged point (of any protocol) in a table at a 0-based address, with
the same types, byte/word orders, bits, strings, scale and offset as the Modbus source's
points: an entry's registers are checked and encoded by the source's own point model and
encoder (``ModbusPoint``, ``compile_encoder``), never a second codec.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from bridge.config.models import Duration, PlainText, ResolvedPoint, ServerBase, StrictModel
from bridge.config.validation import field_error
from bridge.config.yamlsource import KeyPath
from bridge.core.codec import ByteOrder, DataType
from protocols.modbus.config import BIT_TABLES, MAX_REGISTERS, ModbusPoint, Table

WhenBad = Literal["exception", "last", "sentinel"]
"""What an entry answers while its point is bad, stale or its source down."""


class ServedRegister(StrictModel):
    """One point served at an address of one table of one unit."""

    point: PlainText = Field(description="The id of the bridged point served here.")
    table: Table = Field(
        description="`coil`, `discrete` (discrete input), `input` (input register) or "
        "`holding` (holding register).")
    address: int = Field(ge=0, le=65535, description="0-based address on the wire.")
    type: DataType | None = Field(
        default=None, description="As a Modbus source point's `type`: bool, int16, uint16, "
        "int32, uint32, int64, uint64, float32, float64 or string. Default: bool in coils and "
        "discrete inputs, uint16 in registers.")
    order: ByteOrder | None = Field(
        default=None, description="Byte/word order, as a Modbus source point's `order` "
        "(ABCD default, CDAB, BADC, DCBA and the 8-letter forms).")
    bit: int | None = Field(
        default=None, ge=0, le=15,
        description="Serve a bool as this bit (0 = least significant) of a register.")
    length: int | None = Field(
        default=None, ge=1, le=MAX_REGISTERS, description="Length of a `string` in registers.")
    scale: float = Field(
        default=1.0, description="The register holds (value - offset) / scale; a write is "
        "read back as register * scale + offset.")
    offset: float = Field(default=0.0, description="See `scale`.")
    writable: bool = Field(
        default=False, description="Accept writes from clients (the point must be writable "
        "at its source too); they go through the audited write path.")
    stale_after: Duration | None = Field(
        default=None, gt=0, description="A value received longer ago than this is stale and "
        "answered as `when_bad` says. Unset: any age is current.")
    when_bad: WhenBad = Field(
        default="exception", description="While the point is bad, stale or its source down: "
        "`exception` answers exception 04 (server device failure); `last` serves the last "
        "good value (exception 04 until there is one); `sentinel` serves `sentinel`.")
    sentinel: float | str | None = Field(
        default=None, description="The value served with `when_bad: sentinel`, encoded as the "
        "entry's type.")

    _register: ModbusPoint = PrivateAttr()

    @property
    def register(self) -> ModbusPoint:
        """The entry as a Modbus source point: its codec, counts and encoder come from it."""
        return self._register

    @model_validator(mode="after")
    def _as_modbus_point(self) -> ServedRegister:
        try:
            self._register = ModbusPoint(
                name="served", address=self.address, table=self.table, type=self.type,
                order=self.order, bit=self.bit, length=self.length, scale=self.scale,
                offset=self.offset, writable=self.writable)
        except ValidationError as exc:
            raise ValidationError.from_exception_data("modbus", [
                InitErrorDetails(type=PydanticCustomError(
                    "config", str(error["msg"]).removeprefix("Value error, ")),
                    loc=tuple(error["loc"]), input=error.get("input", {}))
                for error in exc.errors(include_url=False)]) from None
        if self.writable and self.bit is not None:
            raise field_error("writable", "a bit inside a register is served read-only",
                              self.writable)
        if self.when_bad == "sentinel" and self.sentinel is None:
            raise field_error("sentinel", "when_bad: sentinel needs `sentinel`")
        if self.when_bad != "sentinel" and self.sentinel is not None:
            raise field_error("sentinel", "`sentinel` applies to when_bad: sentinel only",
                              self.sentinel)
        return self


class ServedUnit(StrictModel):
    """The register map one unit id answers."""

    unit: int = Field(default=1, ge=0, le=255, description="The unit id clients address.")
    registers: Sequence[ServedRegister] = Field(
        min_length=1, description="What this unit serves; any other address answers "
        "exception 02.")

    @model_validator(mode="after")
    def _no_overlap(self) -> ServedUnit:
        taken: dict[tuple[str, int], tuple[int, int | None]] = {}
        for index, entry in enumerate(self.registers):
            register = entry.register
            for address in range(register.start, register.start + register.count):
                key = (entry.table, address)
                other = taken.get(key)
                if other is not None and (other[1] is None or entry.bit is None
                                          or other[1] == entry.bit):
                    raise field_error(
                        ("registers", index, "address"),
                        f"{entry.table} {address} is served by entry {other[0]} already",
                        entry.address)
                taken[key] = (index, entry.bit)
        return self


class ModbusServerConfig(ServerBase):
    """A Modbus TCP server (slave) serving the latest value of bridged points."""

    protocol: Literal["modbus"] = Field(description="Always `modbus`.")
    port: int = Field(default=502, ge=1, le=65535, description="Listen port.")
    units: Sequence[ServedUnit] = Field(
        min_length=1, description="The register map of each unit id; a request for another "
        "unit id answers exception 0B (gateway target failed to respond).")
    allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list, description="Clients allowed to connect, as networks "
        "(`10.0.0.0/8`, `192.168.1.20/32`); empty: any client that reaches the address.")
    max_connections: int = Field(
        default=16, ge=1, le=1024, description="Client connections at most; one more is "
        "closed at once and counted.")

    @model_validator(mode="after")
    def _units_once(self) -> ModbusServerConfig:
        seen: set[int] = set()
        for index, unit in enumerate(self.units):
            if unit.unit in seen:
                raise field_error(("units", index, "unit"),
                                  f"unit id {unit.unit} is served twice", unit.unit)
            seen.add(unit.unit)
        return self


def _fits(entry: ServedRegister, point: ResolvedPoint) -> str | None:
    """Why the point's values cannot be served in the entry's type, or ``None``."""
    kind = point.spec.value_type()
    register = entry.register
    if kind is None:
        return None
    if register.value_kind == "bool":
        return None if kind in ("bool", "integer") else f"a {kind} point cannot be served as a bit"
    if register.value_kind == "string":
        return None if kind == "string" else f"a {kind} point cannot be served as a string"
    if kind == "string":
        return f"a string point cannot be served as {register.data_type}"
    return None


def check(server: ServerBase, points: Mapping[str, ResolvedPoint]) -> list[tuple[KeyPath, str]]:
    """Every served point exists, its values fit the entry's type, and a writable entry's
    point is writable at its source."""
    if not isinstance(server, ModbusServerConfig):
        return []
    issues: list[tuple[KeyPath, str]] = []
    for unit_index, unit in enumerate(server.units):
        for index, entry in enumerate(unit.registers):
            path: KeyPath = ("units", unit_index, "registers", index)
            point = points.get(entry.point)
            if point is None:
                issues.append(((*path, "point"), f"no configured point has the id "
                               f"'{entry.point}'"))
                continue
            reason = _fits(entry, point)
            if reason is not None:
                issues.append(((*path, "type"), reason))
            if entry.writable and not point.spec.writable:
                issues.append(((*path, "writable"), f"point '{entry.point}' is not writable at "
                               "its source"))
    return issues


def template(points: Sequence[ResolvedPoint]) -> dict[str, Any]:
    """A starting server for unit 1: bools in coils (writable) or discrete inputs, whole
    numbers as int32 and other numbers as float32 in holding (writable) or input registers,
    each table from address 0 in point order. Strings are left out: their length is the
    operator's to choose."""
    registers: list[dict[str, Any]] = []
    next_address = dict.fromkeys(("coil", "discrete", "input", "holding"), 0)
    for point in sorted(points, key=lambda point: point.id):
        kind = point.spec.value_type()
        if kind == "string":
            continue
        writable = point.spec.writable
        if kind == "bool":
            table, data_type, size = ("coil" if writable else "discrete"), "bool", 1
        else:
            table = "holding" if writable else "input"
            data_type, size = ("int32", 2) if kind == "integer" else ("float32", 2)
        entry: dict[str, Any] = {"point": point.id, "table": table,
                                 "address": next_address[table], "type": data_type}
        if writable:
            entry["writable"] = True
        registers.append(entry)
        next_address[table] += size
    return {"id": "modbus-server", "protocol": "modbus", "host": "127.0.0.1", "port": 5020,
            "units": [{"unit": 1, "registers": registers}]}


__all__ = ["BIT_TABLES", "ModbusServerConfig", "ServedRegister", "ServedUnit", "check", "template"]
