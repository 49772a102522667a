"""OPC-UA write-back: an engineering value turned into the variant a node's data type takes,
and written.

The value is first taken back through the point's enum or scale/offset by the core's inverse
transform (the same for every protocol), then coerced to the
node's DataType (read at the time of the write): integers within the type's range, floats,
booleans and strings; anything else is refused with a ``WriteError`` that says why.
"""

from __future__ import annotations

import math
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds

from bridge.config.models import PointBase
from bridge.core.inverse import compile_inverse_transform
from bridge.core.model import Value
from bridge.errors import ConnectorError, ErrorCategory, WriteError
from protocols.opcua.session import translated

_INTEGER_RANGES: dict[ua.VariantType, tuple[int, int]] = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}


async def write_node(client: Client, endpoint: str, node_id: ua.NodeId, point_id: str,
                     spec: PointBase, value: Value) -> None:
    """Write an engineering value of point ``point_id`` to its node, as the node's type."""
    raw = compile_inverse_transform(point_id, spec)(value)
    try:
        with translated(endpoint, "write"):
            variant_type = await client.get_node(node_id).read_data_type_as_variant_type()
            variant = ua.Variant(coerce(point_id, raw, variant_type), variant_type)
            results = await client.uaclient.write_attributes(
                [node_id], [ua.DataValue(variant)], AttributeIds.Value)
    except ConnectorError as exc:
        raise WriteError(point_id, exc.reason, exc.category) from exc
    status = results[0]
    if not status.is_good():
        category = (ErrorCategory.AUTH if status.name == "BadUserAccessDenied"
                    else ErrorCategory.DEVICE)
        raise WriteError(point_id, f"the server refused the write: {status.name}", category)


def coerce(point_id: str, value: Value, variant_type: ua.VariantType) -> Any:
    """``value`` as the node's data type needs it, or ``WriteError`` saying why not."""
    if variant_type is ua.VariantType.Boolean:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
    elif variant_type in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[variant_type]
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and math.isfinite(value) and abs(
                value - round(value)) < 1e-9:
            number = round(value)
        if number is not None:
            if not low <= number <= high:
                raise WriteError(point_id, f"{value} is outside the range of "
                                 f"{variant_type.name} ({low}..{high})", ErrorCategory.CONFIG)
            return number
    elif variant_type in (ua.VariantType.Float, ua.VariantType.Double):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif variant_type is ua.VariantType.String:
        if isinstance(value, str):
            return value
    else:
        raise WriteError(point_id, f"writing {variant_type.name} nodes is not supported",
                         ErrorCategory.CONFIG)
    raise WriteError(point_id, f"{value!r} cannot be written to a {variant_type.name} node",
                     ErrorCategory.CONFIG)
