"""S7 configuration: addresses in both forms, and each mistake named by file, line and key.

In the YAML below, ``# <-`` marks the line an issue must point at.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bridge.errors import ConfigError, ConfigIssue
from bridge.registry import load_config
from protocols.s7.address import Location, parse
from protocols.s7.config import S7Point

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"

SOURCE = """\
sources:
  - id: plc
    protocol: s7
    host: 127.0.0.1
    points:
"""


def issues(tmp_path: Path, text: str) -> list[ConfigIssue]:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return raised.value.issues


def points(*lines: str) -> str:
    return SOURCE + "".join(f"      {line}\n" for line in lines)


def marked_line(text: str) -> int:
    return next(number for number, line in enumerate(text.splitlines(), 1) if "# <-" in line)


@pytest.mark.parametrize(("text", "expected"), [
    ("DB10.DBD4:REAL", Location("DB", 10, 4, "REAL")),
    ("DB1.DBX0.3", Location("DB", 1, 0, "BOOL", bit=3)),
    ("db1.dbw2", Location("DB", 1, 2, "WORD")),
    ("DB2.DBB0:STRING[20]", Location("DB", 2, 0, "STRING", length=20)),
    ("DB2.DBB30:WSTRING[8]", Location("DB", 2, 30, "WSTRING", length=8)),
    ("DB3.DBB8:LREAL", Location("DB", 3, 8, "LREAL")),
    ("DB3.DBB16:DATE_AND_TIME", Location("DB", 3, 16, "DATE_AND_TIME")),
    ("M0.1", Location("M", 0, 0, "BOOL", bit=1)),
    ("MW2", Location("M", 0, 2, "WORD")),
    ("MD4:DINT", Location("M", 0, 4, "DINT")),
    ("IW2", Location("I", 0, 2, "WORD")),
    ("EW2", Location("I", 0, 2, "WORD")),
    ("QB0", Location("Q", 0, 0, "BYTE")),
    ("A1.7", Location("Q", 0, 1, "BOOL", bit=7)),
    ("T1", Location("T", 0, 1, "TIMER")),
    ("C1", Location("C", 0, 1, "COUNTER")),
])
def test_classic_addresses_parse_and_print_back(text: str, expected: Location) -> None:
    location = parse(text)
    assert location == expected
    assert parse(location.classic()) == location


@pytest.mark.parametrize(("text", "message"), [
    ("DB1.DBX0.8", "bits are numbered 0-7"),
    ("DB1.DBX0", "needs its bit number"),
    ("DB1.DBW0:REAL", "not REAL"),
    ("DB1.DBB0:STRING", "needs its length"),
    ("DB1.DBD0:FLOAT", "unknown type"),
    ("DB0.DBW0", "DB numbers start at 1"),
    ("M2", "needs a width"),
    ("X10", "is not an S7 address"),
    ("T1:INT", "has its own type"),
])
def test_wrong_classic_addresses_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_structured_keys_are_the_same_address() -> None:
    structured = S7Point.model_validate(
        {"name": "t", "area": "DB", "db": 10, "start": 4, "type": "REAL"})
    assert structured.location == S7Point.model_validate(
        {"name": "t", "address": "DB10.DBD4:REAL"}).location


@pytest.mark.parametrize(("line", "key", "message"), [
    ("- {name: a, address: DB1.DBW0:REAL}", "address", "not REAL"),
    ("- {name: a, area: DB, start: 0, type: INT}", "db", "needs `db`"),
    ("- {name: a, area: M, start: 0, type: FLOAT}", "type", "unknown type"),
    ("- {name: a, area: M, start: 0, type: BOOL}", "bit", "needs `bit`"),
    ("- {name: a, address: MW0, db: 3}", "db", "belongs to the structured form"),
    ("- {name: a, address: T1, writable: true}", "writable", "timers are read-only"),
    ("- {name: a, address: 'DB1.DBB0:STRING[300]'}", "address", "1-254 characters"),
    ("- {name: a, address: DB1.DBX0.0, scale: 2}", "scale", "apply to numbers"),
])
def test_a_wrong_point_is_refused_at_its_line_and_key(tmp_path: Path, line: str, key: str,
                                                      message: str) -> None:
    text = points(f"{line}  # <-")
    issue, = issues(tmp_path, text)
    assert issue.line == marked_line(text)
    assert issue.path.endswith(f"points[0].{key}")
    assert message in issue.message
    assert issue.file.endswith("fieldbridge.yaml")


def test_a_value_larger_than_the_pdu_is_refused(tmp_path: Path) -> None:
    text = SOURCE.replace("    points:", "    pdu_size: 240\n    points:") + \
        "      - {name: big, address: 'DB1.DBB0:WSTRING[200]'}  # <-\n"
    issue, = issues(tmp_path, text)
    assert "does not fit in one read with a PDU of 240" in issue.message
    assert issue.path.endswith("points[0].address")
    assert issue.line == marked_line(text)


def test_one_tsap_without_the_other_is_refused(tmp_path: Path) -> None:
    text = SOURCE.replace("    points:", "    local_tsap: 0x0100\n    points:") + \
        "      - {name: a, address: MW0}\n"
    issue, = issues(tmp_path, text)
    assert issue.path.endswith("remote_tsap")
    assert "give both TSAPs" in issue.message


def test_arrays_become_one_point_per_element(tmp_path: Path) -> None:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(points("- {name: flags, address: DB1.DBX0.6, count: 4}",
                           "- {name: levels, address: DB1.DBW2:INT, count: 2}"),
                    encoding="utf-8")
    config = load_config(path)
    resolved = {point.id: point.spec for point in config.points["plc"]}
    assert list(resolved) == ["plc.flags.0", "plc.flags.1", "plc.flags.2", "plc.flags.3",
                              "plc.levels.0", "plc.levels.1"]
    addresses = [spec.location.classic() for spec in resolved.values()
                 if isinstance(spec, S7Point)]
    assert addresses == ["DB1.DBX0.6", "DB1.DBX0.7", "DB1.DBX1.0", "DB1.DBX1.1",
                         "DB1.DBW2:INT", "DB1.DBW4:INT"]


def test_the_shipped_example_loads() -> None:
    config = load_config(MAPPINGS / "s7-example.yaml")
    ids = {point.id for source in config.sources for point in config.points[source.id]}
    assert "line2-plc.oven.zone_temperature.3" in ids
    assert "press-plc.press.fault" in ids
    press = next(source for source in config.sources if source.id == "press-plc")
    assert press.endpoint() == "s7://192.0.2.31:102?tsap=0100/0302"
