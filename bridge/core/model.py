"""The contracts every part of the flow shares: readings in, events out.

``Event`` is the normalized event, declared once: each field with its type and its
description. Its published JSON form (``EventJson``, the body the store keeps, the API and the
live stream serve and the sinks publish), the JSON Schema (``bridge.core.schema``) and the
worker processes' frames all derive from that declaration.

Timestamps are POSIX seconds (float) inside the daemon and ISO 8601 UTC at every edge.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Protocol, get_args, get_origin, get_type_hints

import msgspec
import uuid_utils

Value = float | int | bool | str | None
"""A normalized point value."""


class Quality(enum.StrEnum):
    """OPC-style quality of a point value."""

    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


class Acknowledger(Protocol):
    """Settles a message upstream once its events are safe (MQTT QoS>0, AMQP)."""

    async def accept(self) -> None:
        """The message's events are stored: the upstream may forget it."""

    async def reject(self, reason: str) -> None:
        """The message cannot be mapped: dead-letter it or drop it, never redeliver forever."""


Settlement = tuple[Acknowledger, str | None]
"""An upstream message to settle once its events are stored: accept it (``None``), or reject
it with a reason."""


@dataclass(slots=True)
class Reading:
    """One raw observation from a source, before any meaning is applied.

    ``address`` is what the source was asked to serve (a Modbus block, an OPC-UA node id,
    an MQTT topic, an AMQP routing key); ``value`` is raw (registers, bits, bytes, a variant).
    """

    source: str
    address: Hashable
    value: Any
    received_at: float
    ts: float | None = None
    quality: Quality = Quality.GOOD
    reason: str | None = None
    ack: Acknowledger | None = None
    meta: Mapping[str, Any] | None = None
    message_id: str | None = None
    """The upstream's identity of the message (AMQP ``message_id``), when it gives one: the
    events of a re-delivered message then get the same ids."""


_ISO_TEXT: Final = msgspec.Meta(extra_json_schema={"format": "date-time"})
"""Marks a timestamp: POSIX seconds inside the daemon, ``isoformat`` text in the JSON."""
_NOT_PUBLISHED: Final = msgspec.Meta(extra={"published": False})
"""Marks a field the event carries inside the daemon but never publishes."""

Timestamp = Annotated[float, _ISO_TEXT]
"""POSIX seconds inside the daemon; ISO 8601 UTC with milliseconds and ``Z`` at every edge."""

class Event(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """One reading of one point, the same shape for every protocol.

    The declaration every other form derives from: the published JSON object (``to_json``,
    ``to_dict``, ``EventJson``), the JSON Schema (``bridge.core.schema``) and the worker
    frames, which carry the struct itself. Fields are in the order the JSON object lists them.
    """

    id: Annotated[str, msgspec.Meta(
        description="Unique; the same when the event is re-published, so consumers can "
        "de-duplicate on it. Time-ordered (UUIDv7 layout), or, for a message that carries an "
        "upstream identity (AMQP message_id), a UUIDv5 of source, message id and point, the "
        "same when the upstream re-delivers the message.",
        extra_json_schema={"format": "uuid"})]
    source: Annotated[str, msgspec.Meta(
        description="Id of the configured source the reading came from.")]
    point: Annotated[str, msgspec.Meta(
        description="Point id: device prefix + point name, unique within the bridge.")]
    value: Annotated[Value, msgspec.Meta(
        description="The mapped value; null when quality is bad.")]
    unit: Annotated[str | None, msgspec.Meta(
        description="Engineering unit from the mapping.")]
    quality: Annotated[Quality, msgspec.Meta(
        description="How far the value can be trusted: good, uncertain or bad.")]
    reason: Annotated[str | None, msgspec.Meta(
        description="Why the quality is not good; null when good.")] = None
    ts: Annotated[Timestamp, msgspec.Meta(
        description="Source time when the protocol gives one, else bridge time; "
        "ISO 8601 UTC.")]
    received_at: Annotated[Timestamp, msgspec.Meta(
        description="When the bridge received the reading; ISO 8601 UTC.")]
    protocol: Annotated[str, msgspec.Meta(
        description="Protocol of the source: `modbus`, `opcua`, `mqtt`, `amqp`, or the name a "
        "connector installed beside Fieldbridge registers.",
        min_length=1)]
    tags: Annotated[Mapping[str, str], msgspec.Meta(
        description="Free labels from the mapping (source, profile, device and point tags "
        "merged).")] = msgspec.field(default_factory=dict)
    bridge: Annotated[str, msgspec.Meta(
        description="Id of the bridge instance that produced the event.")]
    body: Annotated[str | None, _NOT_PUBLISHED] = None
    """The event's published JSON when it was already serialized (by a worker process), so
    the store does not serialize it again; ``None`` otherwise. Not part of the event: equality
    ignores it."""

    def __eq__(self, other: object) -> bool:
        """Events are equal when their published fields are (``body`` is not compared)."""
        if not isinstance(other, Event):
            return NotImplemented
        return _astuple(self)[:_PUBLISHED_COUNT] == _astuple(other)[:_PUBLISHED_COUNT]

    __hash__ = None  # type: ignore[assignment]  # tags are a dict: events were never hashable

    def to_json(self) -> str:
        """The published JSON object, compact: ``body`` when the event carries it."""
        body = self.body
        if body is None:
            data = _asdict(self)
            for name in _LOCAL_FIELDS:
                del data[name]
            for name in _TIMESTAMP_FIELDS:
                data[name] = isoformat(data[name])
            body = _JSON_ENCODER.encode(data).decode()
        return body

    def to_dict(self) -> dict[str, Any]:
        """The published JSON object, as plain data."""
        data: dict[str, Any] = _JSON_DECODER.decode(self.to_json())
        return data

    @classmethod
    def from_json(cls, body: str | bytes) -> Event:
        """An event back from its published JSON; ``msgspec.ValidationError`` (a
        ``ValueError``) when ``body`` is not one."""
        published = _EVENT_JSON_DECODER.decode(body)
        values = _asdict(published)
        for name in _TIMESTAMP_FIELDS:
            values[name] = parse_timestamp(values[name])
        return cls(**values)


_FieldSpec = tuple[str, Any] | tuple[str, Any, Any]
"""A field as ``msgspec.defstruct`` takes it: name, type and, if it has one, default."""


def _published_fields() -> tuple[list[_FieldSpec], tuple[str, ...], tuple[str, ...]]:
    """From ``Event``'s declaration: its published fields as ``defstruct`` wants them (each
    timestamp typed as its text), the timestamps' names, and the fields never published."""
    hints = get_type_hints(Event, include_extras=True)
    published: list[_FieldSpec] = []
    timestamps: list[str] = []
    local: list[str] = []
    for field in msgspec.structs.fields(Event):
        hint = hints[field.name]
        metadata = get_args(hint)[1:] if get_origin(hint) is Annotated else ()
        if any(meta is _NOT_PUBLISHED for meta in metadata):
            local.append(field.name)
            continue
        if local:
            raise TypeError(f"Event.{field.name}: published fields come before the others")
        if any(meta is _ISO_TEXT for meta in metadata):
            timestamps.append(field.name)
            hint = Annotated[(str, *metadata)]
        default: Any = field.default
        if field.default_factory is not msgspec.NODEFAULT:
            default = msgspec.field(default_factory=field.default_factory)
        published.append((field.name, hint) if default is msgspec.NODEFAULT
                          else (field.name, hint, default))
    return published, tuple(timestamps), tuple(local)


_PUBLISHED, _TIMESTAMP_FIELDS, _LOCAL_FIELDS = _published_fields()
_PUBLISHED_COUNT = len(_PUBLISHED)

EventJson: Any = msgspec.defstruct(
    "EventJson", _PUBLISHED, module=__name__, frozen=True, kw_only=True, gc=False,
    forbid_unknown_fields=True)
"""The published JSON object of an event, derived from ``Event``: the same fields, less those
never published, with timestamps as ISO 8601 text. Its JSON Schema is the event schema."""

_asdict = msgspec.structs.asdict
_astuple = msgspec.structs.astuple
_JSON_ENCODER = msgspec.json.Encoder()
_JSON_DECODER = msgspec.json.Decoder()
_EVENT_JSON_DECODER = msgspec.json.Decoder(EventJson)


_second_text: tuple[int, str] = (0, "1970-01-01T00:00:00.")
"""The last whole second formatted, and its text: events come many to a second."""
_last_text: tuple[float, str] = (0.0, "1970-01-01T00:00:00.000Z")
"""The last timestamp formatted, and its text: an event's ``ts`` is often its ``received_at``."""
_MILLISECONDS: Final = tuple(f"{millisecond:03d}Z" for millisecond in range(1000))


def isoformat(timestamp: float) -> str:
    """POSIX seconds as ISO 8601 UTC with millisecond precision and a ``Z``."""
    global _second_text, _last_text
    last_timestamp, last = _last_text
    if timestamp == last_timestamp:
        return last
    # Split and round as datetime.fromtimestamp does (to the microsecond, half to even).
    fraction, whole = math.modf(timestamp)
    second, microsecond = int(whole), round(fraction * 1e6)
    if microsecond >= 1_000_000:
        second, microsecond = second + 1, microsecond - 1_000_000
    elif microsecond < 0:
        second, microsecond = second - 1, microsecond + 1_000_000
    cached_second, text = _second_text
    if second != cached_second:
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second_text = (second, text)
    text += _MILLISECONDS[microsecond // 1000]
    _last_text = (timestamp, text)
    return text


def parse_timestamp(text: str) -> float:
    """ISO 8601 (``Z`` or offset; naive means UTC) to POSIX seconds."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def new_event_id() -> str:
    """A time-ordered unique id (UUIDv7): ids sort by creation, which keeps store and outbox
    indexes append-only and lets consumers de-duplicate on them.

    ``uuid_utils.uuid7`` is the Rust ``uuid`` crate's ``Uuid::now_v7``: one generator state
    per process, behind a lock, gives the ids of one millisecond a 42-bit counter (randomly
    seeded each millisecond, moving the millisecond on should it overflow) and keeps the last
    millisecond when the clock steps back. Ids made one after another in a process so sort
    strictly by creation, and no wrapper is needed (``tests/core/test_model.py`` checks it).
    """
    return str(uuid_utils.uuid7())


EVENT_ID_NAMESPACE = uuid.UUID("5a0f6c1e-2b8d-4f3a-9c71-0e4d2b6a8f15")
"""The UUIDv5 namespace of event ids derived from an upstream message identity."""


def message_event_id(source: str, message_id: str, point: str) -> str:
    """The id of ``point``'s event from one upstream message: the same on every re-delivery.

    A name-based UUID (version 5) of the source id, the upstream message id and the point id,
    so a message the upstream delivers twice (after a lost acknowledgement) yields events a
    consumer recognizes as duplicates.
    """
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{source}\x00{message_id}\x00{point}"))
