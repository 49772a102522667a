"""The inverse of a point's transform, for writes: an engineering value to the raw value.

Every protocol that writes compiles its points' inverse here, so a value is refused with the
same error and the same message whatever the protocol: an enum label becomes its key, scale
and offset are undone, a non-finite number is refused, and the raw value is checked against
what the protocol writes (a bit, a whole number, any number, a string). What fits the wire
type (the range of an int16, the length of a string) is the protocol's encoder's to check.

Imports ``bridge.config.models``, ``bridge.core.model`` and ``bridge.errors``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from bridge.config.models import PointBase
from bridge.core.model import Value
from bridge.errors import ErrorCategory, WriteError

RawKind = Literal["bool", "integer", "number", "string"]
"""What the protocol writes for a point: a bit, a whole number, any number or a string."""

InverseTransform = Callable[[Value], Value]
"""An engineering value to the raw value to write; raises ``WriteError`` (``config``)."""

WHOLE_TOLERANCE = 1e-6
"""How far (relative) an unscaled value may be from a whole number and still be written as
one: undoing a scale (25.5 / 0.1) leaves float noise, while a real fraction is refused."""


def compile_inverse_transform(
    point_id: str, spec: PointBase, *, raw: RawKind | None = None
) -> InverseTransform:
    """The callable turning a value written to ``point_id`` into its raw value.

    ``raw`` is what the protocol writes; ``None`` leaves the kind to the protocol (an OPC-UA
    node's data type is known only when it is written).
    """

    def refuse(reason: str) -> WriteError:
        return WriteError(point_id, reason, ErrorCategory.CONFIG)

    undo = _compile_undo(spec, refuse)
    check = _compile_check(raw, refuse)

    def invert(value: Value) -> Value:
        return check(value, undo(value))

    return invert


def _compile_undo(
    spec: PointBase, refuse: Callable[[str], WriteError]
) -> Callable[[Value], Value]:
    """Undo the point's enum, or its scale and offset."""
    if spec.enum is not None:
        keys: dict[str, Value] = {}
        for key, label in spec.enum.items():
            keys[label] = int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else key
        labels = ", ".join(sorted(keys))

        def unlabel(value: Value) -> Value:
            if isinstance(value, str) and value in keys:
                return keys[value]
            raise refuse(f"{value!r} is not one of the point's labels: {labels}")

        return unlabel
    scale, offset = spec.scale, spec.offset
    identity = scale == 1.0 and offset == 0.0

    def unscale(value: Value) -> Value:
        if isinstance(value, bool) or not isinstance(value, int | float):
            if identity:
                return value
            raise refuse(f"expected a number, got {value!r} (the point is scaled)")
        if not math.isfinite(value):
            raise refuse(f"cannot write {value}: not a finite number")
        return value if identity else (value - offset) / scale

    return unscale


def _compile_check(
    kind: RawKind | None, refuse: Callable[[str], WriteError]
) -> Callable[[Value, Value], Value]:
    """Check (and round, for a whole number) the raw value against what is written."""

    def anything(value: Value, raw: Value) -> Value:
        return raw

    def bit(value: Value, raw: Value) -> Value:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int | float) and raw in (0, 1):
            return bool(raw)
        raise refuse(f"expected true or false, got {value!r}")

    def number(value: Value, raw: Value) -> Value:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise refuse(f"expected a number, got {value!r}")
        return raw

    def whole(value: Value, raw: Value) -> Value:
        raw = number(value, raw)
        if isinstance(raw, float):
            nearest = round(raw)
            if abs(raw - nearest) > WHOLE_TOLERANCE * max(1.0, abs(raw)):
                raise refuse(f"{value!r} is finer than the point resolves (its raw value "
                             f"would be {raw:g})")
            return nearest
        return raw

    def text(value: Value, raw: Value) -> Value:
        if not isinstance(raw, str):
            raise refuse(f"expected a string, got {value!r}")
        return raw

    checks: dict[RawKind | None, Callable[[Value, Value], Value]] = {
        None: anything, "bool": bit, "number": number, "integer": whole, "string": text}
    return checks[kind]
