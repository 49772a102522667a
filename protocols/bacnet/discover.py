"""BACnet discovery: Who-Is over a broadcast address or to one host, then each answering
device's object list, written as a source with a point per object.

The object list is read whole (segmented, when the device sends segments) or, when that is
refused or too long, element by element. Each object's name, description, units and state
texts are read in batches (ReadPropertyMultiple when the device has it). Object names become
point names; units become Fieldbridge unit names; a multi-state object's state texts go into
its description. Objects of other types (schedules, trend logs, the device itself) are listed
at the end of the file, not mapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bacpypes3.apdu import ErrorRejectAbortNack, IAmRequest, WhoIsRequest
from bacpypes3.pdu import Address
from bacpypes3.primitivedata import ObjectIdentifier, PropertyIdentifier
from pydantic import Field, field_validator, model_validator

from bridge.config.models import Duration, Identifier
from bridge.config.validation import field_error
from bridge.core.discovery import (
    DiscoveredItem,
    Discovery,
    DiscoveryContext,
    DiscoveryRequest,
    DiscoverySpec,
    UniqueNames,
    point_name,
    render_yaml,
    sanitize_name,
)
from protocols.bacnet.config import (
    BINARY,
    COMMANDABLE,
    MAX_INSTANCE,
    MULTI_STATE,
    PROTOCOL,
    object_text,
    parse_address,
)
from protocols.bacnet.device import STATE_TEXT, UNIT_TYPES, UNITS
from protocols.bacnet.reads import (
    DeviceGone,
    DeviceReader,
    Item,
    Result,
    batch_size,
    refusal,
)
from protocols.bacnet.stack import open_application
from protocols.bacnet.units import unit_name

MAPPED_TYPES = frozenset({
    "analog-input", "analog-output", "analog-value", "binary-input", "binary-output",
    "binary-value", "multi-state-input", "multi-state-output", "multi-state-value",
    "accumulator"})
OBJECT_LIST = PropertyIdentifier("object-list")
OBJECT_NAME = PropertyIdentifier("object-name")
DESCRIPTION = PropertyIdentifier("description")


class BacnetDiscoverRequest(DiscoveryRequest):
    """Where to send Who-Is, which instances, and the local port to ask from."""

    target: str = Field(
        default="255.255.255.255", description="Who-Is destinations, comma-separated: "
        "broadcast addresses (`192.0.2.255`) or single devices' `host[:port]`.")
    low: int | None = Field(default=None, ge=0, le=MAX_INSTANCE,
                            description="Lowest device instance asked for.")
    high: int | None = Field(default=None, ge=0, le=MAX_INSTANCE,
                             description="Highest device instance asked for.")
    bind: str = Field(default="0.0.0.0:47808",
                      description="Local `address:port` to ask from (I-Ams come back to it).")
    wait: Duration = Field(default=3.0, gt=0, le=60,
                           description="How long to collect I-Am answers (shorter when "
                           "every instance from low to high has answered).")
    timeout: Duration = Field(default=3.0, gt=0, description="How long each request waits.")
    source_id: Identifier = Field(default="bacnet", description="Id of the generated source.")

    @field_validator("bind")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("target")
    @classmethod
    def _targets(cls, value: str) -> str:
        for target in value.split(","):
            parse_address(target.strip())
        return value

    @property
    def targets(self) -> list[str]:
        """Each Who-Is destination."""
        return [target.strip() for target in self.target.split(",")]

    @model_validator(mode="after")
    def _range(self) -> BacnetDiscoverRequest:
        if (self.low is None) != (self.high is None):
            raise field_error("high", "give low and high together", self.high)
        if self.low is not None and self.high is not None and self.low > self.high:
            raise field_error("high", "high is below low", self.high)
        return self


@dataclass
class _Found:
    instance: int
    address: Address
    max_apdu: int
    segmentation: str
    name: str = ""
    objects: list[ObjectIdentifier] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None
    element_by_element: bool = False
    """The object list was read one element at a time."""


def _target(text: str) -> dict[str, Any]:
    return {"target": text}


async def discover(request: BacnetDiscoverRequest, context: DiscoveryContext) -> Discovery:
    """Who-Is, then each device's objects, as a configuration."""
    host, port = parse_address(request.bind)
    endpoint = f"bacnet://{host}:{port}"
    app = open_application(endpoint, host, port, instance=MAX_INSTANCE - 1,
                           name="fieldbridge-discover", timeout=request.timeout, retries=1)
    found: dict[int, _Found] = {}
    limit = context.budget.max_items
    everyone = asyncio.Event()
    expected = (request.high - request.low + 1 if request.low is not None
                and request.high is not None else None)

    async def on_i_am(instance: int, address: Address, max_apdu: int, segmentation: str,
                      apdu: IAmRequest) -> None:
        if instance not in found and len(found) < limit:
            found[instance] = _Found(instance, address, max_apdu, segmentation)
            await app.device_info_cache.set_device_info(apdu)
            if expected is not None and len(found) >= expected:
                everyone.set()

    app.on_i_am = on_i_am
    reader = DeviceReader(app, timeout=request.timeout, retries=1)
    try:
        for target in request.targets:
            target_host, target_port = parse_address(target)
            who_is = WhoIsRequest(destination=Address(f"{target_host}:{target_port}"))
            if request.low is not None:
                who_is.deviceInstanceRangeLowLimit = request.low
                who_is.deviceInstanceRangeHighLimit = request.high
            app.request(who_is)
        context.progress.announce(f"Who-Is to {request.target}, answers for {request.wait:g} s")
        # Without a range there is no last answer to wait for: I-Ams are collected for `wait`.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(request.wait):
                await everyone.wait()
        devices = sorted(found.values(), key=lambda device: device.instance)
        for done, device in enumerate(devices):
            context.progress.update(done, len(devices), f"device {device.instance}")
            try:
                await _describe(reader, device)
            except DeviceGone as gone:
                device.error = gone.reason
    finally:
        app.close()
    return _result(request, context, sorted(found.values(), key=lambda d: d.instance))


async def _object_list(reader: DeviceReader, device: _Found, device_id: ObjectIdentifier
                       ) -> list[ObjectIdentifier]:
    """The device's object list: whole, or element by element when the whole is refused
    (too long for a device that does not segment)."""
    whole = await reader.read_one(device.address, Item(device_id, OBJECT_LIST))
    if whole.error is None and isinstance(whole.value, list):
        return [ObjectIdentifier(entry) for entry in whole.value]
    try:
        count = await reader.call(device.address, reader.app.read_property(
            device.address, device_id, OBJECT_LIST, 0))
        objects = []
        for index in range(1, int(count) + 1):
            objects.append(ObjectIdentifier(await reader.call(
                device.address, reader.app.read_property(device.address, device_id,
                                                         OBJECT_LIST, index))))
    except ErrorRejectAbortNack as error:
        raise DeviceGone(f"the object list cannot be read: {refusal(error)} (whole: "
                         f"{whole.error})") from None
    device.element_by_element = True
    return objects


async def _describe(reader: DeviceReader, device: _Found) -> None:
    device_id = ObjectIdentifier(("device", device.instance))
    name = await reader.read_one(device.address, Item(device_id, OBJECT_NAME))
    device.name = str(name.value) if name.error is None else f"device-{device.instance}"
    device.objects = await _object_list(reader, device, device_id)
    services = await reader.read_one(device.address, Item(
        device_id, PropertyIdentifier("protocol-services-supported")))
    multiple = services.error is None and "read-property-multiple" in str(services.value)
    items: list[Item] = []
    for object_id in device.objects:
        kind = str(object_id[0])
        if kind not in MAPPED_TYPES:
            if kind != "device":
                device.skipped.append(f"{object_text(object_id)} ({kind} objects are not "
                                      "mapped)")
            continue
        items += [Item(object_id, OBJECT_NAME), Item(object_id, DESCRIPTION)]
        if kind in UNIT_TYPES:
            items.append(Item(object_id, UNITS))
        if kind in MULTI_STATE:
            items.append(Item(object_id, STATE_TEXT))
    results = await reader.read(device.address, items, multiple=multiple,
                                per_request=batch_size(device.max_apdu, device.segmentation))
    names = UniqueNames()
    for object_id in dict.fromkeys(item.object for item in items):
        device.points.append(_point(object_id, results, names))


def _value(results: dict[Item, Result], object_id: ObjectIdentifier,
           property_id: PropertyIdentifier) -> Any:
    result = results.get(Item(object_id, property_id))
    return result.value if result is not None and result.error is None else None


def _point(object_id: ObjectIdentifier, results: dict[Item, Result],
           names: UniqueNames) -> dict[str, Any]:
    kind = str(object_id[0])
    object_name = _value(results, object_id, OBJECT_NAME)
    fallback = f"{kind}-{object_id[1]}"
    point: dict[str, Any] = {
        "name": point_name([str(object_name) if object_name else fallback], names,
                           fallback=fallback),
        "object": object_text(object_id)}
    unit = unit_name(_value(results, object_id, UNITS))
    if unit:
        point["unit"] = unit
    parts = []
    description = _value(results, object_id, DESCRIPTION)
    if description:
        parts.append(str(description))
    texts = _value(results, object_id, STATE_TEXT)
    if texts:
        parts.append("states: " + ", ".join(f"{index} {text}"
                                            for index, text in enumerate(texts, start=1)))
    if parts:
        point["description"] = "; ".join(parts)
    if kind in COMMANDABLE:
        point["writable"] = True
    return point


def _result(request: BacnetDiscoverRequest, context: DiscoveryContext,
            devices: list[_Found]) -> Discovery:
    items: list[DiscoveredItem] = []
    warnings = [f"device {device.instance} at {device.address}: {device.error}"
                for device in devices if device.error]
    device_names = UniqueNames()
    sections = []
    for device in devices:
        if not device.points:
            continue
        device_id = device_names.take(sanitize_name(device.name,
                                                    fallback=f"device-{device.instance}"))
        sections.append({"id": device_id, "instance": device.instance,
                         "address": str(device.address), "points": device.points})
        for point in device.points:
            kind = point["object"].split(",")[0]
            items.append(DiscoveredItem(
                name=f"{device_id}.{point['name']}", address=f"{device_id}/{point['object']}",
                type=kind, unit=point.get("unit"), writable=point.get("writable", False),
                description=point.get("description"),
                extra={"instance": device.instance, "value": "bool" if kind in BINARY
                       else "number"}))
    moment = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    header = [
        f"Generated by {context.command or 'fieldbridge discover bacnet'} on {moment}",
        f"from Who-Is to {request.target} on {socket.gethostname()}: {len(devices)} devices "
        f"answered, {len(items)} objects mapped.",
        "Devices are found by `instance`; `address` is only where to ask first.",
        "Set BACNET_BIND to the local address:port to listen on (default 0.0.0.0:47808).",
    ]
    header.extend(f"warning: {warning}" for warning in warnings)
    header.extend(f"device {device.instance}: its object list was read element by element "
                  "(too long for one answer)" for device in devices
                  if device.element_by_element)
    footer: list[str] = []
    for device in devices:
        if device.skipped:
            footer.append(f"Not mapped on device {device.instance}:")
            footer.extend(f"  {entry}" for entry in device.skipped)
    document: dict[str, Any] = {}
    if sections:
        document["sources"] = [{
            "id": request.source_id, "protocol": PROTOCOL,
            "bind": "${BACNET_BIND:-0.0.0.0:47808}", "who_is": request.targets,
            "devices": sections}]
    else:
        header.append("No device answered with objects to map: there is no source to write.")
    context.progress.finish(f"{len(devices)} devices, {len(items)} points")
    return Discovery(protocol=PROTOCOL, yaml=render_yaml(document, header=header,
                                                         footer=footer),
                     items=items, partial=bool(warnings), warnings=warnings,
                     error=warnings[0] if warnings else None)


SPEC = DiscoverySpec(
    request_model=BacnetDiscoverRequest,
    run=discover,
    target=_target,
    target_name="ADDRESS",
    summary="send Who-Is and write a source with each device's objects",
)
