"""The protocol-independent half of the mapping engine, compiled once per point.

A protocol's mapper extracts a raw value for a point (decoding registers, evaluating JMESPath,
reading a variant) and hands it to the point's ``PointProgram``, which applies enum or
scale/offset/round and report-by-exception, and stamps the normalized event.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

from bridge.config.models import PointBase, ReportSpec, ResolvedPoint
from bridge.core.model import Event, Quality, Value, message_event_id, new_event_id
from bridge.errors import DecodeError

Transform = Callable[[Any], Value]

_NUMBERS = frozenset({int, float})


def _is_number(value: Value) -> TypeGuard[int | float]:
    """An int or float but not a bool; the exact types are checked first, as they are common."""
    return type(value) in _NUMBERS or (isinstance(value, int | float)
                                       and not isinstance(value, bool))


def compile_transform(spec: PointBase) -> Transform:
    """One callable applying the point's enum or scale, offset and rounding."""
    if spec.enum is not None:
        return _enum_transform(spec.enum)
    scale, offset, digits = spec.scale, spec.offset, spec.round
    identity = scale == 1.0 and offset == 0.0

    def number(raw: Any) -> Value:
        # The common case first: exactly an int, or a finite float (bool is not ``int`` here).
        kind = type(raw)
        if kind is int or (kind is float and math.isfinite(raw)):
            known: int | float = raw
            if identity:
                return known if digits is None else round(known, digits)
            return _scaled(known)
        if isinstance(raw, bool) or raw is None or isinstance(raw, str):
            if identity and digits is None:
                return raw
            raise DecodeError(f"cannot scale a {type(raw).__name__} value {raw!r}")
        if not isinstance(raw, int | float):
            raise DecodeError(f"expected a number, got {type(raw).__name__}")
        if isinstance(raw, float) and not math.isfinite(raw):
            raise DecodeError(f"value is {raw}")
        if identity:
            return raw if digits is None else round(raw, digits)
        return _scaled(raw)

    def _scaled(raw: int | float) -> Value:
        try:
            plain = raw * scale + offset
        except OverflowError:  # an integer past a float's range
            raise DecodeError(f"the raw value times scale {scale:g} is out of a number's "
                              "range") from None
        if not math.isfinite(plain):
            # 1.1e308 times 10 is infinite: no event may carry it as a good value.
            raise DecodeError(f"the raw value {raw:.6g} times scale {scale:g} plus offset "
                              f"{offset:g} is not a finite number")
        return plain if digits is None else round(plain, digits)

    return number


def _enum_transform(labels: Mapping[int | str, str]) -> Transform:
    table: dict[Any, str] = {}
    for key, label in labels.items():
        table[key] = label
        if isinstance(key, str) and key.lstrip("-").isdigit():
            table[int(key)] = label

    def lookup(raw: Any) -> Value:
        key = int(raw) if isinstance(raw, bool) else raw
        if isinstance(key, float) and key.is_integer():
            key = int(key)
        try:
            return table[key]
        except (KeyError, TypeError):
            raise DecodeError(f"value {raw!r} is not in the enum map") from None

    return lookup


class PointProgram:
    """A point, compiled: transform, report-by-exception state, and event identity."""

    __slots__ = (
        "_deadband",
        "_heartbeat",
        "_last_quality",
        "_last_reported",
        "_last_value",
        "_max_value_bytes",
        "_on_change",
        "_percent",
        "_transform",
        "bridge_id",
        "point_id",
        "protocol",
        "source",
        "suppressed",
        "tags",
        "unit",
    )

    def __init__(self, point: ResolvedPoint, *, protocol: str, bridge_id: str) -> None:
        self.point_id = point.id
        self.source = point.source
        self.protocol = protocol
        self.bridge_id = bridge_id
        self.unit = point.spec.unit
        self.tags: Mapping[str, str] = dict(point.tags)
        self._transform = compile_transform(point.spec)
        self._max_value_bytes = point.max_value_bytes
        report: ReportSpec = point.report
        self._on_change = report.on_change
        self._deadband = report.deadband
        self._percent = report.deadband_percent
        self._heartbeat = report.heartbeat
        self._last_value: Value = None
        self._last_quality: Quality | None = None
        self._last_reported = 0.0
        self.suppressed = 0
        """Readings not reported because the value did not change enough."""

    def produce(
        self,
        raw: Any,
        *,
        received_at: float,
        ts: float | None = None,
        quality: Quality = Quality.GOOD,
        reason: str | None = None,
        message_id: str | None = None,
    ) -> Event | None:
        """The event for one raw value, or ``None`` when report-by-exception suppresses it.

        With the upstream ``message_id`` the event id is derived from it (stable across
        re-delivery); otherwise it is a fresh time-ordered id.
        """
        value: Value = None
        if quality is not Quality.BAD:
            try:
                value = self._transform(raw)
            except DecodeError as exc:
                quality, reason, value = Quality.BAD, exc.reason, None
            else:
                # Characters are at most 4 bytes: only a long string is encoded to count.
                if type(value) is str and len(value) * 4 > self._max_value_bytes:
                    size = len(value.encode("utf-8", "surrogatepass"))
                    if size > self._max_value_bytes:
                        quality, value = Quality.BAD, None
                        reason = (f"a string of {size:,} bytes is larger than "
                                  f"max_value_bytes ({self._max_value_bytes:,})")
        if self._on_change and not self._changed(value, quality, received_at):
            self.suppressed += 1
            return None
        self._last_value = value
        self._last_quality = quality
        self._last_reported = received_at
        return Event(
            id=(new_event_id() if message_id is None
                else message_event_id(self.source, message_id, self.point_id)),
            source=self.source,
            point=self.point_id,
            value=value,
            unit=self.unit,
            quality=quality,
            ts=ts if ts is not None else received_at,
            received_at=received_at,
            protocol=self.protocol,
            bridge=self.bridge_id,
            tags=self.tags,
            reason=reason,
        )

    def bad(self, reason: str, *, received_at: float, ts: float | None = None,
            message_id: str | None = None) -> Event | None:
        """A ``bad`` event (device exception, decode failure, unreachable device)."""
        return self.produce(None, received_at=received_at, ts=ts, quality=Quality.BAD,
                            reason=reason, message_id=message_id)

    def _changed(self, value: Value, quality: Quality, now: float) -> bool:
        if self._last_quality is None or quality is not self._last_quality:
            return True
        if self._heartbeat is not None and now - self._last_reported >= self._heartbeat:
            return True
        last = self._last_value
        if _is_number(value) and _is_number(last):
            difference = abs(value - last)
            if self._deadband is not None:
                return difference > self._deadband
            if self._percent is not None:
                return difference > abs(last) * self._percent / 100.0
            return difference != 0
        return value != last
