"""The contracts every part of the flow shares: readings in, events out.

Timestamps are POSIX seconds (float) inside the daemon and ISO 8601 UTC at every edge.
"""

from __future__ import annotations

import enum
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

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


@dataclass(slots=True, frozen=True)
class Event:
    """The normalized event: one shape for every protocol (see schema/event.schema.json)."""

    id: str
    source: str
    point: str
    value: Value
    unit: str | None
    quality: Quality
    ts: float
    received_at: float
    protocol: str
    bridge: str
    tags: Mapping[str, str] = field(default_factory=dict)
    reason: str | None = None
    body: str | None = field(default=None, compare=False, repr=False)
    """The event's documented JSON when it was already serialized (by a worker process), so
    the store does not serialize it again; ``None`` otherwise."""

    def to_dict(self) -> dict[str, Any]:
        """The event as the documented JSON object."""
        return {
            "id": self.id,
            "source": self.source,
            "point": self.point,
            "value": self.value,
            "unit": self.unit,
            "quality": self.quality.value,
            "reason": self.reason,
            "ts": isoformat(self.ts),
            "received_at": isoformat(self.received_at),
            "protocol": self.protocol,
            "tags": dict(self.tags),
            "bridge": self.bridge,
        }

    def to_json(self) -> str:
        """The documented JSON object, compact: ``body`` when the event carries it."""
        if self.body is not None:
            return self.body
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)


_second_text: tuple[int, str] = (0, "1970-01-01T00:00:00.")
"""The last whole second formatted, and its text: events come many to a second."""


def isoformat(timestamp: float) -> str:
    """POSIX seconds as ISO 8601 UTC with millisecond precision and a ``Z``."""
    global _second_text
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
    return f"{text}{microsecond // 1000:03d}Z"


def parse_timestamp(text: str) -> float:
    """ISO 8601 (``Z`` or offset; naive means UTC) to POSIX seconds."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


_id_lock = threading.Lock()
_id_state = [0, 0]  # last millisecond, sequence within it
_RANDOM_POOL = 4096
"""Random bytes fetched from the OS at a time: one system call per 500 ids, not two per id."""
class _RandomPool:
    """Bytes from the OS's CSPRNG, fetched ``_RANDOM_POOL`` at a time (use with ``_id_lock``
    held)."""

    def __init__(self) -> None:
        self.pool = b""
        self.used = 0

    def take(self, count: int) -> bytes:
        """The next ``count`` unused bytes."""
        if self.used + count > len(self.pool):
            self.pool, self.used = os.urandom(_RANDOM_POOL), 0
        start = self.used
        self.used = start + count
        return self.pool[start:start + count]


_random = _RandomPool()


def new_event_id() -> str:
    """A time-ordered unique id in the UUIDv7 layout.

    48 bits of Unix milliseconds, a 12-bit sequence that orders ids made in the same
    millisecond, then 62 random bits. Ids sort by creation, which keeps store and outbox
    indexes append-only and lets consumers de-duplicate on them.
    """
    with _id_lock:
        milliseconds = time.time_ns() // 1_000_000
        if milliseconds <= _id_state[0]:
            milliseconds = _id_state[0]
            sequence = _id_state[1] + 1
            if sequence > 0xFFF:
                milliseconds += 1
                sequence = 0
        else:
            sequence = _random.take(1)[0]  # random start, room to count
        _id_state[0], _id_state[1] = milliseconds, sequence
        random_bits = int.from_bytes(_random.take(8), "big") & ((1 << 62) - 1)
    value = (milliseconds & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | sequence << 64
    value |= 0x2 << 62 | random_bits
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


EVENT_ID_NAMESPACE = uuid.UUID("5a0f6c1e-2b8d-4f3a-9c71-0e4d2b6a8f15")
"""The UUIDv5 namespace of event ids derived from an upstream message identity."""


def message_event_id(source: str, message_id: str, point: str) -> str:
    """The id of ``point``'s event from one upstream message: the same on every re-delivery.

    A name-based UUID (version 5) of the source id, the upstream message id and the point id,
    so a message the upstream delivers twice (after a lost acknowledgement) yields events a
    consumer recognizes as duplicates.
    """
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{source}\x00{message_id}\x00{point}"))
