"""The BACnet/IP source: the bridge's own device on one UDP port, serving every configured
device from it.

Each device is found by its instance: Who-Is goes to its address hint and to the configured
Who-Is targets, and the I-Am that answers says where it is, how long an APDU it takes and
whether it segments. Its protocol-services-supported then decides between ReadPropertyMultiple
and ReadProperty, and between COV subscriptions and polling. A device that stops answering
goes ``down`` with its points ``bad`` and is looked for again; one that announces itself
from a new address is followed (logged once), and one that announces itself again after a
restart is subscribed afresh. I-Ams and COV notifications from devices nobody configured
are counted and dropped, remembering at most ``max_unknown_devices`` of them.

Only the port itself is the supervisor's: failing to bind it raises ``ConnectorError``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from bacpypes3.apdu import ErrorRejectAbortNack, SubscribeCOVRequest, WhoIsRequest
from bacpypes3.basetypes import PropertyValue
from bacpypes3.pdu import Address
from bacpypes3.primitivedata import ObjectIdentifier, PropertyIdentifier

from bridge.config.models import ResolvedPoint
from bridge.core.aio import primary_failure
from bridge.core.counters import (
    ANNOUNCEMENTS,
    COV_NOTIFICATIONS,
    COV_SUBSCRIPTIONS,
    MOVES,
    OVERRUNS,
    UNKNOWN_COV,
    UNKNOWN_I_AM,
)
from bridge.core.model import Reading, Value
from bridge.core.source import Source, SourceContext
from bridge.core.status import ConnectionState
from bridge.errors import ErrorCategory, ReadError, WriteError
from protocols.bacnet.config import PROTOCOL, BacnetPoint, BacnetSourceConfig, parse_address
from protocols.bacnet.device import (
    PRESENT_VALUE,
    DeviceState,
    Subscription,
    device_state,
)
from protocols.bacnet.reads import DeviceGone, DeviceReader, Item, Result, batch_size, refusal
from protocols.bacnet.stack import BridgeApplication, cast_value, open_application
from protocols.bacnet.write import write_point

logger = logging.getLogger(__name__)

BACKOFF_LIMIT = 30.0
"""The longest wait between two searches for a device that does not answer."""
RENEW_AT = 0.5
"""Renew a COV subscription when this part of its lifetime has passed."""
SERVICES = PropertyIdentifier("protocol-services-supported")
DEVICE_HEARTBEAT = PropertyIdentifier("system-status")


class BacnetSource(Source):
    """The bridge's BACnet/IP device and the configured devices it reads."""

    def __init__(self, config: BacnetSourceConfig, points: Sequence[ResolvedPoint]) -> None:
        super().__init__(source_id=config.id, protocol=PROTOCOL, endpoint=config.endpoint())
        self.config = config
        self._points: dict[str, tuple[str, BacnetPoint]] = {}
        for point in points:
            if isinstance(point.spec, BacnetPoint) and point.device is not None:
                self._points[point.id] = (point.device, point.spec)
        self._resolved = list(points)
        self._devices: dict[str, DeviceState] = {}
        self._by_instance: dict[int, DeviceState] = {}
        self._process_ids: dict[int, tuple[DeviceState, ObjectIdentifier]] = {}
        self._unknown: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._app: BridgeApplication | None = None
        self._context: SourceContext | None = None
        self.reader: DeviceReader | None = None
        """The running source's requests (and their count); ``None`` when not running."""

    @property
    def devices(self) -> list[DeviceState]:
        """What the running source knows of each device."""
        return list(self._devices.values())

    def device_endpoints(self) -> dict[str, str]:
        """Each device's instance and where it was last found (or its hint)."""
        shown: dict[str, str] = {}
        for device in self.config.devices:
            state = self._devices.get(device.id)
            where = state.address if state is not None and state.address else device.address
            shown[device.id] = f"bacnet://{where or '?'}/device,{device.instance}"
        return shown

    # -- running ---------------------------------------------------------------------------

    async def run(self, context: SourceContext) -> None:
        """Bind the port, then serve every device until cancelled."""
        host, port = parse_address(self.config.bind)
        config = self.config
        app = open_application(self.endpoint, host, port, instance=config.local_instance,
                               name=f"fieldbridge-{config.id}", timeout=config.timeout,
                               retries=config.retries)
        app.on_i_am = self._on_i_am
        app.on_cov = self._on_cov
        self._app, self._context = app, context
        self.reader = DeviceReader(app, timeout=config.timeout, retries=config.retries)
        self._devices = {
            device.id: device_state(device, self._resolved,
                                    context.status.child(device.id, f"device,{device.instance}"))
            for device in config.devices}
        self._by_instance = {state.config.instance: state for state in self._devices.values()}
        self._process_ids = {}
        try:
            context.status.up()
            async with asyncio.TaskGroup() as group:
                for state in self._devices.values():
                    group.create_task(self._serve_device(state, context),
                                      name=f"{PROTOCOL}[{self.id}].{state.id}")
        except BaseExceptionGroup as failures:
            raise primary_failure(failures) from None
        finally:
            self._app = self._context = None
            self.reader = None
            app.close()

    async def _serve_device(self, device: DeviceState, context: SourceContext) -> None:
        """Find the device, serve it until it stops answering, and find it again."""
        backoff = device.config.interval
        while True:
            device.restart.clear()
            try:
                await self._connect(device, context)
                backoff = device.config.interval
                await self._cycle(device, context)
            except DeviceGone as gone:
                if device.status.state is not ConnectionState.DOWN:
                    await context.publish(device.all_bad(self.id, gone.reason))
                device.status.down(gone.reason, ErrorCategory.TRANSIENT)
                device.subscriptions.clear()
                try:
                    async with asyncio.timeout(backoff):
                        await device.restart.wait()
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, max(BACKOFF_LIMIT, device.config.interval))

    async def _locate(self, device: DeviceState) -> Address:
        """Who-Is to the device's last address or hint and to the targets; its I-Am's address."""
        app = self._require_app()
        targets: list[Address] = []
        for known in (device.address, device.hint):
            if known is not None and known not in targets:
                targets.append(known)
        for target in self.config.who_is:
            host, port = parse_address(target)
            address = Address(f"{host}:{port}")
            if address not in targets:
                targets.append(address)
        device.found.clear()
        device.locating = True
        device.answers_due = len(targets)
        device.answers_until = time.monotonic() + self.config.timeout
        instance = device.config.instance
        try:
            for target in targets:
                app.request(WhoIsRequest(deviceInstanceRangeLowLimit=instance,
                                         deviceInstanceRangeHighLimit=instance,
                                         destination=target))
            async with asyncio.timeout(self.config.timeout):
                await device.found.wait()
        except TimeoutError:
            asked = ", ".join(str(target) for target in targets)
            raise DeviceGone(f"no I-Am from device {instance} (asked {asked})") from None
        finally:
            device.locating = False
        assert device.address is not None
        return device.address

    async def _connect(self, device: DeviceState, context: SourceContext) -> None:
        """Locate, learn what the device supports, subscribe, and read every point once."""
        address = await self._locate(device)
        reader = self._require_reader()
        services = await reader.read_one(address, Item(
            ObjectIdentifier(("device", device.config.instance)), SERVICES))
        if services.error is None and services.value is not None:
            device.services = frozenset(
                name for name, bit in _bit_names(services.value) if bit)
        else:
            device.services = frozenset({"read-property"})
        details = device.status.details
        multiple = device.supports("read-property-multiple")
        per_request = batch_size(device.max_apdu, device.segmentation)
        details.update({"address": str(address), "max_apdu": device.max_apdu,
                        "segmentation": device.segmentation,
                        "read": "read-property-multiple" if multiple else "read-property",
                        "properties_per_request": per_request if multiple else 1})
        device.learn(await reader.read(address, device.metadata_items(), multiple=multiple,
                                       per_request=per_request))
        await self._subscribe(device, address)
        items = list(device.watched) + device.quality_items(device.objects())
        results = await reader.read(address, items, multiple=multiple, per_request=per_request)
        await context.publish(device.readings(self.id, results, time.time()))
        details["modes"] = {watched.address: watched.mode for watched in
                            device.watched.values()}
        refused = {watched.address: watched.refused for watched in device.watched.values()
                   if watched.refused}
        if refused:
            details["cov_refused"] = refused
        else:
            details.pop("cov_refused", None)
        device.status.success()

    async def _subscribe(self, device: DeviceState, address: Address) -> None:
        """COV subscriptions for the points that want them and that the device takes."""
        cov_capable = device.supports("subscribe-cov")
        device.subscriptions.clear()
        for watched in device.watched.values():
            watched.mode, watched.refused = "poll", None
            eligible = watched.item.property == PRESENT_VALUE
            if watched.wanted == "poll" or (watched.wanted == "auto" and not (
                    cov_capable and eligible)):
                continue
            object_id = watched.item.object
            subscription = device.subscriptions.get(object_id)
            if subscription is None:
                subscription = Subscription(self._process_id(device, object_id), object_id)
                reason = await self._renew(device, address, subscription)
                if reason is not None:
                    watched.refused = reason
                    if watched.wanted == "cov":
                        watched.mode = "cov"  # COV or nothing: bad with the refusal
                    continue
                device.subscriptions[object_id] = subscription
            watched.mode = "cov"

    def _process_id(self, device: DeviceState, object_id: ObjectIdentifier) -> int:
        for process_id, (known, known_object) in self._process_ids.items():
            if known is device and known_object == object_id:
                return process_id
        process_id = len(self._process_ids) + 1
        self._process_ids[process_id] = (device, object_id)
        return process_id

    async def _renew(self, device: DeviceState, address: Address,
                     subscription: Subscription) -> str | None:
        """Subscribe (or renew); the device's refusal as a reason, else ``None``."""
        reader = self._require_reader()
        lifetime = round(device.config.cov_lifetime)
        request = SubscribeCOVRequest(
            subscriberProcessIdentifier=subscription.process_id,
            monitoredObjectIdentifier=subscription.object,
            issueConfirmedNotifications=False, lifetime=lifetime, destination=address)
        try:
            await reader.call(address, self._require_app().request(request))
        except ErrorRejectAbortNack as error:
            if str(getattr(error, "apduAbortRejectReason", "")) == "no-response":
                raise DeviceGone(f"no answer from {address}") from None
            return f"the device refused SubscribeCOV: {refusal(error)}"
        subscription.renew_at = time.monotonic() + lifetime * RENEW_AT
        device.status.counters.add(COV_SUBSCRIPTIONS)
        return None

    async def _cycle(self, device: DeviceState, context: SourceContext) -> None:
        """Poll, renew subscriptions and check the device each interval, until it is gone or
        announces a restart."""
        reader = self._require_reader()
        multiple = device.supports("read-property-multiple")
        per_request = batch_size(device.max_apdu, device.segmentation)
        loop = asyncio.get_running_loop()
        interval = device.config.interval
        due = loop.time() + interval
        while True:
            try:
                async with asyncio.timeout(max(0.0, due - loop.time())):
                    await device.restart.wait()
                return
            except TimeoutError:
                pass
            due += interval
            if due < loop.time():
                device.status.counters.add(OVERRUNS)
                due = loop.time() + interval
            address = device.address
            assert address is not None
            items = device.poll_items()
            if not items:
                items = [Item(ObjectIdentifier(("device", device.config.instance)),
                              DEVICE_HEARTBEAT)]
            results = await reader.read(address, items, multiple=multiple,
                                        per_request=per_request)
            readings = device.readings(self.id, results, time.time())
            if readings:
                await context.publish(readings)
            now = time.monotonic()
            for subscription in device.subscriptions.values():
                if now >= subscription.renew_at:
                    reason = await self._renew(device, address, subscription)
                    if reason is not None:
                        device.status.note(reason, ErrorCategory.DEVICE)
            device.status.success()

    # -- what arrives unasked --------------------------------------------------------------

    def _remember_unknown(self, kind: str, instance: int) -> None:
        """Count an I-Am or notification from a device nobody configured; remember a bounded
        number of them for the inventory."""
        status = self._context.status if self._context is not None else None
        if status is None:
            return
        status.counters.add(UNKNOWN_I_AM if kind == "i_am" else UNKNOWN_COV)
        key = (kind, instance)
        self._unknown[key] = None
        self._unknown.move_to_end(key)
        while len(self._unknown) > self.config.max_unknown_devices:
            self._unknown.popitem(last=False)
        status.details["unknown_devices"] = len(self._unknown)

    async def _on_i_am(self, instance: int, address: Address, max_apdu: int,
                       segmentation: str, apdu: Any) -> None:
        device = self._by_instance.get(instance)
        if device is None:
            self._remember_unknown("i_am", instance)
            return
        app = self._app
        if app is not None:
            await app.device_info_cache.set_device_info(apdu)
        previous = device.address
        device.address, device.max_apdu, device.segmentation = address, max_apdu, segmentation
        if device.locating:
            device.answers_due -= 1
            device.found.set()
            if previous is not None and previous != address:
                self._moved(device, previous, address)
            return
        if previous is not None and previous != address:
            self._moved(device, previous, address)
            device.restart.set()
        elif device.answers_due > 0 and time.monotonic() < device.answers_until:
            device.answers_due -= 1  # a late answer to our own Who-Is (another target's)
        else:
            # An I-Am nobody asked for from where the device already was: it restarted,
            # and its COV subscriptions are gone with its memory.
            device.status.counters.add(ANNOUNCEMENTS)
            device.restart.set()

    def _moved(self, device: DeviceState, previous: Address, address: Address) -> None:
        logger.warning("device %s (instance %d) moved from %s to %s", device.id,
                       device.config.instance, previous, address)
        device.status.counters.add(MOVES)
        device.status.details["address"] = str(address)

    async def _on_cov(self, address: Address, process_id: int, object_id: ObjectIdentifier,
                      values: list[PropertyValue]) -> bool:
        known = self._process_ids.get(process_id)
        context = self._context
        if (known is None or context is None or known[1] != object_id
                or known[0].address != address or object_id not in known[0].subscriptions):
            self._remember_unknown("cov", process_id)
            return False
        device = known[0]
        device.status.counters.add(COV_NOTIFICATIONS)
        results: dict[Item, Result] = {}
        for value in values:
            property_id = value.propertyIdentifier
            try:
                results[Item(object_id, property_id)] = Result(
                    value=cast_value(object_id, property_id, value.value))
            except (ValueError, TypeError, AttributeError) as exc:
                results[Item(object_id, property_id)] = Result(error=f"undecodable: {exc}")
        readings = [reading for reading in device.readings(self.id, results, time.time())
                    if device.watched[_item_of(device, reading)].mode == "cov"]
        if readings:
            await context.publish(readings)
        return True

    # -- live read and write-back --------------------------------------------------------

    def _require_app(self) -> BridgeApplication:
        if self._app is None:
            raise DeviceGone(f"source {self.id} is not running")
        return self._app

    def _require_reader(self) -> DeviceReader:
        if self.reader is None:
            raise DeviceGone(f"source {self.id} is not running")
        return self.reader

    def _live(self, point_id: str) -> tuple[DeviceState, BacnetPoint, Address]:
        found = self._points.get(point_id)
        if found is None:
            raise ReadError(point_id, f"source {self.id} has no such point",
                            ErrorCategory.CONFIG)
        device = self._devices.get(found[0])
        if device is None or device.address is None or self._app is None:
            raise ReadError(point_id, f"device {found[0]} is not reachable now",
                            ErrorCategory.TRANSIENT)
        return device, found[1], device.address

    async def read(self, point_id: str) -> list[Reading]:
        """Read the point's property (and its object's quality) from the device now."""
        device, spec, address = self._live(point_id)
        watched = next(watched for watched in device.watched.values()
                       if watched.address.endswith(f"/{spec.address}"))
        items = [watched.item, *device.quality_items([watched.item.object])]
        reader = self._require_reader()
        try:
            results = await reader.read(address, items,
                                        multiple=device.supports("read-property-multiple"),
                                        per_request=len(items))
        except DeviceGone as gone:
            raise ReadError(point_id, gone.reason, ErrorCategory.TRANSIENT) from None
        readings = device.readings(self.id, results, time.time())
        result = results[watched.item]
        if result.error is not None:
            raise ReadError(point_id, f"{watched.item}: {result.error}", ErrorCategory.DEVICE)
        return readings

    async def write(self, point_id: str, value: Value) -> None:
        """WriteProperty at the point's priority; ``None`` relinquishes that priority."""
        try:
            device, spec, address = self._live(point_id)
        except ReadError as exc:
            raise WriteError(point_id, exc.reason, exc.category) from None
        await write_point(self._require_app(), self._require_reader(), address, point_id, spec,
                          value, device.state_text)


def _bit_names(value: Any) -> list[tuple[str, int]]:
    """The named bits of a bacpypes3 bit string, each with its value."""
    names: dict[str, int] = getattr(value, "_bitstring_names", {}) or {}
    bits = list(value)
    return [(name, bits[index] if index < len(bits) else 0) for name, index in names.items()]


def _item_of(device: DeviceState, reading: Reading) -> Item:
    for item, watched in device.watched.items():
        if watched.address == reading.address:
            return item
    raise KeyError(reading.address)
