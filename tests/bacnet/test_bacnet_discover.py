"""BACnet discovery against two simulated devices: Who-Is, object lists read whole or element
by element, and the mapping it writes validating and running good."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from bacpypes3.local.analog import AnalogValueObject
from helpers.bacnet_devices import SimulatedDevice, free_udp_port
from helpers.brokers import SourceRun, wait_until
from helpers.discovery import in_thread

from bridge import cli
from bridge.core.discovery import DiscoveryContext
from bridge.core.model import Quality
from bridge.registry import load_config
from protocols.bacnet.discover import BacnetDiscoverRequest, discover


@pytest.fixture
async def devices() -> AsyncIterator[tuple[SimulatedDevice, SimulatedDevice]]:
    """1001 segments its answers; 1002 takes short APDUs and has no ReadPropertyMultiple."""
    with SimulatedDevice(1001) as first, SimulatedDevice(
            1002, cov=False, multiple=False, max_apdu=206,
            segmentation="no-segmentation") as second:
        yield first, second


async def test_discovery_writes_a_mapping_that_runs_good(
        devices: tuple[SimulatedDevice, SimulatedDevice], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = devices
    request = BacnetDiscoverRequest(target=f"{first.address},{second.address}", low=1001,
                                    high=1002, bind=f"127.0.0.1:{free_udp_port()}",
                                    timeout=1.0)
    result = await discover(request, DiscoveryContext())
    assert not result.partial, result.warnings
    assert len(result.items) == 20
    document = yaml.safe_load(result.yaml)
    (source,) = document["sources"]
    assert [device["instance"] for device in source["devices"]] == [1001, 1002]
    points = {point["name"]: point for point in source["devices"][0]["points"]}
    assert points["zone-temp"] == {"name": "zone-temp", "object": "analog-input,1",
                                   "unit": "degC", "description": "Zone air"}
    assert points["mode"]["description"] == "states: 1 off, 2 on, 3 auto"
    assert points["speed"]["writable"] is True
    assert points["energy"]["unit"] == "kWh"
    assert "network-port,1" in result.yaml  # listed as not mapped

    path = tmp_path / "bacnet.yaml"
    path.write_text(result.yaml, encoding="utf-8")
    monkeypatch.setenv("BACNET_BIND", f"127.0.0.1:{free_udp_port()}")
    expected = {point.id for point in load_config(path).points["bacnet"]}
    assert len(expected) == 20
    async with SourceRun(path) as run:
        def good() -> set[str]:
            return {event.point for event in run.events if event.quality is Quality.GOOD}

        await wait_until(lambda: expected <= good(), what="a good value for every point")
    latest = {event.point: event for event in run.events}
    assert latest["ahu-1001.mode"].value == "auto"
    assert latest["ahu-1002.zone-temp"].unit == "degC"
    assert not [event for event in run.events if event.quality is not Quality.GOOD]


async def test_an_object_list_too_long_for_one_answer_is_read_element_by_element() -> None:
    many = [AnalogValueObject(objectIdentifier=("analog-value", instance),
                              objectName=f"value-{instance}", presentValue=float(instance),
                              units="percent", statusFlags=[0, 0, 0, 0], outOfService=False,
                              eventState="normal")
            for instance in range(1, 321)]
    with SimulatedDevice(1003, objects=many, segmentation="no-segmentation") as device:
        request = BacnetDiscoverRequest(target=device.address, low=1003, high=1003,
                                        bind=f"127.0.0.1:{free_udp_port()}", timeout=1.0)
        result = await discover(request, DiscoveryContext())
    assert not result.partial, result.warnings
    assert len(result.items) == 320
    assert "device 1003: its object list was read element by element" in result.yaml
    assert {item.unit for item in result.items} == {"%"}


async def test_nobody_answering_writes_no_source(tmp_path: Path) -> None:
    request = BacnetDiscoverRequest(target=f"127.0.0.1:{free_udp_port()}",
                                    bind=f"127.0.0.1:{free_udp_port()}", wait=0.2)
    result = await discover(request, DiscoveryContext())
    assert result.items == []
    assert "No device answered" in result.yaml


async def test_the_command(devices: tuple[SimulatedDevice, SimulatedDevice],
                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = devices
    output = tmp_path / "bacnet.yaml"
    status = await in_thread(cli.main, [
        "discover", "bacnet", first.address, "--low", "1001", "--high", "1001",
        "--bind", f"127.0.0.1:{free_udp_port()}", "--output", str(output)])
    assert status == 0, capsys.readouterr().err
    assert "object: multi-state-value,1" in output.read_text()
    assert await in_thread(cli.main, ["validate", str(output)]) == 0
