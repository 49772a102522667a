"""Logix configuration: the shipped example loads, and each mistake names the file, the
line and the key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bridge.errors import ConfigError, ConfigIssue
from bridge.registry import load_config

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"

SOURCE = """\
sources:
  - id: plc
    protocol: logix
    host: 127.0.0.1
    points:
"""


def only_issue(tmp_path: Path, text: str) -> ConfigIssue:
    """The one issue of loading ``text``; the load must fail."""
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    issues = raised.value.issues
    assert len(issues) == 1, issues
    return issues[0]


def test_shipped_example_loads_flattened() -> None:
    config = load_config(MAPPINGS / "logix-example.yaml")
    assert [source.id for source in config.sources] == ["line1-plc", "conveyor-drive"]
    index = config.point_index()
    assert [f"line1.zone_temp.{number}" in index for number in range(8)] == [True] * 8
    assert index["line1.zone_temp.7"].spec.tag == "Zone_Temp[7]"  # type: ignore[attr-defined]
    assert index["line1.filler.Status.Code"].spec.tag == "Filler.Status.Code"  # type: ignore[attr-defined]
    assert index["line1.filler.Speed"].spec.unit == "bpm"
    assert index["line1.step"].tags == {"site": "north", "line": "1"}
    assert "drive.product" in index


@pytest.mark.parametrize(("point", "key", "message"), [
    ("{name: a, tag: 'Bad Tag', type: DINT}", "tag", "expected a tag path"),
    ("{name: a, tag: Speed, type: FLOAT}", "type", "BOOL"),
    ("{name: a, type: DINT}", "tag", "exactly one"),
    ("{name: a, tag: Speed, cip: {class: 1, attribute: 7}, type: DINT}", "tag", "exactly one"),
    ("{name: a, tag: Speed, type: DINT, count: 4}", "count", "first element"),
    ("{name: a, tag: Motor, type: STRUCT}", "members", "needs `members`"),
    ("{name: a, tag: Speed, type: STRING, scale: 2}", "scale", "numbers"),
    ("{name: a, cip: {class: 1, attribute: 7}, type: INT, writable: true}", "writable",
     "read-only"),
])
def test_wrong_address_or_type_is_refused_at_its_line(
        tmp_path: Path, point: str, key: str, message: str) -> None:
    text = SOURCE + "      - name: ok\n        tag: Total\n        type: DINT\n" \
        f"      - {point}\n"
    issue = only_issue(tmp_path, text)
    assert issue.file.endswith("fieldbridge.yaml")
    assert issue.line == 9
    assert issue.path.startswith("sources[0].points[1]")
    assert key in issue.path
    assert message in issue.message


def test_route_and_slot_are_exclusive(tmp_path: Path) -> None:
    text = SOURCE.replace("    points:\n", "    slot: 1\n    route: 1/0\n    points: []\n")
    issue = only_issue(tmp_path, text)
    assert (issue.path, issue.line) == ("sources[0].route", 6)


def test_one_tag_read_as_two_types_is_refused(tmp_path: Path) -> None:
    text = SOURCE + "      - {name: a, tag: Total, type: DINT}\n" \
        "      - {name: b, tag: Total, type: REAL}\n"
    issue = only_issue(tmp_path, text)
    assert issue.path == "sources[0].points[1].type"
    assert issue.line == 7
    assert "point 'a'" in issue.message


def test_a_device_without_tags_refuses_tag_points(tmp_path: Path) -> None:
    text = SOURCE.replace("    points:\n", "    controller: false\n    points:\n") \
        + "      - {name: a, tag: Total, type: DINT}\n"
    issue = only_issue(tmp_path, text)
    assert issue.path == "sources[0].points[0].tag"
    assert issue.line == 7
