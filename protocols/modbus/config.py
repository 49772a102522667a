"""Configuration of Modbus sources, devices, profiles and points.

Addresses are either Modicon numbers that carry their table (``30001`` is the first input
register, ``400001`` the first holding register in 6-digit form) or, when ``table`` is given,
0-based offsets as they go on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from bridge.config.models import (
    DeviceBase,
    DeviceSourceBase,
    Duration,
    PlainText,
    PointBase,
    ProfileBase,
    StrictModel,
    ValueType,
)
from bridge.config.validation import field_error
from bridge.core.codec import ByteOrder, DataType, parse_order, register_count, value_type_of

Table = Literal["coil", "discrete", "input", "holding"]
"""The four Modbus data tables."""

TABLES: tuple[Table, ...] = ("coil", "discrete", "input", "holding")
BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete"})
ADDRESS_SPACE = 65536
"""Registers (or bits) per table: offsets 0..65535."""

MAX_REGISTERS = 125
"""Registers one read request may carry (Modbus spec, function codes 3 and 4)."""
MAX_BITS = 2000
"""Bits one read request may carry (function codes 1 and 2)."""

# (first Modicon number, last Modicon number, table): the offset is number - first.
_MODICON: tuple[tuple[int, int, Table], ...] = (
    (10001, 19999, "discrete"),
    (30001, 39999, "input"),
    (40001, 49999, "holding"),
    (100001, 165536, "discrete"),
    (300001, 365536, "input"),
    (400001, 465536, "holding"),
)


"""The input of an error about a key that was not written: nothing to quote back."""


def modicon_table(address: int) -> tuple[Table, int] | None:
    """The table and 0-based offset of a Modicon address, or ``None`` if it has no prefix."""
    for first, last, table in _MODICON:
        if first <= address <= last:
            return table, address - first
    return None


class ModbusPoint(PointBase):
    """One value in a Modbus device: where it lives and how its registers decode."""

    address: int = Field(
        ge=0,
        description="Modicon address with its table prefix (10001-19999 discrete inputs, "
        "30001-39999 input registers, 40001-49999 holding registers; 6-digit 100001, 300001, "
        "400001 forms up to 65536), or, when `table` is given, the 0-based offset 0..65535.")
    table: Table | None = Field(
        default=None,
        description="`coil`, `discrete`, `input` or `holding`. Makes `address` a 0-based "
        "offset; required for coils, which have no unambiguous Modicon number.")
    type: DataType | None = Field(
        default=None,
        description="bool, int16, uint16, int32, uint32, int64, uint64, float32, float64 or "
        "string. Default: bool for coils and discrete inputs, uint16 for registers.")
    order: ByteOrder | None = Field(
        default=None,
        description="Byte/word order of multi-byte values: ABCD (big endian, default), CDAB "
        "(words swapped), BADC (bytes swapped in each word), DCBA (little endian); the 8-letter "
        "forms ABCDEFGH, GHEFCDAB, BADCFEHG, HGFEDCBA are the same orders for 64-bit values.")
    bit: int | None = Field(
        default=None, ge=0, le=15,
        description="Read one bit (0 = least significant) of a 16-bit register as a bool.")
    length: int | None = Field(
        default=None, ge=1, le=MAX_REGISTERS,
        description="Length of a `string` in registers (two characters each).")

    @property
    def resolved_table(self) -> Table:
        """The table this point is read from."""
        if self.table is not None:
            return self.table
        located = modicon_table(self.address)
        if located is None:  # excluded by validation
            raise ValueError(f"address {self.address} has no table")
        return located[0]

    @property
    def start(self) -> int:
        """The 0-based address on the wire (``offset`` is the value offset of PointBase)."""
        if self.table is not None:
            return self.address
        located = modicon_table(self.address)
        if located is None:  # excluded by validation
            raise ValueError(f"address {self.address} has no table")
        return located[1]

    @property
    def data_type(self) -> DataType:
        """The decoded type: bool for bits, else ``type`` or uint16."""
        if self.type is not None:
            return self.type
        return "bool" if self.resolved_table in BIT_TABLES else "uint16"

    @property
    def byte_order(self) -> ByteOrder:
        """The byte order, ABCD unless given."""
        return self.order if self.order is not None else "ABCD"

    @property
    def count(self) -> int:
        """Registers (or bits, in coil and discrete tables) the point occupies."""
        if self.resolved_table in BIT_TABLES or self.bit is not None:
            return 1
        return register_count(self.data_type, self.length)

    @property
    def value_kind(self) -> Literal["bool", "number", "string"]:
        """What the decoded value is."""
        if self.bit is not None or self.data_type == "bool":
            return "bool"
        return "string" if self.data_type == "string" else "number"

    def value_type(self) -> ValueType | None:
        """What the decoded type gives (a bit is a bool), unless an enum or a scale decides."""
        mapped = super().value_type()
        if mapped is not None:
            return mapped
        return "bool" if self.bit is not None else value_type_of(self.data_type)

    @model_validator(mode="after")
    def _consistent(self) -> ModbusPoint:
        table = self.table
        if table is None:
            located = modicon_table(self.address)
            if located is None:
                raise field_error(
                    "address",
                    "a Modicon address needs its table prefix: 1xxxx discrete input, "
                    "3xxxx input register, 4xxxx holding register (or 6-digit 1xxxxx, 3xxxxx, "
                    "4xxxxx); for a coil, or a 0-based offset, give `table`",
                    self.address)
            table = located[0]
        elif self.address >= ADDRESS_SPACE:
            raise field_error("address", f"with `table` the address is a 0-based offset 0.."
                        f"{ADDRESS_SPACE - 1}", self.address)
        data_type = self.type
        if table in BIT_TABLES:
            if data_type not in (None, "bool"):
                raise field_error("type", f"a {table} holds one bit: its type is bool", data_type)
            register_only = {"bit": self.bit, "order": self.order, "length": self.length}
            for key, value in register_only.items():
                if value is not None:
                    raise field_error(key, f"`{key}` applies to registers, not to a {table}", value)
        else:
            if data_type == "bool" and self.bit is None:
                raise field_error("type", "bool needs a coil or discrete table; for one bit of a "
                            "register give `bit`", data_type)
            if self.bit is not None and data_type not in (None, "bool", "uint16", "int16"):
                raise field_error("bit", f"a bit is read from a 16-bit register, not from "
                            f"{data_type}", self.bit)
            if data_type == "string" and self.length is None:
                raise field_error("length", "a string needs `length` in registers")
            if data_type != "string" and self.length is not None:
                raise field_error("length", "`length` applies to strings only", self.length)
            if data_type == "string" and self.order is not None \
                    and parse_order(self.order).swap_words:
                raise field_error("order", "a string accepts byte order ABCD or BADC only",
                            self.order)
        end = self.start + self.count
        if end > ADDRESS_SPACE:
            raise field_error("address", f"the point's {self.count} registers end past the last "
                        f"address ({table} offset {end - 1} > {ADDRESS_SPACE - 1})",
                        self.address)
        if self.writable and table in ("input", "discrete"):
            kind = "registers" if table == "input" else "inputs"
            raise field_error(
                "writable", f"{table} {kind} are read-only: `writable` applies to coils and "
                "holding registers", self.writable)
        if self.writable and self.scale == 0.0:
            raise field_error("scale", "a writable point needs a non-zero scale", self.scale)
        kind = self.value_kind
        if kind != "number" and self.enum is None and (
            self.scale != 1.0 or self.offset != 0.0 or self.round is not None
        ):
            raise field_error("scale", f"scale, offset and round apply to numbers, not to a {kind}",
                        self.scale)
        return self


class SerialSettings(StrictModel):
    """Serial line settings for `transport: rtu`."""

    port: PlainText = Field(description="Serial device, e.g. `/dev/ttyUSB0`.")
    baudrate: int = Field(default=9600, gt=0, description="Bits per second.")
    parity: Literal["N", "E", "O"] = Field(
        default="N", description="`N` none, `E` even, `O` odd.")
    bytesize: Literal[7, 8] = Field(default=8, description="Data bits per character.")
    stopbits: Literal[1, 2] = Field(default=1, description="Stop bits.")


class ModbusDevice(DeviceBase):
    """One Modbus unit (slave) behind a source, polled on its own schedule."""

    unit: int = Field(
        default=1, ge=0, le=247,
        description="Unit id (slave address) 0..247; 0 only over TCP, where it is common "
        "for devices that ignore it.")
    interval: Duration = Field(default=1.0, gt=0, description="Poll interval.")
    points: Sequence[ModbusPoint] = Field(
        default_factory=list,
        description="Points added to (or replacing, by name) the profile's.")


class ModbusProfile(ProfileBase):
    """A register map of one device model, instantiated by devices with `profile:`."""

    protocol: Literal["modbus"] = Field(description="Always `modbus`.")
    points: Sequence[ModbusPoint] = Field(
        default_factory=list, description="The points of every device using this profile.")


class ModbusSourceConfig(DeviceSourceBase):
    """A Modbus connection (TCP, RTU over TCP, or RTU on a serial line) and its devices."""

    protocol: Literal["modbus"] = Field(description="Always `modbus`.")
    transport: Literal["tcp", "rtu-over-tcp", "rtu"] = Field(
        default="tcp",
        description="`tcp` (Modbus TCP), `rtu-over-tcp` (RTU frames through a TCP serial "
        "server) or `rtu` (a local serial line).")
    host: PlainText | None = Field(
        default=None, description="Host name or address; required for tcp and rtu-over-tcp.")
    port: int = Field(default=502, ge=1, le=65535, description="TCP port.")
    serial: SerialSettings | None = Field(
        default=None, description="Serial line settings; required for rtu.")
    timeout: Duration = Field(
        default=1.0, gt=0, description="Wait this long for each answer (and for connecting).")
    retries: int = Field(
        default=2, ge=0, le=10,
        description="Repeat an unanswered request this often before its points turn bad.")
    max_gap: int = Field(
        default=10, ge=0, le=MAX_BITS,
        description="Read through gaps of up to this many unused registers (or bits) to save "
        "requests. A request a device refuses for an address inside it (exception 2 or 3) is "
        "split until only the refused points are left, and the device is polled around them "
        "from then on, so only those points are `bad`. 0 reads only what points use.")
    max_registers: int = Field(
        default=MAX_REGISTERS, ge=1, le=MAX_REGISTERS,
        description="At most this many registers per request (some devices allow fewer).")
    max_bits: int = Field(
        default=MAX_BITS, ge=1, le=MAX_BITS, description="At most this many bits per request.")
    devices: Sequence[ModbusDevice] = Field(
        default_factory=list, description="Units polled through this connection.")

    @model_validator(mode="after")
    def _transport_settings(self) -> ModbusSourceConfig:
        if self.transport == "rtu":
            if self.serial is None:
                raise field_error("serial", "transport rtu needs `serial` settings")
            for key in ("host", "port"):
                if key in self.model_fields_set:
                    raise field_error(key, f"`{key}` applies to tcp and rtu-over-tcp; rtu uses "
                                "`serial`", getattr(self, key))
        else:
            if self.host is None:
                raise field_error("host", f"transport {self.transport} needs `host`")
            if self.serial is not None:
                raise field_error("serial", "`serial` applies to transport rtu only")
        errors: list[InitErrorDetails] = []
        seen: dict[int, str] = {}
        for index, device in enumerate(self.devices):
            if device.unit == 0 and self.transport != "tcp":
                errors.append(InitErrorDetails(
                    type=PydanticCustomError(
                        "modbus", "unit 0 is the broadcast address on a serial bus: reads "
                        "get no answer"),
                    loc=("devices", index, "unit"), input=device.unit))
            if device.unit in seen:
                errors.append(InitErrorDetails(
                    type=PydanticCustomError(
                        "modbus", "unit id {unit} is used twice on this source (also by "
                        "device '{other}')", {"unit": device.unit, "other": seen[device.unit]}),
                    loc=("devices", index, "unit"), input=device.unit))
            else:
                seen[device.unit] = device.id
        if errors:
            raise ValidationError.from_exception_data("modbus", errors)
        return self

    def endpoint(self) -> str:
        """``tcp://host:502``, ``rtu+tcp://host:4001`` or ``rtu:///dev/ttyUSB0@9600``."""
        if self.serial is not None:
            return f"rtu://{self.serial.port}@{self.serial.baudrate}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        scheme = "tcp" if self.transport == "tcp" else "rtu+tcp"
        return f"{scheme}://{host}:{self.port}"
