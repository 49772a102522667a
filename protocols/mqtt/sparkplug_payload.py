"""Sparkplug B metrics as protobuf: datatypes, values and properties, both ways.

What a metric's birth declares and what its data carries (``birth_metric``, ``set_value``,
``set_properties``), the datatype a value needs (``datatype_of``, ``fits``), and a command
metric's value as Fieldbridge takes it (``command_value``). The edge node's state and its
messages are ``protocols.mqtt.sparkplug``'s.

Datatypes:

- a point whose configuration fixes its type: ``bool`` Boolean, ``integer`` Int64 (UInt64
  for a value above 2^63 - 1, a Modbus ``uint64`` say), ``number`` Double, ``string`` String;
- otherwise the value tells: an integer is an Int64 (UInt64 above 2^63 - 1), any other number
  a Double, text a String. A Double metric keeps taking integers it holds exactly (up to
  2^53), so a value that goes 21.5, 22, 22.5 does not flip its datatype; one it cannot hold
  exactly makes it an Int64 or UInt64 (a new birth), so 64-bit integers arrive unrounded;
- a point with neither a type nor a value yet is born a Double, ``is_null``.

Quality is the property ``Quality`` (Int32), with the OPC DA codes Ignition and Eclipse Tahu
use: 192 good, 64 uncertain, 0 bad. A metric without a value is sent ``is_null``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from bridge.config.models import ValueType
from bridge.core.model import Quality, Value
from protocols.mqtt.sparkplug_b_pb2 import DataType, Payload

UNIT_PROPERTY = "engUnit"
"""The property that carries a metric's engineering unit (Ignition's name for it)."""
QUALITY_PROPERTY = "Quality"
"""The property that carries a metric's quality."""
QUALITY_CODES: Mapping[Quality, int] = {Quality.GOOD: 192, Quality.UNCERTAIN: 64,
                                        Quality.BAD: 0}
"""OPC DA quality codes, as Ignition and Eclipse Tahu read the ``Quality`` property."""

DATATYPES: Mapping[ValueType, int] = {
    "bool": DataType.Boolean, "integer": DataType.Int64, "number": DataType.Double,
    "string": DataType.String,
}
"""The Sparkplug datatype of each Fieldbridge value type."""
UNTYPED = DataType.Double
"""The datatype of a point whose type nothing tells yet (no configured type, no value)."""

INT64_RANGE = (-(1 << 63), (1 << 63) - 1)
UINT64_RANGE = (0, (1 << 64) - 1)
EXACT_IN_DOUBLE = 1 << 53
"""Integers up to this magnitude are exact in a Double."""
_SIGNED_BITS: Mapping[int, int] = {DataType.Int8: 8, DataType.Int16: 16, DataType.Int32: 32,
                                   DataType.Int64: 64}
_UNSIGNED = frozenset({DataType.UInt8, DataType.UInt16, DataType.UInt32, DataType.UInt64})


class CommandError(ValueError):
    """A command the edge node cannot carry out; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class Metric:
    """A point as a metric of its device: what its birth declares and its last value."""

    point: str
    alias: int
    datatype: int
    unit: str | None
    value: Value = None
    quality: Quality | None = None
    """``None`` until the point has a value (or a bad reading)."""
    ts: float | None = None


def _is_integer(value: Value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer_datatype(value: int) -> int | None:
    if INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        return DataType.Int64
    if UINT64_RANGE[0] <= value <= UINT64_RANGE[1]:
        return DataType.UInt64
    return None


def datatype_of(value_type: ValueType | None, value: Value) -> int | None:
    """The datatype of a metric: from its value type (an ``integer`` above the Int64 range is
    a UInt64), else from a value; ``None`` when neither tells."""
    if value_type is not None:
        datatype = DATATYPES[value_type]
        if (datatype == DataType.Int64 and isinstance(value, int)
                and not fits(datatype, value)):
            return _integer_datatype(value) or DataType.Double
        return datatype
    if isinstance(value, bool):
        return DataType.Boolean
    if isinstance(value, int):
        return _integer_datatype(value) or DataType.Double
    if isinstance(value, float):
        return DataType.Double
    if isinstance(value, str):
        return DataType.String
    return None


def fits(datatype: int, value: Value) -> bool:
    """Whether ``value`` (``None`` fits any: it is sent as ``is_null``) can be sent as
    ``datatype`` without changing it."""
    if value is None:
        return True
    if datatype == DataType.Boolean:
        return isinstance(value, bool)
    if datatype in (DataType.Int64, DataType.UInt64):
        bounds = INT64_RANGE if datatype == DataType.Int64 else UINT64_RANGE
        return _is_integer(value) and bounds[0] <= int(value) <= bounds[1]
    if datatype == DataType.Double:
        if _is_integer(value):
            return abs(int(value)) <= EXACT_IN_DOUBLE
        return isinstance(value, float)
    return datatype == DataType.String and isinstance(value, str)


def milliseconds(seconds: float) -> int:
    """POSIX seconds as Sparkplug's milliseconds since 1970."""
    return round(seconds * 1000)


def birth_metric(metric: Metric) -> Payload.Metric:
    """The metric as a birth declares it: name, alias, datatype, value (``is_null`` without
    one), timestamp, unit and quality."""
    data = Payload.Metric(name=metric.point, alias=metric.alias, datatype=metric.datatype)
    if metric.ts is not None:
        data.timestamp = milliseconds(metric.ts)
    set_value(data, metric.datatype, metric.value)
    set_properties(data, metric.unit, metric.quality)
    return data


def set_value(data: Payload.Metric, datatype: int, value: Value) -> None:
    """Put ``value`` into ``data`` as ``datatype`` (``is_null`` for ``None``)."""
    if value is None:
        data.is_null = True
    elif datatype == DataType.Boolean:
        data.boolean_value = bool(value)
    elif datatype == DataType.Int64:
        data.long_value = int(value) & 0xFFFF_FFFF_FFFF_FFFF  # two's complement, as Tahu
    elif datatype == DataType.UInt64:
        data.long_value = int(value)
    elif datatype == DataType.Double:
        data.double_value = float(value)
    else:
        data.string_value = str(value)


def set_properties(data: Payload.Metric, unit: str | None, quality: Quality | None) -> None:
    """Add the ``engUnit`` and ``Quality`` properties that are known."""
    properties = data.properties
    if unit is not None:
        properties.keys.append(UNIT_PROPERTY)
        properties.values.append(Payload.PropertyValue(type=DataType.String, string_value=unit))
    if quality is not None:
        properties.keys.append(QUALITY_PROPERTY)
        properties.values.append(Payload.PropertyValue(type=DataType.Int32,
                                                       int_value=QUALITY_CODES[quality]))


def metric_label(metric: Payload.Metric) -> str:
    """How a message names a metric: its name, else its alias."""
    return repr(metric.name) if metric.HasField("name") else f"with alias {metric.alias}"


def command_value(data: Payload.Metric, datatype: int) -> Value:
    """A command metric's value as Fieldbridge takes it; ``CommandError`` when it carries
    none, or one of a kind ``datatype`` does not take."""
    kind = data.WhichOneof("value")
    if data.is_null or kind is None:
        raise CommandError(f"metric {metric_label(data)} carries no value")
    if datatype in _SIGNED_BITS and kind in ("int_value", "long_value"):
        bits = _SIGNED_BITS[datatype]
        raw = data.int_value if kind == "int_value" else data.long_value
        raw &= (1 << bits) - 1
        return raw - (1 << bits) if raw >= 1 << (bits - 1) else raw
    if datatype in _UNSIGNED and kind in ("int_value", "long_value"):
        return data.int_value if kind == "int_value" else data.long_value
    if datatype in (DataType.Float, DataType.Double) and kind in ("float_value",
                                                                   "double_value"):
        number = data.float_value if kind == "float_value" else data.double_value
        if not math.isfinite(number):
            raise CommandError(f"metric {metric_label(data)}: {number} is not a finite number")
        return number
    if datatype == DataType.Boolean and kind == "boolean_value":
        return data.boolean_value
    if datatype in (DataType.String, DataType.Text) and kind == "string_value":
        return data.string_value
    raise CommandError(f"metric {metric_label(data)}: a {kind.removesuffix('_value')} value "
                       f"as datatype {datatype_name(datatype)} is not supported")


def datatype_name(datatype: int) -> str:
    """The datatype's name in the Sparkplug schema (its number when it has none)."""
    try:
        return DataType.Name(datatype)
    except ValueError:
        return str(datatype)
