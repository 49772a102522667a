"""The BACnet source through faults: writes at a priority and their relinquish, a device
that stops answering, restarts or moves to another port, and floods from unknown devices."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from bacpypes3.apdu import IAmRequest, UnconfirmedCOVNotificationRequest
from bacpypes3.basetypes import PropertyValue
from bacpypes3.pdu import Address
from bacpypes3.primitivedata import Real
from helpers import SourceRunner
from helpers.bacnet_devices import (
    SimulatedDevice,
    build_unit,
    every_point,
    free_udp_port,
    source_yaml,
)

from bridge.core.model import Quality
from bridge.core.status import ConnectionState
from bridge.errors import ReadError, WriteError
from protocols.bacnet.source import BacnetSource


@pytest.fixture
async def device() -> AsyncIterator[SimulatedDevice]:
    """A device with COV, instance 2001."""
    with SimulatedDevice(2001) as running:
        yield running


def one_device(device: SimulatedDevice, **settings: Any) -> dict[str, Any]:
    return {"id": "ahu", "instance": device.instance, "address": device.address,
            "interval": "100ms", "points": every_point(), **settings}


def bridge_address(runner: SourceRunner) -> str:
    source = runner.unit.source
    assert isinstance(source, BacnetSource)
    return source.config.bind


async def test_write_at_priority_then_relinquish(device: SimulatedDevice,
                                                 tmp_path: Path) -> None:
    points = [*every_point(priority=8),
              {"name": "valve_priorities", "object": "analog-output,1",
               "property": "priority-array"},
              {"name": "ghost", "object": "analog-output,9", "writable": True}]
    text = source_yaml(devices=[one_device(device, points=points)])
    async with SourceRunner(build_unit(tmp_path, text)) as runner:
        await runner.wait_for(lambda: runner.has("ahu.valve") and runner.has("ahu.speed"))
        source = runner.unit.source
        await source.write("ahu.valve", 42.5)
        await runner.wait_for(lambda: runner.has("ahu.valve", value=42.5))
        slots = json.loads((await source.read("ahu.valve_priorities"))[0].value)
        assert slots[7] == 42.5
        assert slots[15] is None
        await source.write("ahu.fan", True)
        await runner.wait_for(lambda: runner.has("ahu.fan", value=True))
        await source.write("ahu.speed", "auto")
        await runner.wait_for(lambda: runner.has("ahu.speed", value="auto"))
        await source.write("ahu.valve", None)
        await runner.wait_for(lambda: runner.has("ahu.valve", value=0.0))
        slots = json.loads((await source.read("ahu.valve_priorities"))[0].value)
        assert slots[7] is None
        with pytest.raises(WriteError, match=r"not one of|cannot|expected"):
            await source.write("ahu.speed", "turbo")
        with pytest.raises(WriteError, match="refused the write of analog-output,9"):
            await source.write("ahu.ghost", 5.0)


async def test_live_read_of_an_unknown_object_is_a_read_error(
        device: SimulatedDevice, tmp_path: Path) -> None:
    points = [{"name": "ghost", "object": "analog-value,77"}]
    text = source_yaml(devices=[one_device(device, points=points)])
    async with SourceRunner(build_unit(tmp_path, text)) as runner:
        await runner.wait_for(lambda: runner.has("ahu.ghost"))
        with pytest.raises(ReadError, match="unknown-object"):
            await runner.unit.source.read("ahu.ghost")


async def test_device_that_stops_answering_goes_down_and_back_up(
        device: SimulatedDevice, tmp_path: Path) -> None:
    text = source_yaml(devices=[one_device(device)])
    async with SourceRunner(build_unit(tmp_path, text)) as runner:
        await runner.wait_for(lambda: runner.has("ahu.zone_temp", quality=Quality.GOOD))
        status = runner.status.children["ahu"]
        device.stop()
        await runner.wait_for(lambda: status.state is ConnectionState.DOWN)
        await runner.wait_for(lambda: runner.has("ahu.zone_temp", quality=Quality.BAD))
        assert runner.status.state is ConnectionState.UP
        device.object("zone-temp").presentValue = 30.5
        device.restart()
        await runner.wait_for(lambda: status.state is ConnectionState.UP
                              and runner.has("ahu.zone_temp", value=30.5))


async def test_restarted_device_announcing_itself_is_subscribed_again(
        device: SimulatedDevice, tmp_path: Path) -> None:
    # Who-Is goes to the device alone: its one answer is expected, the next I-Am is news.
    text = source_yaml(who_is=[device.address], devices=[one_device(device, interval="1h")])
    async with SourceRunner(build_unit(tmp_path, text)) as runner:
        await runner.wait_for(lambda: runner.has("ahu.zone_temp", value=21.5))
        status = runner.status.children["ahu"]
        subscribed = status.counters["cov_subscriptions"]
        device.restart(announce_to=bridge_address(runner))
        await runner.wait_for(lambda: status.counters["cov_subscriptions"] > subscribed)
        device.object("zone-temp").presentValue = 19.0
        await runner.wait_for(lambda: runner.has("ahu.zone_temp", value=19.0))
        assert status.counters["announcements"] == 1


async def test_device_moving_to_another_port_is_followed_and_logged_once(
        device: SimulatedDevice, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = source_yaml(devices=[one_device(device)])
    async with SourceRunner(build_unit(tmp_path, text)) as runner:
        await runner.wait_for(lambda: runner.has("ahu.zone_temp", value=21.5))
        old = device.address
        device.restart(port=free_udp_port(), announce_to=bridge_address(runner))
        device.object("zone-temp").presentValue = 25.25
        await runner.wait_for(lambda: runner.has("ahu.zone_temp", value=25.25))
        status = runner.status.children["ahu"]
        assert status.details["address"] == device.address
        assert status.counters["moves"] == 1
        moved = [record for record in caplog.records if "moved" in record.getMessage()]
        assert len(moved) == 1
        assert old in moved[0].getMessage()
        assert device.address in moved[0].getMessage()


async def test_silent_move_is_found_by_who_is_to_the_targets(tmp_path: Path) -> None:
    new_port = free_udp_port()
    with SimulatedDevice(2002) as device:
        text = source_yaml(who_is=[f"127.0.0.1:{new_port}"],
                           devices=[one_device(device)])
        async with SourceRunner(build_unit(tmp_path, text)) as runner:
            await runner.wait_for(lambda: runner.has("ahu.zone_temp", value=21.5))
            device.restart(port=new_port)
            device.object("zone-temp").presentValue = 26.0
            await runner.wait_for(lambda: runner.has("ahu.zone_temp", value=26.0))
            assert runner.status.children["ahu"].details["address"] == device.address


async def test_flood_from_unknown_devices_is_counted_and_bounded(
        device: SimulatedDevice, tmp_path: Path) -> None:
    text = source_yaml(max_unknown_devices=50, devices=[one_device(device)])
    async with SourceRunner(build_unit(tmp_path, text)) as runner:
        await runner.wait_for(lambda: runner.has("ahu.zone_temp"))
        assert device.app is not None
        target = Address(bridge_address(runner))
        counters = runner.status.counters
        # In rounds of 20 of each, each awaited, so that the loopback socket's buffer does
        # not overflow on a busy machine (a datagram it drops is not the bridge's to count).
        for first in range(3000, 3400, 20):
            before_i_am, before_cov = counters["unknown_i_am"], counters["unknown_cov"]
            for instance in range(first, first + 20):
                device.app.request(IAmRequest(
                    iAmDeviceIdentifier=("device", instance), maxAPDULengthAccepted=1476,
                    segmentationSupported="segmented-both", vendorID=999, destination=target))
                device.app.request(UnconfirmedCOVNotificationRequest(
                    subscriberProcessIdentifier=instance, initiatingDeviceIdentifier=(
                        "device", instance), monitoredObjectIdentifier=("analog-value", 1),
                    timeRemaining=60, listOfValues=[PropertyValue(
                        propertyIdentifier="present-value", value=Real(1.0))],
                    destination=target))
            await runner.wait_for(lambda before_i_am=before_i_am, before_cov=before_cov: (
                counters["unknown_i_am"] > before_i_am and counters["unknown_cov"] > before_cov))
        assert counters["unknown_i_am"] > 50
        assert counters["unknown_cov"] > 50
        source = runner.unit.source
        assert isinstance(source, BacnetSource)
        assert runner.status.details["unknown_devices"] == 50
        assert runner.status.children["ahu"].state is ConnectionState.UP
