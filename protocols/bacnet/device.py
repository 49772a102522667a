"""What the source knows of one configured BACnet device: where it is, what it supports,
the properties its points read and how (COV or polling), and the readings made of answers.

Quality comes from the object's status flags and reliability: a fault, or a reliability
other than no-fault-detected, is ``bad`` with the reliability as the reason; out of service
and overridden are ``uncertain``. Units and state texts are read once per connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from bacpypes3.pdu import Address
from bacpypes3.primitivedata import ObjectIdentifier, PropertyIdentifier

from bridge.config.models import ResolvedPoint
from bridge.core.model import Quality, Reading
from bridge.core.status import EndpointStatus
from protocols.bacnet.config import (
    MULTI_STATE,
    BacnetDevice,
    BacnetPoint,
    parse_address,
    parse_object,
    parse_property,
)
from protocols.bacnet.reads import Item, Result
from protocols.bacnet.stack import plain
from protocols.bacnet.units import unit_name

PRESENT_VALUE = PropertyIdentifier("present-value")
STATUS_FLAGS = PropertyIdentifier("status-flags")
RELIABILITY = PropertyIdentifier("reliability")
UNITS = PropertyIdentifier("units")
STATE_TEXT = PropertyIdentifier("state-text")
UNIT_TYPES = frozenset({"analog-input", "analog-output", "analog-value", "accumulator",
                        "pulse-converter", "large-analog-value", "integer-value",
                        "positive-integer-value"})
"""Object types with a ``units`` property."""

Mode = Literal["cov", "poll"]


@dataclass
class Watched:
    """One property that points read, and how it is served."""

    item: Item
    address: str
    """The address readings carry: ``<device id>/<type,instance>/<property>``."""
    wanted: Literal["auto", "cov", "poll"]
    mode: Mode = "poll"
    refused: str | None = None
    """Why the device refused a COV subscription the point asked for."""


@dataclass
class Subscription:
    """A COV subscription on one object."""

    process_id: int
    object: ObjectIdentifier
    renew_at: float = 0.0


@dataclass
class DeviceState:
    """One configured device, as the source sees it."""

    config: BacnetDevice
    status: EndpointStatus
    watched: dict[Item, Watched] = field(default_factory=dict)
    address: Address | None = None
    max_apdu: int = 480
    segmentation: str = "no-segmentation"
    services: frozenset[str] = frozenset()
    units: dict[ObjectIdentifier, str | None] = field(default_factory=dict)
    state_text: dict[ObjectIdentifier, list[str]] = field(default_factory=dict)
    subscriptions: dict[ObjectIdentifier, Subscription] = field(default_factory=dict)
    quality: dict[ObjectIdentifier, tuple[Quality, str | None]] = field(default_factory=dict)
    found: asyncio.Event = field(default_factory=asyncio.Event)
    restart: asyncio.Event = field(default_factory=asyncio.Event)
    locating: bool = False
    answers_due: int = 0
    """I-Ams still to come for the Who-Is requests of the last search (one per target)."""
    answers_until: float = 0.0
    """When those stop being expected (monotonic)."""

    @property
    def hint(self) -> Address | None:
        """The configured address, if any."""
        if self.config.address is None:
            return None
        host, port = parse_address(self.config.address)
        return Address(f"{host}:{port}")

    @property
    def id(self) -> str:
        """The device id."""
        return self.config.id

    def objects(self) -> list[ObjectIdentifier]:
        """Every object a point reads, once each, in configuration order."""
        return list(dict.fromkeys(item.object for item in self.watched))

    def supports(self, service: str) -> bool:
        """Whether the device lists ``service`` in protocol-services-supported."""
        return service in self.services

    def metadata_items(self) -> list[Item]:
        """Units and state texts of the objects read (once per connection)."""
        items: list[Item] = []
        for object_id in self.objects():
            kind = str(object_id[0])
            if kind in UNIT_TYPES:
                items.append(Item(object_id, UNITS))
            if kind in MULTI_STATE:
                items.append(Item(object_id, STATE_TEXT))
        return items

    def quality_items(self, objects: Iterable[ObjectIdentifier]) -> list[Item]:
        """Status flags and reliability of the objects whose present-value is read."""
        present = {item.object for item in self.watched if item.property == PRESENT_VALUE}
        return [Item(object_id, prop) for object_id in objects if object_id in present
                for prop in (STATUS_FLAGS, RELIABILITY)]

    def poll_items(self) -> list[Item]:
        """What each poll cycle reads: polled properties and their objects' quality."""
        polled = [item for item, watched in self.watched.items() if watched.mode == "poll"]
        objects = list(dict.fromkeys(item.object for item in polled))
        return polled + self.quality_items(objects)

    def learn(self, results: Mapping[Item, Result]) -> None:
        """Remember units and state texts from their answers."""
        for item, result in results.items():
            if item.property == UNITS:
                self.units[item.object] = unit_name(result.value) if result.error is None else None
            elif item.property == STATE_TEXT and result.error is None:
                self.state_text[item.object] = [str(text) for text in result.value or ()]

    def note_quality(self, object_id: ObjectIdentifier, flags: Any, reliability: Any) -> None:
        """The object's quality from its status flags and reliability."""
        reliability_name = str(reliability) if reliability is not None else None
        bits = list(flags) if flags is not None else []
        bits += [0] * (4 - len(bits))
        if bits[1] or reliability_name not in (None, "no-fault-detected"):
            self.quality[object_id] = (Quality.BAD, f"fault: {reliability_name or 'fault'}")
        elif bits[3]:
            self.quality[object_id] = (Quality.UNCERTAIN, "out-of-service")
        elif bits[2]:
            self.quality[object_id] = (Quality.UNCERTAIN, "overridden")
        else:
            self.quality[object_id] = (Quality.GOOD, None)

    def readings(self, source_id: str, results: Mapping[Item, Result],
                 received_at: float) -> list[Reading]:
        """Readings of the watched properties among ``results`` (quality first noted)."""
        for object_id in {item.object for item in results}:
            flags = results.get(Item(object_id, STATUS_FLAGS))
            if flags is None:
                continue
            reliability = results.get(Item(object_id, RELIABILITY))
            self.note_quality(
                object_id, flags.value if flags.error is None else None,
                reliability.value if reliability is not None and reliability.error is None
                else None)
        return [self.reading(source_id, self.watched[item], result, received_at)
                for item, result in results.items() if item in self.watched]

    def reading(self, source_id: str, watched: Watched, result: Result,
                received_at: float) -> Reading:
        """One reading: the value, or ``bad`` naming what the device refused."""
        item = watched.item
        if watched.wanted == "cov" and watched.refused is not None:
            return Reading(source=source_id, address=watched.address, value=None,
                           received_at=received_at, quality=Quality.BAD,
                           reason=f"{item}: {watched.refused}")
        if result.error is not None:
            return Reading(source=source_id, address=watched.address, value=None,
                           received_at=received_at, quality=Quality.BAD,
                           reason=f"{item}: {result.error}")
        quality, reason = Quality.GOOD, None
        if item.property == PRESENT_VALUE:
            quality, reason = self.quality.get(item.object, (Quality.GOOD, None))
        kind = str(item.object[0])
        meta: dict[str, Any] = {"unit": self.units.get(item.object)}
        if item.property == PRESENT_VALUE and item.object in self.state_text:
            meta["state_text"] = self.state_text[item.object]
        return Reading(source=source_id, address=watched.address,
                       value=plain(result.value, kind, str(item.property)),
                       received_at=received_at, quality=quality, reason=reason, meta=meta)

    def all_bad(self, source_id: str, reason: str) -> list[Reading]:
        """A ``bad`` reading for every watched property."""
        now = time.time()
        return [Reading(source=source_id, address=watched.address, value=None, received_at=now,
                        quality=Quality.BAD, reason=reason)
                for watched in self.watched.values()]


def device_state(config: BacnetDevice, points: Iterable[ResolvedPoint],
                 status: EndpointStatus) -> DeviceState:
    """The state of one device, with the properties its points read."""
    state = DeviceState(config=config, status=status)
    for point in points:
        spec = point.spec
        if not isinstance(spec, BacnetPoint) or point.device != config.id:
            continue
        item = Item(parse_object(spec.object), parse_property(spec.property))
        watched = state.watched.get(item)
        if watched is None:
            state.watched[item] = Watched(item, point_address(config.id, spec), spec.mode)
        elif spec.mode != "auto":
            watched.wanted = spec.mode
    return state


def point_address(device_id: str, spec: BacnetPoint) -> str:
    """The address readings of a point carry."""
    return f"{device_id}/{spec.address}"
