"""The BACnet source against simulated bacpypes3 devices on loopback: reading every object
type, COV, polling, quality from status flags, unknown objects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import SourceRunner
from helpers.bacnet_devices import SimulatedDevice, build_unit, every_point, source_yaml

from bridge.core.model import Quality
from bridge.core.status import ConnectionState


@pytest.fixture
async def devices() -> AsyncIterator[tuple[SimulatedDevice, SimulatedDevice]]:
    """Two devices: 1001 supports COV, 1002 neither COV nor ReadPropertyMultiple."""
    with SimulatedDevice(1001) as first, SimulatedDevice(1002, cov=False,
                                                         multiple=False) as second:
        yield first, second


def two_devices(first: SimulatedDevice, second: SimulatedDevice) -> list[dict[str, object]]:
    return [
        {"id": "ahu1", "instance": first.instance, "address": first.address,
         "interval": "100ms", "points": every_point()},
        {"id": "ahu2", "instance": second.instance, "address": second.address,
         "interval": "100ms", "points": every_point()},
    ]


async def test_reads_every_object_type_from_two_devices(
        devices: tuple[SimulatedDevice, SimulatedDevice], tmp_path: Path) -> None:
    first, second = devices
    unit = build_unit(tmp_path, source_yaml(devices=two_devices(first, second)))
    async with SourceRunner(unit) as runner:
        names = [point["name"] for point in every_point()]
        await runner.wait_for(lambda: all(runner.has(f"{device}.{name}")
                                          for device in ("ahu1", "ahu2") for name in names))
        for device in ("ahu1", "ahu2"):
            temp = runner.latest(f"{device}.zone_temp")
            assert (temp.value, temp.unit, temp.quality) == (21.5, "degC", Quality.GOOD)
            assert runner.latest(f"{device}.valve").unit == "%"
            assert runner.latest(f"{device}.filter_alarm").value is False
            assert runner.latest(f"{device}.occupied").value is True
            assert runner.latest(f"{device}.mode").value == "auto"
            assert runner.latest(f"{device}.status").value == "off"
            energy = runner.latest(f"{device}.energy")
            assert (energy.value, energy.unit) == (1234, "kWh")
        source = runner.unit.source
        modes = runner.status.children["ahu1"].details["modes"]
        assert modes["ahu1/analog-input,1/present-value"] == "cov"
        polled = runner.status.children["ahu2"].details
        assert set(polled["modes"].values()) == {"poll"}
        assert polled["read"] == "read-property"
        assert runner.status.children["ahu1"].details["read"] == "read-property-multiple"
        assert source.device_endpoints()["ahu1"].endswith(f"{first.address}/device,1001")


async def test_cov_delivers_changes_and_polling_follows_the_other(
        devices: tuple[SimulatedDevice, SimulatedDevice], tmp_path: Path) -> None:
    first, second = devices
    unit = build_unit(tmp_path, source_yaml(devices=two_devices(first, second)))
    async with SourceRunner(unit) as runner:
        await runner.wait_for(lambda: runner.has("ahu1.zone_temp") and runner.has(
            "ahu2.zone_temp"))
        first.object("zone-temp").presentValue = 23.0
        second.object("zone-temp").presentValue = 24.0
        await runner.wait_for(lambda: runner.has("ahu1.zone_temp", value=23.0)
                              and runner.has("ahu2.zone_temp", value=24.0))
        assert runner.status.children["ahu1"].counters["cov_notifications"] >= 1
        assert runner.status.children["ahu2"].counters["cov_notifications"] == 0


async def test_status_flags_and_reliability_become_quality(
        devices: tuple[SimulatedDevice, SimulatedDevice], tmp_path: Path) -> None:
    first, _ = devices
    device = {"id": "ahu1", "instance": first.instance, "address": first.address,
              "interval": "100ms", "points": [
                  {"name": "zone_temp", "object": "analog-input,1", "mode": "poll"}]}
    async with SourceRunner(build_unit(tmp_path, source_yaml(devices=[device]))) as runner:
        await runner.wait_for(lambda: runner.has("bms.zone_temp") or runner.has(
            "ahu1.zone_temp"))
        zone = first.object("zone-temp")
        zone.outOfService = True
        zone.statusFlags = [0, 0, 0, 1]
        await runner.wait_for(lambda: runner.has("ahu1.zone_temp", quality=Quality.UNCERTAIN))
        assert runner.latest("ahu1.zone_temp").reason == "out-of-service"
        zone.statusFlags = [0, 1, 0, 0]
        zone.reliability = "overRange"
        await runner.wait_for(lambda: runner.has("ahu1.zone_temp", quality=Quality.BAD))
        assert runner.latest("ahu1.zone_temp").reason == "fault: over-range"


async def test_unknown_object_and_property_are_bad_events_naming_them(
        devices: tuple[SimulatedDevice, SimulatedDevice], tmp_path: Path) -> None:
    first, second = devices
    points = [{"name": "ghost", "object": "analog-value,99"},
              {"name": "no_such", "object": "analog-input,1", "property": "proportional-constant"},
              {"name": "zone_temp", "object": "analog-input,1"}]
    devices_config = [
        {"id": "ahu1", "instance": first.instance, "address": first.address,
         "interval": "100ms", "points": points},
        {"id": "ahu2", "instance": second.instance, "address": second.address,
         "interval": "100ms", "points": points}]
    async with SourceRunner(build_unit(tmp_path, source_yaml(devices=devices_config))) as runner:
        await runner.wait_for(lambda: all(
            runner.has(f"{device}.{name}") for device in ("ahu1", "ahu2")
            for name in ("ghost", "no_such", "zone_temp")))
        for device in ("ahu1", "ahu2"):
            ghost = runner.latest(f"{device}.ghost")
            assert ghost.quality is Quality.BAD
            assert "analog-value,99" in (ghost.reason or "")
            assert "unknown-object" in (ghost.reason or "")
            missing = runner.latest(f"{device}.no_such")
            assert missing.quality is Quality.BAD
            assert "proportional-constant" in (missing.reason or "")
            assert runner.latest(f"{device}.zone_temp").quality is Quality.GOOD
        assert runner.status.children["ahu1"].state is ConnectionState.UP


async def test_a_point_that_must_be_on_cov_is_bad_where_cov_is_refused(
        devices: tuple[SimulatedDevice, SimulatedDevice], tmp_path: Path) -> None:
    _, second = devices
    device = {"id": "ahu2", "instance": second.instance, "address": second.address,
              "interval": "100ms", "points": [
                  {"name": "zone_temp", "object": "analog-input,1", "mode": "cov"},
                  {"name": "setpoint", "object": "analog-value,1"}]}
    async with SourceRunner(build_unit(tmp_path, source_yaml(devices=[device]))) as runner:
        await runner.wait_for(lambda: runner.has("ahu2.zone_temp")
                              and runner.has("ahu2.setpoint", quality=Quality.GOOD))
        refused = runner.latest("ahu2.zone_temp")
        assert refused.quality is Quality.BAD
        assert "refused SubscribeCOV" in (refused.reason or "")
        details = runner.status.children["ahu2"].details
        assert details["modes"]["ahu2/analog-input,1/present-value"] == "cov"
        assert "ahu2/analog-input,1/present-value" in details["cov_refused"]


async def test_batches_fit_a_device_that_takes_short_apdus_without_segmenting(
        tmp_path: Path) -> None:
    with SimulatedDevice(1005, max_apdu=206, segmentation="no-segmentation") as small:
        device = {"id": "small", "instance": small.instance, "address": small.address,
                  "interval": "100ms", "points": every_point(mode="poll")}
        async with SourceRunner(build_unit(tmp_path, source_yaml(devices=[device]))) as runner:
            names = [point["name"] for point in every_point()]
            await runner.wait_for(lambda: all(runner.has(f"small.{name}", quality=Quality.GOOD)
                                              for name in names))
            details = runner.status.children["small"].details
            assert (details["max_apdu"], details["segmentation"]) == (206, "no-segmentation")
            assert details["properties_per_request"] == 7
            assert runner.latest("small.mode").value == "auto"


async def test_cov_subscriptions_are_renewed_before_their_lifetime_ends(
        devices: tuple[SimulatedDevice, SimulatedDevice], tmp_path: Path) -> None:
    first, _ = devices
    device = {"id": "ahu1", "instance": first.instance, "address": first.address,
              "interval": "100ms", "cov_lifetime": "2s",
              "points": [{"name": "zone_temp", "object": "analog-input,1", "mode": "cov"}]}
    async with SourceRunner(build_unit(tmp_path, source_yaml(devices=[device]))) as runner:
        await runner.wait_for(lambda: runner.has("ahu1.zone_temp", value=21.5))
        counters = runner.status.children["ahu1"].counters
        # Renewed at half the lifetime: three subscriptions span more than one lifetime.
        await runner.wait_for(lambda: counters["cov_subscriptions"] >= 3)
        first.object("zone-temp").presentValue = 22.75
        await runner.wait_for(lambda: runner.has("ahu1.zone_temp", value=22.75))
