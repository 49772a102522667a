"""The Modbus server's configuration: the shipped example, and a register map refused at load
with the file, the line and the key when entries overlap, a point is unknown, not writable or
of a type its entry cannot hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli import main
from bridge.errors import ConfigError
from bridge.registry import load_config
from protocols.modbus.server_config import ModbusServerConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "mappings" / "modbus-server-example.yaml"


def load(tmp_path: Path, registers: list[dict[str, Any]], **server: Any) -> ModbusServerConfig:
    """A configuration with one Modbus source and one Modbus server serving ``registers``."""
    document = {
        "sources": [{"id": "plc", "protocol": "modbus", "host": "127.0.0.1", "devices": [{
            "id": "meter", "points": [
                {"name": "temp", "address": 30001, "type": "float32"},
                {"name": "label", "address": 40001, "type": "string", "length": 4},
                {"name": "setpoint", "address": 40010, "writable": True}]}]}],
        "servers": [{"id": "north", "protocol": "modbus", "port": 5020,
                     "units": [{"unit": 1, "registers": registers}], **server}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    (config,) = load_config(path).servers
    assert isinstance(config, ModbusServerConfig)
    return config


def refused(tmp_path: Path, registers: list[dict[str, Any]], **server: Any) -> str:
    """The one issue the configuration is refused with."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, registers, **server)
    (issue,) = caught.value.issues
    return str(issue)


def test_example_validates() -> None:
    config = load_config(EXAMPLE)
    (server,) = config.servers
    assert isinstance(server, ModbusServerConfig)
    assert server.endpoint() == "modbus://127.0.0.1:5020"
    assert [entry.point for entry in server.units[0].registers] == [
        "boiler.temperature", "boiler.temperature", "boiler.setpoint", "boiler.running",
        "boiler.running"]


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, [{"point": "meter.temp", "table": "input", "address": 7,
                              "type": "float32"}])
    (entry,) = config.units[0].registers
    assert (config.host, config.max_connections, config.allowed_networks) == (
        "127.0.0.1", 16, [])
    assert (entry.when_bad, entry.writable, entry.stale_after) == ("exception", False, None)
    assert (entry.register.start, entry.register.count) == (7, 2)


def test_overlapping_entries_are_refused(tmp_path: Path) -> None:
    issue = refused(tmp_path, [
        {"point": "meter.temp", "table": "holding", "address": 10, "type": "float32"},
        {"point": "meter.setpoint", "table": "holding", "address": 11}])
    assert "config.yaml:" in issue
    assert "servers[0].units[0].registers[1].address:" in issue
    assert "holding 11 is served by entry 0 already" in issue


def test_bits_of_one_register_may_share_it(tmp_path: Path) -> None:
    config = load(tmp_path, [
        {"point": "meter.setpoint", "table": "holding", "address": 3, "bit": 0},
        {"point": "meter.setpoint", "table": "holding", "address": 3, "bit": 1}])
    assert len(config.units[0].registers) == 2


def test_an_unknown_point_is_refused(tmp_path: Path) -> None:
    issue = refused(tmp_path, [{"point": "meter.nope", "table": "input", "address": 0}])
    assert "servers[0].units[0].registers[0].point:" in issue
    assert "no configured point has the id 'meter.nope'" in issue


def test_a_type_that_does_not_fit_its_table_is_refused(tmp_path: Path) -> None:
    issue = refused(tmp_path, [{"point": "meter.temp", "table": "coil", "address": 0,
                                "type": "float32"}])
    assert "registers[0].type:" in issue
    assert "a coil holds one bit" in issue


def test_a_point_whose_values_do_not_fit_is_refused(tmp_path: Path) -> None:
    issue = refused(tmp_path, [{"point": "meter.label", "table": "holding", "address": 0,
                                "type": "float32"}])
    assert "registers[0].type:" in issue
    assert "a string point cannot be served as float32" in issue


def test_a_writable_entry_needs_a_writable_point(tmp_path: Path) -> None:
    issue = refused(tmp_path, [{"point": "meter.temp", "table": "holding", "address": 0,
                                "type": "float32", "writable": True}])
    assert "registers[0].writable:" in issue
    assert "point 'meter.temp' is not writable at its source" in issue


def test_input_registers_are_never_writable(tmp_path: Path) -> None:
    issue = refused(tmp_path, [{"point": "meter.setpoint", "table": "input", "address": 0,
                                "writable": True}])
    assert "registers[0].writable:" in issue
    assert "read-only" in issue


def test_a_sentinel_policy_needs_its_sentinel(tmp_path: Path) -> None:
    issue = refused(tmp_path, [{"point": "meter.temp", "table": "input", "address": 0,
                                "type": "float32", "when_bad": "sentinel"}])
    assert "registers[0].sentinel:" in issue


def test_a_unit_served_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"units\[1\]\.unit: unit id 1 is served twice"):
        load(tmp_path, [{"point": "meter.temp", "table": "input", "address": 0}],
             units=[{"unit": 1, "registers": [{"point": "meter.temp", "table": "input",
                                                "address": 0, "type": "float32"}]}] * 2)


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    issue = refused(tmp_path, [{"point": "meter.temp", "table": "input", "address": 0,
                                "type": "float32", "colour": "red"}])
    assert "registers[0].colour: unknown key" in issue


def test_serve_map_writes_a_register_map_that_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load(tmp_path, [{"point": "meter.temp", "table": "input", "address": 0,
                     "type": "float32"}])
    path = tmp_path / "config.yaml"
    document = yaml.safe_load(path.read_text())
    del document["servers"]
    document["sources"][0]["devices"][0]["points"].append(
        {"name": "run", "table": "coil", "address": 0, "writable": True})
    path.write_text(yaml.safe_dump(document))
    assert main(["serve-map", "-c", str(path)]) == 0
    section = yaml.safe_load(capsys.readouterr().out)
    path.write_text(yaml.safe_dump({**document, **section}))
    (server,) = load_config(path).servers
    assert isinstance(server, ModbusServerConfig)
    served = [(entry.point, entry.table, entry.address, entry.register.data_type,
               entry.writable) for entry in server.units[0].registers]
    assert served == [("meter.run", "coil", 0, "bool", True),
                      ("meter.setpoint", "holding", 0, "int32", True),
                      ("meter.temp", "input", 0, "float32", False)]  # the string is left out
