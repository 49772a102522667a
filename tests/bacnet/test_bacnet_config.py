"""BACnet configuration: the shipped example, object and property names, addresses, and
errors located by file, line and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.core.source import BuildContext
from bridge.errors import ConfigError
from bridge.registry import load_config, protocols
from protocols.bacnet import BacnetSourceConfig
from protocols.bacnet.units import unit_name

EXAMPLE = Path(__file__).resolve().parents[2] / "mappings" / "bacnet-example.yaml"


def write(tmp_path: Path, **settings: Any) -> Path:
    source = {"id": "bms", "protocol": "bacnet", **settings}
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(yaml.safe_dump({"sources": [source]}, sort_keys=False), encoding="utf-8")
    return path


def device(**settings: Any) -> dict[str, Any]:
    return {"id": "ahu", "instance": 5, "points": [{"name": "t", "object": "analog-input,1"}],
            **settings}


def test_example_mapping_validates_and_builds(tmp_path: Path) -> None:
    config = load_config(EXAMPLE)
    (source,) = config.sources
    assert isinstance(source, BacnetSourceConfig)
    points = {point.id: point for point in config.points[source.id]}
    assert points["ahu-1.supply_setpoint"].spec.priority == 8  # type: ignore[attr-defined]
    assert points["ahu-2.supply_temp_flags"].spec.property == "status-flags"  # type: ignore[attr-defined]
    assert points["ahu-1.mode"].tags == {"site": "north", "building": "B2", "system": "hvac"}
    unit = protocols()["bacnet"].source_unit(source, config.points[source.id],
                                             BuildContext("test", tmp_path))
    assert "main-meter/analog-value,7/priority-array" in unit.mapper.addresses  # type: ignore[attr-defined]


@pytest.mark.parametrize(("settings", "key", "message"), [
    ({"devices": [device(points=[{"name": "t", "object": "analog-flux,1"}])]},
     "devices[0].points[0].object", "not a BACnet object"),
    ({"devices": [device(points=[{"name": "t", "object": "analog-input,1",
                                  "property": "present-valu"}])]},
     "devices[0].points[0].property", "not a BACnet property"),
    ({"devices": [device(points=[{"name": "t", "object": "analog-input,1",
                                  "priority": 17}])]},
     "devices[0].points[0].priority", "less than or equal to 16"),
    ({"devices": [device(address="plc.local:x")]}, "devices[0].address", "not an IPv4"),
    ({"devices": [device(instance=4194303)]}, "devices[0].instance", "4194302"),
    ({"devices": [device(), device(id="other")]}, "devices[1].instance", "used twice"),
    ({"bind": "0.0.0.0:99999", "devices": [device()]}, "bind", "outside 1..65535"),
])
def test_errors_name_file_line_and_key(tmp_path: Path, settings: dict[str, Any], key: str,
                                       message: str) -> None:
    path = write(tmp_path, **settings)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    (issue,) = raised.value.issues
    assert issue.file == str(path)
    assert issue.line is not None
    assert key in issue.path
    assert message in issue.message


def test_objects_and_properties_are_normalized(tmp_path: Path) -> None:
    points = [{"name": "a", "object": "analogValue:3"},
              {"name": "b", "object": "130,7", "property": "85"}]
    config = load_config(write(tmp_path, devices=[device(points=points)]))
    specs = [point.spec for point in config.points["bms"]]
    assert [(spec.object, spec.property) for spec in specs] == [  # type: ignore[attr-defined]
        ("analog-value,3", "present-value"), ("130,7", "present-value")]


@pytest.mark.parametrize(("bacnet", "fieldbridge"), [
    ("degrees-celsius", "degC"), ("kilowatt-hours", "kWh"), ("percent", "%"),
    ("cubic-feet-per-minute", "cubic-feet-per-minute"), ("no-units", None), (None, None)])
def test_units_become_fieldbridge_names(bacnet: str | None, fieldbridge: str | None) -> None:
    assert unit_name(bacnet) == fieldbridge


def test_one_property_with_two_priorities_is_refused(tmp_path: Path) -> None:
    points = [{"name": "a", "object": "analog-output,1", "writable": True, "priority": 8},
              {"name": "b", "object": "analog-output,1", "writable": True}]
    path = write(tmp_path, devices=[device(points=points)])
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    (issue,) = raised.value.issues
    assert issue.line is not None
    assert "devices[0].points[1]" in issue.path
    assert "point 'ahu.a' reads the same property with another mode or priority" in (
        issue.message)
