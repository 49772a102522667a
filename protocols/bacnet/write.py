"""BACnet write-back: WriteProperty at the point's priority, ``null`` relinquishing it.

The value is first taken back through the point's enum or scale/offset by the core's inverse
transform, as for every protocol; a multi-state point without an enum also takes its state
text. Then it is written as the property's type: a boolean for a binary present-value
(active is true), a whole number for a multi-state one, a number for an analog one.
"""

from __future__ import annotations

from collections.abc import Mapping

from bacpypes3.apdu import ErrorRejectAbortNack
from bacpypes3.app import Application
from bacpypes3.pdu import Address
from bacpypes3.primitivedata import Null, ObjectIdentifier

from bridge.core.inverse import RawKind, compile_inverse_transform
from bridge.core.model import Value
from bridge.errors import ErrorCategory, WriteError
from protocols.bacnet.config import BINARY, MULTI_STATE, BacnetPoint, parse_object
from protocols.bacnet.reads import DeviceGone, DeviceReader, refusal

_AUTH_CODES = frozenset({"write-access-denied", "password-failure"})


def raw_kind(spec: BacnetPoint) -> RawKind | None:
    """What is written for the point's property."""
    if spec.property != "present-value":
        return None
    kind = spec.object_type
    if kind in BINARY:
        return "bool"
    if kind in MULTI_STATE:
        return "integer"
    if kind.startswith("analog") or kind in ("accumulator", "large-analog-value"):
        return "number"
    return None


async def write_point(app: Application, reader: DeviceReader, address: Address, point_id: str,
                      spec: BacnetPoint, value: Value,
                      state_text: Mapping[ObjectIdentifier, list[str]]) -> None:
    """Write ``value`` (engineering units) to the point's property at its priority."""
    object_id = parse_object(spec.object)
    raw: object
    if value is None:
        raw = Null(())
    else:
        texts = state_text.get(object_id)
        if isinstance(value, str) and spec.enum is None and texts and value in texts:
            value = texts.index(value) + 1
        converted = compile_inverse_transform(point_id, spec, raw=raw_kind(spec))(value)
        raw = int(converted) if isinstance(converted, bool) else converted
    try:
        answer = await reader.call(address, app.write_property(
            address, object_id, spec.property, raw, priority=spec.priority))
    except DeviceGone as gone:
        raise WriteError(point_id, gone.reason, ErrorCategory.TRANSIENT) from None
    except ErrorRejectAbortNack as error:
        answer = error
    except (TypeError, ValueError) as exc:
        raise WriteError(point_id, f"{value!r} cannot be written to {spec.address}: {exc}",
                         ErrorCategory.CONFIG) from None
    if isinstance(answer, ErrorRejectAbortNack):
        reason = refusal(answer)
        if reason == "no-response":
            raise WriteError(point_id, f"no answer from {address}", ErrorCategory.TRANSIENT)
        category = ErrorCategory.AUTH if reason in _AUTH_CODES else ErrorCategory.DEVICE
        raise WriteError(point_id, f"the device refused the write of {spec.address}: {reason}",
                         category)
    if isinstance(answer, str):
        raise WriteError(point_id, f"{spec.address}: {answer.strip('-')}", ErrorCategory.CONFIG)
