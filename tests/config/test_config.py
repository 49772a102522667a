"""Config loading across files: includes, profiles and where errors point."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.errors import ConfigError
from bridge.registry import load_config

MAIN = """\
bridge:
  id: edge-1
include: [profiles/*.yaml]
sources:
  - id: plant
    protocol: modbus
    host: 127.0.0.1
    devices:
      - {id: m1, unit: 1, profile: meter, tags: {feeder: F1}}
      - {id: m2, unit: 2, profile: meter, prefix: "second/", interval: 5s}
"""

PROFILE = """\
profiles:
  meter:
    protocol: modbus
    tags: {model: M100}
    report: {deadband: 0.5}
    points:
      - name: voltage
        address: 30001
        type: float32
        unit: V
      - name: state
        address: 30003
        type: {type}
"""


def write(tmp_path: Path, point_type: str = "uint16") -> Path:
    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "profiles" / "meter.yaml").write_text(PROFILE.replace("{type}", point_type))
    main = tmp_path / "fieldbridge.yaml"
    main.write_text(MAIN)
    return main


def test_profiles_are_instantiated_per_device_with_overrides(tmp_path: Path) -> None:
    config = load_config(write(tmp_path))
    points = {point.id: point for point in config.points["plant"]}
    assert set(points) == {"m1.voltage", "m1.state", "second/voltage", "second/state"}
    assert points["m1.voltage"].tags == {"model": "M100", "feeder": "F1"}
    assert points["m1.voltage"].report.deadband == 0.5
    assert points["second/state"].device == "m2"


def test_an_error_in_an_included_profile_names_that_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, point_type="float33"))
    (issue,) = caught.value.issues
    assert issue.file == str(tmp_path / "profiles" / "meter.yaml")
    assert issue.line == 13
    assert issue.path == "profiles.meter.points[1].type"
    assert "float33" in issue.message


def test_missing_include_and_unknown_top_level_key(tmp_path: Path) -> None:
    main = tmp_path / "fieldbridge.yaml"
    main.write_text("include: [nothing/*.yaml]\nsoucres: []\n")
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    assert [(issue.line, issue.path) for issue in caught.value.issues] == [(1, "include[0]")]
    main.write_text("soucres: []\n")
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    assert [(issue.line, issue.path, issue.message) for issue in caught.value.issues] == [
        (1, "soucres", "unknown key")]


def test_every_shipped_mapping_file_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPCUA_PASSWORD", "x")
    mappings = Path(__file__).resolve().parents[2] / "mappings"
    for path in sorted(mappings.glob("*.yaml")):
        config = load_config(path)
        assert config.sources, path
