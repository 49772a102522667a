"""The message mapper: payloads of the message protocols (MQTT and AMQP) in, events out.

A message point is a *template*: its name and tags may hold ``{placeholders}`` filled, per
message, from the topic or routing-key segments the point names (``sensors/{site}/{device}``),
from protocol metadata (``{topic}``, ``{routing_key}``, ``{headers.NAME}``) and, for points
that fan out over a JSON list with ``each``, from the list item (``{item.FIELD}``,
``{index}``). The configured (resolved) point id of a templated point is the template string
itself, e.g. ``{site}.{device}.temperature``; events carry the expanded id, e.g.
``north.boiler-1.temperature``. Each expanded id gets its own compiled ``PointProgram`` (its
own report-by-exception state) on first sight, up to ``max_points`` per source.

Payload formats: ``json`` (a JMESPath ``path`` picks the value; ``each`` fans out over a list),
``text``, ``number`` and ``binary`` (decoded by ``bridge.core.codec`` with the same type and byte
order vocabulary as Modbus registers).

What goes wrong, and what happens:

* the payload as a whole cannot be read (invalid JSON or UTF-8, not a number, wrong binary
  length), or no configured point matches the address: ``DecodeError`` naming the topic or
  routing key; the runtime counts the message as rejected and settles it upstream (AMQP:
  dead-lettered when configured);
* a ``path`` finds nothing, or finds an object or a list: a ``bad`` event for that point, with
  the reason, counted in the source's ``bad_values`` counter;
* a payload timestamp is missing or unreadable: the event carries the receive time, quality
  ``uncertain`` and the reason;
* a placeholder cannot be filled (a header is missing), an expanded id is not a valid point id,
  is already produced by another template, or would exceed ``max_points``: that point is
  skipped and counted in ``dropped_points``, with the reason in ``details.last_dropped_point``.

May import: ``bridge.config``, ``bridge.errors`` and the ``bridge.core`` modules below the
sources (codec, mapping, model, status, templates, message points and values).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jmespath

from bridge.config.models import ResolvedPoint
from bridge.core.codec import compile_bytes_decoder, register_count
from bridge.core.counters import BAD_VALUES, DROPPED_POINTS, Counts
from bridge.core.mapping import PointProgram
from bridge.core.message_points import MessagePoint, TimestampSpec
from bridge.core.message_values import convert, payload_timestamp, quoted
from bridge.core.model import Event, Quality, Reading
from bridge.core.status import EndpointStatus
from bridge.core.templates import POINT_ID, POINT_ID_MAX, AddressPattern, Template
from bridge.errors import DecodeError

logger = logging.getLogger(__name__)

NEW_POINTS_PER_MESSAGE = 1_000
"""Point ids one message may create from templates: a payload with a million list items
must not take all of ``max_points`` (they stay taken until the source restarts)."""


class _PointError(Exception):
    """One point of a message cannot be produced; the rest of the message can."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Payload:
    """One message body, parsed lazily and at most once per format."""

    __slots__ = ("_document", "_parsed", "_text", "raw", "where")

    def __init__(self, raw: Any, where: str) -> None:
        self.raw: bytes = raw.encode() if isinstance(raw, str) else bytes(raw)
        self.where = where
        self._text: str | None = None
        self._parsed = False
        self._document: Any = None

    def text(self) -> str:
        if self._text is None:
            try:
                self._text = self.raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DecodeError(f"{self.where}: payload is not UTF-8 text (byte {exc.start})"
                                  ) from None
        return self._text

    def json(self) -> Any:
        if not self._parsed:
            if not self.raw.strip():
                raise DecodeError(f"{self.where}: empty payload, expected JSON")
            try:
                self._document = json.loads(self.raw)
            except (ValueError, RecursionError) as exc:
                raise DecodeError(f"{self.where}: invalid JSON: {exc}") from None
            self._parsed = True
        return self._document

    def number(self) -> int | float:
        text = self.text().strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise DecodeError(f"{self.where}: payload {quoted(text)} is not a number"
                              ) from None



@dataclass(slots=True)
class _Extracted:
    raw: Any
    problem: str | None = None
    ts: float | None = None
    ts_problem: str | None = None
    variables: Mapping[str, str] | None = None



def _variable_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    return None


class Route:
    """One configured message point, compiled: address pattern, extraction and templates."""

    def __init__(self, point: ResolvedPoint, pattern: AddressPattern,
                 timestamp: TimestampSpec | None = None) -> None:
        spec = point.spec
        if not isinstance(spec, MessagePoint):
            raise TypeError(f"point {point.id} is not a message point")
        self.point = point
        self.spec = spec
        self.pattern = pattern
        self.id_template = Template.parse(point.id)
        self.tag_templates = {key: Template.parse(value) for key, value in point.tags.items()}
        self.format = spec.format
        self.path = jmespath.compile(spec.path) if spec.path is not None else None
        self.each = jmespath.compile(spec.each) if spec.each is not None else None
        self.timestamp = spec.timestamp or (timestamp if spec.format == "json" else None)
        self.timestamp_path = (jmespath.compile(self.timestamp.path)
                               if self.timestamp is not None else None)
        self.declared = spec.type if spec.format != "binary" else None
        self.decode: Callable[[bytes], Any] | None = None
        self.size: int | None = None
        if spec.format == "binary":
            register_type = spec.register_type()
            self.decode = compile_bytes_decoder(register_type, spec.order, length=spec.length)
            if register_type == "bool":
                self.size = 1
            elif register_type == "string":
                self.size = spec.length
            else:
                self.size = 2 * register_count(register_type)

    def extract(self, payload: _Payload) -> list[_Extracted]:
        """The raw values this point finds in ``payload``.

        Raises ``DecodeError`` when the payload as a whole is unreadable and ``_PointError``
        when this point alone cannot be produced.
        """
        if self.format == "text":
            return [self._declared(_Extracted(payload.text().strip()))]
        if self.format == "number":
            return [self._declared(_Extracted(payload.number()))]
        if self.format == "binary":
            return [_Extracted(self._binary(payload))]
        document = payload.json()
        if self.each is None:
            return [self._declared(self._json_value(document, document, None))]
        items = self.each.search(document)
        if not isinstance(items, list):
            found = "nothing" if items is None else f"a {type(items).__name__}"
            raise _PointError(f"`each` {self.spec.each!r} found {found}, expected a list")
        extracted = []
        for index, item in enumerate(items):
            variables = {"index": str(index)}
            if isinstance(item, dict):
                for key, value in item.items():
                    text = _variable_text(value)
                    if text is not None:
                        variables[f"item.{key}"] = text
            extracted.append(self._declared(self._json_value(document, item, variables)))
        return extracted

    def _declared(self, extracted: _Extracted) -> _Extracted:
        """``extracted`` converted to the point's declared ``type``, or with the problem."""
        if self.declared is None or extracted.problem is not None:
            return extracted
        try:
            extracted.raw = convert(extracted.raw, self.declared)
        except ValueError as exc:
            extracted.problem = str(exc)
        return extracted

    def _binary(self, payload: _Payload) -> Any:
        assert self.decode is not None
        raw = payload.raw
        offset = self.spec.byte_offset
        if offset is not None:
            end = len(raw) if self.size is None else offset + self.size
            if end > len(raw) or offset >= len(raw):
                raise DecodeError(f"{payload.where}: binary payload of {len(raw)} bytes is too "
                                  f"short for {self.spec.type} at offset {offset}")
            raw = raw[offset:end]
        try:
            return self.decode(raw)
        except DecodeError as exc:
            raise DecodeError(f"{payload.where}: binary payload of {len(payload.raw)} bytes: "
                              f"{exc.reason}") from None

    def _json_value(self, document: Any, item: Any,
                    variables: Mapping[str, str] | None) -> _Extracted:
        value = self.path.search(item) if self.path is not None else item
        extracted = _Extracted(value, variables=variables)
        if value is None:
            extracted.problem = (f"path {self.spec.path!r} found nothing"
                                 if self.path is not None else "the value is null")
        elif isinstance(value, dict | list):
            kind = "an object" if isinstance(value, dict) else "a list"
            extracted.problem = (f"path {self.spec.path!r} found {kind}, expected a value"
                                 if self.path is not None else f"the payload is {kind}; give "
                                 "a `path` to the value")
        if self.timestamp is not None and self.timestamp_path is not None:
            scope = item if self.timestamp.on == "item" else document
            stamp = self.timestamp_path.search(scope)
            if stamp is None:
                extracted.ts_problem = (f"timestamp {self.timestamp.path!r} not found; "
                                        "receive time used")
            else:
                try:
                    extracted.ts = payload_timestamp(stamp, self.timestamp.format)
                except ValueError as exc:
                    extracted.ts_problem = (f"timestamp {self.timestamp.path!r} unreadable "
                                            f"({exc}); receive time used")
        return extracted


Variables = Callable[[Reading], Mapping[str, str]]
"""Protocol metadata of a reading as placeholder values (``topic``, ``headers.NAME``)."""


def _no_variables(reading: Reading) -> Mapping[str, str]:
    return {}


class MessageMapper:
    """The compiled mapping of one message source: payloads in, events out."""

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        protocol: str,
        bridge_id: str,
        address_label: str,
        max_points: int,
        variables: Variables = _no_variables,
    ) -> None:
        self.routes = list(routes)
        self.protocol = protocol
        self.bridge_id = bridge_id
        self.address_label = address_label
        """How the address is named in reasons: ``topic`` or ``routing key``."""
        self.max_points = max_points
        self._variables = variables
        self._own_counters = Counts()
        self._own_details: dict[str, Any] = {}
        self._status: EndpointStatus | None = None
        self._programs: dict[str, tuple[Route, PointProgram]] = {}
        self._dynamic = 0
        self._created = 0
        """Point ids created by the message being mapped."""
        self._cap_logged = False
        for route in self.routes:
            if route.id_template.is_static:
                self._programs[route.point.id] = (route, self._compile(route, route.point.id,
                                                                       dict(route.point.tags)))

    def attach(self, status: EndpointStatus) -> None:
        """Report into ``status`` from now on (called by the framework when it makes the
        source's status, ``SourceUnit.attach``); what was counted before is carried over."""
        if status is self._status:
            return
        status.counters.update(self.counters)
        status.details.update(self.details)
        self._status = status

    @property
    def counters(self) -> Counts:
        """What the mapping counted: the attached status's counters, or its own until then."""
        return self._own_counters if self._status is None else self._status.counters

    @property
    def details(self) -> dict[str, Any]:
        """The last bad value and dropped point: on the attached status, or its own until then."""
        return self._own_details if self._status is None else self._status.details

    @property
    def point_count(self) -> int:
        """Distinct point ids compiled so far."""
        return len(self._programs)

    def map(self, reading: Reading) -> list[Event]:
        """Events for one message; ``DecodeError`` when the message cannot be mapped at all."""
        address = str(reading.address)
        where = f"{self.address_label} {address}"
        matched = []
        for route in self.routes:
            segments = route.pattern.match(address)
            if segments is not None:
                matched.append((route, segments))
        if not matched:
            raise DecodeError(f"{where}: no configured point matches")
        payload = _Payload(reading.value, where)
        metadata = self._variables(reading)
        received_at = reading.received_at
        message_id = reading.message_id
        events: list[Event] = []
        self._created = 0
        for route, segments in matched:
            try:
                extracted = route.extract(payload)
            except _PointError as problem:
                self._drop(route.point.id, address, problem.reason)
                continue
            for item in extracted:
                program = self._program(route, metadata, segments, item.variables, address)
                if program is None:
                    continue
                ts = item.ts if item.ts is not None else reading.ts
                if item.problem is not None:
                    self.counters.add(BAD_VALUES)
                    self.details["last_bad_value"] = {
                        "point": program.point_id, "address": address, "reason": item.problem,
                        "at": time.time()}
                    event = program.bad(item.problem, received_at=received_at, ts=ts,
                                        message_id=message_id)
                elif item.ts_problem is not None:
                    event = program.produce(item.raw, received_at=received_at, ts=ts,
                                            quality=Quality.UNCERTAIN, reason=item.ts_problem,
                                            message_id=message_id)
                else:
                    event = program.produce(item.raw, received_at=received_at, ts=ts,
                                            quality=reading.quality, reason=reading.reason,
                                            message_id=message_id)
                if event is not None:
                    events.append(event)
        return events

    def _program(
        self,
        route: Route,
        metadata: Mapping[str, str],
        segments: Mapping[str, str],
        item: Mapping[str, str] | None,
        address: str,
    ) -> PointProgram | None:
        if route.id_template.is_static:
            return self._programs[route.point.id][1]
        variables = {**metadata, **segments, **(item or {})}
        try:
            point_id = route.id_template.expand(variables)
            tags = {key: template.expand(variables)
                    for key, template in route.tag_templates.items()}
        except KeyError as exc:
            self._drop(route.point.id, address, f"no value for placeholder {{{exc.args[0]}}}")
            return None
        known = self._programs.get(point_id)
        if known is not None:
            owner, program = known
            if owner is not route:
                self._drop(route.point.id, address, f"point id '{point_id}' is already "
                           f"produced by point '{owner.point.id}'")
                return None
            return program
        if len(point_id) > POINT_ID_MAX or not POINT_ID.match(point_id):
            self._drop(route.point.id, address, f"'{quoted(point_id)}' is not a valid point "
                       "id (letters, digits, _ . : - only)")
            return None
        if self._created >= NEW_POINTS_PER_MESSAGE:
            self._drop(route.point.id, address, f"more than {NEW_POINTS_PER_MESSAGE:,} new "
                       "point ids in one message")
            return None
        if self._dynamic >= self.max_points:
            if not self._cap_logged:
                self._cap_logged = True
                logger.warning("%s source %s: more than %d point ids from templates; further "
                               "ones are dropped and counted", self.protocol,
                               route.point.source, self.max_points)
            self._drop(route.point.id, address, f"more than max_points={self.max_points} "
                       "point ids")
            return None
        program = self._compile(route, point_id, tags)
        self._programs[point_id] = (route, program)
        self._dynamic += 1
        self._created += 1
        return program

    def _compile(self, route: Route, point_id: str, tags: dict[str, str]) -> PointProgram:
        point = route.point
        resolved = ResolvedPoint(id=point_id, source=point.source, device=point.device,
                                 spec=point.spec, tags=tags, report=point.report, path=point.path,
                                 max_value_bytes=point.max_value_bytes)
        return PointProgram(resolved, protocol=self.protocol, bridge_id=self.bridge_id)

    def _drop(self, template: str, address: str, reason: str) -> None:
        self.counters.add(DROPPED_POINTS)
        self.details["last_dropped_point"] = {
            "point": template, "address": address, "reason": reason, "at": time.time()}
