"""Modbus configuration mistakes: each names the file, the line and the key path.

In the YAML below, ``# <-`` marks the line an issue must point at.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bridge.errors import ConfigError, ConfigIssue
from bridge.registry import load_config
from protocols.modbus.config import ModbusPoint, ModbusSourceConfig, modicon_table

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"

SOURCE = """\
sources:
  - id: plc
    protocol: modbus
    host: 127.0.0.1
    devices:
      - id: meter
        points:
"""


def issues(tmp_path: Path, text: str, **files: str) -> list[ConfigIssue]:
    """The issues of loading ``text`` (plus extra files by name); it must fail."""
    for name, content in files.items():
        (tmp_path / name).write_text(textwrap.dedent(content), encoding="utf-8")
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return raised.value.issues


def marked_line(text: str, occurrence: int = 0) -> int:
    """The 1-based line of the ``occurrence``-th ``# <-`` marker in ``text``."""
    lines = [number for number, line in enumerate(textwrap.dedent(text).splitlines(), 1)
             if "# <-" in line]
    return lines[occurrence]


def only(found: list[ConfigIssue]) -> ConfigIssue:
    assert len(found) == 1, found
    return found[0]


def points(*lines: str) -> str:
    """A config whose one device has these point lines (indented under `points:`)."""
    return SOURCE + "".join(f"          {line}\n" for line in lines)


def test_bad_yaml(tmp_path: Path) -> None:
    text = """\
    sources:
      - id: plc
        protocol: modbus
        host: [127.0.0.1   # <-
    """
    issue = only(issues(tmp_path, text))
    assert issue.file == str(tmp_path / "fieldbridge.yaml")
    assert issue.message.startswith("invalid YAML")
    assert issue.line is not None
    assert issue.line >= marked_line(text)


def test_unknown_key(tmp_path: Path) -> None:
    text = """\
    sources:
      - id: plc
        protocol: modbus
        host: 127.0.0.1
        devices:
          - id: meter
            intervall: 5s   # <-
    """
    issue = only(issues(tmp_path, text))
    assert (issue.line, issue.path, issue.message) == (
        marked_line(text), "sources[0].devices[0].intervall", "unknown key")


def test_wrong_type(tmp_path: Path) -> None:
    text = """\
    sources:
      - id: plc
        protocol: modbus
        host: 127.0.0.1
        port: fivehundred   # <-
        timeout: soon       # <-
    """
    port, timeout = issues(tmp_path, text)
    assert (port.line, port.path) == (marked_line(text), "sources[0].port")
    assert "valid integer" in port.message
    assert "'fivehundred'" in port.message
    assert (timeout.line, timeout.path) == (marked_line(text, 1), "sources[0].timeout")
    assert "duration" in timeout.message


def test_wrong_data_type_and_order(tmp_path: Path) -> None:
    text = points(
        "- name: a",
        "  address: 40001",
        "  type: float   # <-",
        "- name: b",
        "  address: 40003",
        "  type: float32",
        "  order: ABDC   # <-",
    )
    data_type, order = issues(tmp_path, text)
    assert (data_type.line, data_type.path) == (
        marked_line(text), "sources[0].devices[0].points[0].type")
    assert "'float32'" in data_type.message
    assert (order.line, order.path) == (
        marked_line(text, 1), "sources[0].devices[0].points[1].order")


def test_unknown_profile(tmp_path: Path) -> None:
    text = """\
    include: [profiles.yaml]
    sources:
      - id: plc
        protocol: modbus
        host: 127.0.0.1
        devices:
          - id: meter
            profile: energy-metre   # <-
    """
    profiles = """\
    profiles:
      energy-meter:
        protocol: modbus
        points:
          - {name: voltage, address: 30001, type: float32}
    """
    issue = only(issues(tmp_path, text, **{"profiles.yaml": profiles}))
    assert (issue.line, issue.path) == (marked_line(text), "sources[0].devices[0].profile")
    assert issue.message == "unknown profile 'energy-metre' (known: energy-meter)"


def test_overlapping_registers(tmp_path: Path) -> None:
    text = points(
        "- name: voltage",
        "  address: 30001",
        "  type: float32",
        "- name: current",
        "  address: 30002   # <-",
        "  type: float32",
        "- name: running",
        "  address: 40010",
        "  bit: 0",
        "- name: alarm     # sharing a register by bits is fine",
        "  address: 40010",
        "  bit: 1",
        "- name: fault",
        "  address: 40010   # <-",
        "  bit: 1",
        "- name: pump",
        "  table: coil",
        "  address: 3",
        "- name: pump_again",
        "  table: coil",
        "  address: 3       # <-",
    )
    current, fault, pump = issues(tmp_path, text)
    assert (current.line, current.path) == (
        marked_line(text), "sources[0].devices[0].points[1].address")
    assert current.message == ("reads input registers 30002-30003, which point 'voltage' reads "
                               "too (input registers 30001-30002)")
    assert (fault.line, fault.path) == (
        marked_line(text, 1), "sources[0].devices[0].points[4].address")
    assert "bit 1 of holding register 40010, which point 'alarm'" in fault.message
    assert (pump.line, pump.path) == (
        marked_line(text, 2), "sources[0].devices[0].points[6].address")
    assert pump.message == "reads coil offset 3, which point 'pump' reads too (coil offset 3)"


def test_overlap_inside_an_included_profile_names_that_file(tmp_path: Path) -> None:
    text = """\
    include: [meter.yaml]
    sources:
      - id: plc
        protocol: modbus
        host: 127.0.0.1
        devices:
          - {id: one, unit: 1, profile: meter}
          - {id: two, unit: 2, profile: meter}
    """
    profile = """\
    profiles:
      meter:
        protocol: modbus
        points:
          - {name: energy, address: 30001, type: uint32, order: CDAB}
          - {name: power, address: 30002, type: float32}   # <-
    """
    issue = only(issues(tmp_path, text, **{"meter.yaml": profile}))
    assert issue.file == str(tmp_path / "meter.yaml")
    assert issue.line == marked_line(profile)
    assert issue.path == "profiles.meter.points[1].address"


def test_device_point_overlapping_a_profile_point(tmp_path: Path) -> None:
    text = """\
    include: [meter.yaml]
    sources:
      - id: plc
        protocol: modbus
        host: 127.0.0.1
        devices:
          - id: one
            profile: meter
            points:
              - name: extra
                address: 30002   # <-
    """
    profile = "profiles:\n  meter:\n    protocol: modbus\n    points:\n" \
              "      - {name: energy, address: 30001, type: uint32}\n"
    issue = only(issues(tmp_path, text, **{"meter.yaml": profile}))
    assert (issue.line, issue.path) == (
        marked_line(text), "sources[0].devices[0].points[0].address")
    assert "point 'energy'" in issue.message


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ("{name: a, table: holding, address: 65536}   # <-", "0-based offset 0..65535"),
        ("{name: a, address: 465536, type: float32}   # <-", "end past the last address"),
        ("{name: a, address: 20001}   # <-", "needs its table prefix"),
        ("{name: a, address: 1}   # <-", "for a coil"),
        ("{name: a, address: 40000}   # <-", "needs its table prefix"),
        ("{name: a, table: input, address: 65533, type: float64}   # <-",
         "input offset 65536 > 65535"),
    ],
)
def test_address_out_of_range(tmp_path: Path, point: str, message: str) -> None:
    text = points("- " + point)
    issue = only(issues(tmp_path, text))
    assert issue.line == marked_line(text)
    assert issue.path == "sources[0].devices[0].points[0].address"
    assert message in issue.message


def test_offsets_with_a_table_are_not_modicon_numbers(tmp_path: Path) -> None:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(points("- {name: a, table: input, address: 49999, type: uint64}",
                           "- {name: b, address: 349999}"))
    index = load_config(path).point_index()
    first, second = index["meter.a"].spec, index["meter.b"].spec
    assert isinstance(first, ModbusPoint)
    assert isinstance(second, ModbusPoint)
    assert (first.resolved_table, first.start, first.count) == ("input", 49999, 4)
    assert (second.resolved_table, second.start) == ("input", 49998)


@pytest.mark.parametrize(
    ("point", "key", "message"),
    [
        ("{name: a, table: coil, address: 0, type: float32}", "type", "its type is bool"),
        ("{name: a, address: 10001, type: int16}", "type", "its type is bool"),
        ("{name: a, table: discrete, address: 0, bit: 1}", "bit", "applies to registers"),
        ("{name: a, address: 40001, type: bool}", "type", "give `bit`"),
        ("{name: a, address: 40001, type: float32, bit: 3}", "bit", "16-bit register"),
        ("{name: a, address: 40001, bit: 16}", "bit", "less than or equal to 15"),
        ("{name: a, address: 40001, length: 4}", "length", "strings only"),
        ("{name: a, address: 40001, type: string}", "length", "needs `length`"),
        ("{name: a, address: 40001, type: string, length: 2, order: CDAB}", "order",
         "ABCD or BADC"),
        ("{name: a, address: 40001, bit: 2, scale: 10}", "scale", "not to a bool"),
        ("{name: a, address: 40001, type: string, length: 2, round: 1}", "scale",
         "not to a string"),
        ("{name: a, address: 40001, enum: {0: stopped}, scale: 2}", "", "enum or scale"),
        ("{name: a, address: 30001, writable: true}", "writable", "input registers are read-only"),
        ("{name: a, address: 10001, writable: true}", "writable", "discrete inputs are read-only"),
        ("{name: a, address: 40001, scale: 0, writable: true}", "scale", "non-zero scale"),
    ],
)
def test_point_mistakes(tmp_path: Path, point: str, key: str, message: str) -> None:
    text = points(f"- {point}   # <-")
    issue = only(issues(tmp_path, text))
    path = "sources[0].devices[0].points[0]" + (f".{key}" if key else "")
    assert (issue.line, issue.path) == (marked_line(text), path)
    assert message in issue.message


def test_duplicate_point_ids(tmp_path: Path) -> None:
    text = """\
    sources:
      - id: plc
        protocol: modbus
        host: 127.0.0.1
        devices:
          - id: left
            prefix: "pump."
            points:
              - {name: speed, address: 40001}
          - id: right
            unit: 2
            prefix: "pump."
            points:
              - {name: speed, address: 40001}   # <-
    """
    issue = only(issues(tmp_path, text))
    assert (issue.line, issue.path) == (marked_line(text), "sources[0].devices[1].points[0]")
    assert issue.message.startswith("point id 'pump.speed' is defined twice (first at ")


def test_unit_used_twice(tmp_path: Path) -> None:
    text = """\
    sources:
      - id: line
        protocol: modbus
        transport: rtu
        serial: {port: /dev/ttyUSB0}
        devices:
          - {id: a, unit: 3}
          - id: b
            unit: 3   # <-
          - id: c
            unit: 0   # <-
    """
    twice, broadcast = issues(tmp_path, text)
    assert (twice.line, twice.path) == (marked_line(text), "sources[0].devices[1].unit")
    assert twice.message == "unit id 3 is used twice on this source (also by device 'a') (got 3)"
    assert (broadcast.line, broadcast.path) == (marked_line(text, 1),
                                                "sources[0].devices[2].unit")
    assert "broadcast" in broadcast.message


def test_missing_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIELDBRIDGE_TEST_PLC_HOST", raising=False)
    text = """\
    sources:
      - id: plc
        protocol: modbus
        host: ${FIELDBRIDGE_TEST_PLC_HOST}   # <-
    """
    issue = only(issues(tmp_path, text))
    assert (issue.line, issue.path) == (marked_line(text), "sources[0].host")
    assert issue.message == "environment variable FIELDBRIDGE_TEST_PLC_HOST is not set"


def test_environment_variable_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIELDBRIDGE_TEST_PLC_PORT", "5020")
    path = tmp_path / "fieldbridge.yaml"
    path.write_text("sources:\n  - {id: plc, protocol: modbus, host: 10.0.0.5, "
                    "port: '${FIELDBRIDGE_TEST_PLC_PORT}'}\n")
    source = load_config(path).sources[0]
    assert isinstance(source, ModbusSourceConfig)
    assert source.port == 5020
    assert source.endpoint() == "tcp://10.0.0.5:5020"


@pytest.mark.parametrize(
    ("source", "key", "message"),
    [
        ("{id: plc, protocol: modbus}", "host", "transport tcp needs `host`"),
        ("{id: plc, protocol: modbus, transport: rtu-over-tcp}", "host", "needs `host`"),
        ("{id: plc, protocol: modbus, transport: rtu}", "serial", "needs `serial`"),
        ("{id: plc, protocol: modbus, transport: rtu, serial: {port: /dev/ttyS0}, host: x}",
         "host", "rtu uses `serial`"),
        ("{id: plc, protocol: modbus, transport: rtu, serial: {port: /dev/ttyS0}, port: 502}",
         "port", "rtu uses `serial`"),
        ("{id: plc, protocol: modbus, host: x, serial: {port: /dev/ttyS0}}", "serial",
         "rtu only"),
        ("{id: plc, protocol: modbus, transport: udp, host: x}", "transport", "'tcp'"),
        ("{id: plc, protocol: modbus, host: x, max_registers: 126}", "max_registers", "125"),
        ("{id: plc, protocol: modbus, transport: rtu, serial: {port: /dev/ttyS0, parity: X}}",
         "serial.parity", "'N'"),
    ],
)
def test_transport_mistakes(tmp_path: Path, source: str, key: str, message: str) -> None:
    text = f"sources:\n  - {source}   # <-\n"
    issue = only(issues(tmp_path, text))
    assert issue.path == f"sources[0].{key}"
    assert issue.line == 2
    assert message in issue.message


def test_string_larger_than_one_request(tmp_path: Path) -> None:
    text = """\
    sources:
      - id: plc
        protocol: modbus
        host: 127.0.0.1
        max_registers: 8
        devices:
          - id: meter
            points:
              - name: label   # <-
                address: 40001
                type: string
                length: 10
    """
    issue = only(issues(tmp_path, text))
    assert issue.path == "sources[0].devices[0].points[0].length"
    assert issue.line == marked_line(text) + 3
    assert "max_registers: 8" in issue.message


def test_unknown_protocol(tmp_path: Path) -> None:
    issue = only(issues(tmp_path, "sources:\n  - {id: plc, protocol: modbuss, host: x}\n"))
    assert issue.path == "sources[0]"
    assert "unknown protocol" in issue.message


def test_every_issue_is_reported_not_just_the_first(tmp_path: Path) -> None:
    text = points(
        "- {name: a, address: 30001, type: float32}",
        "- {name: b, address: 30002}",
        "- {name: c, address: 30001}",
    )
    found = issues(tmp_path, text)
    assert [issue.path for issue in found] == [
        "sources[0].devices[0].points[1].address", "sources[0].devices[0].points[2].address"]


def test_shipped_example_and_profile_load() -> None:
    config = load_config(MAPPINGS / "modbus-example.yaml")
    assert [source.id for source in config.sources] == ["switchboard", "boiler-room"]
    index = config.point_index()
    assert index["main-meter.energy_import"].spec.unit == "kWh"
    # The device replaced the profile's point of the same name, and added one.
    chiller = index["chiller.current_l1"]
    assert chiller.spec.scale == 40
    assert chiller.report.heartbeat == 60
    assert "chiller.run_hours" in index
    assert index["main-meter.voltage_l1"].report.heartbeat == 300
    assert index["main-meter.voltage_l1"].tags == {
        "site": "north", "building": "B2", "equipment": "energy-meter", "feeder": "incoming"}
    profile = config.profiles["energy-meter"]
    kinds = {point.name: point for point in profile.points if isinstance(point, ModbusPoint)}
    assert kinds["energy_import"].byte_order == "CDAB"
    assert kinds["voltage_l1"].data_type == "float32"
    assert kinds["phase_loss"].bit == 0
    assert kinds["tariff"].enum is not None


def test_modicon_numbers() -> None:
    assert modicon_table(30001) == ("input", 0)
    assert modicon_table(39999) == ("input", 9998)
    assert modicon_table(40001) == ("holding", 0)
    assert modicon_table(465536) == ("holding", 65535)
    assert modicon_table(10001) == ("discrete", 0)
    assert modicon_table(100001) == ("discrete", 0)
    assert modicon_table(1) is None
    assert modicon_table(50001) is None
