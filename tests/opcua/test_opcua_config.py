"""OPC-UA configuration: the shipped example loads, and each mistake names its key and line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from bridge.errors import ConfigError, ConfigIssue
from bridge.registry import load_config, root_model
from protocols.opcua import OpcuaPoint, OpcuaSourceConfig
from protocols.opcua.config import redact_url

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"

SOURCE = """\
sources:
  - id: plc
    protocol: opcua
    url: opc.tcp://127.0.0.1:4840
"""


def load(tmp_path: Path, text: str) -> list[ConfigIssue]:
    """The issues of loading ``text``; it must fail."""
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return raised.value.issues


def test_the_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPCUA_PASSWORD", "s3cret-from-the-environment")
    config = load_config(MAPPINGS / "opcua-example.yaml")
    line, hmi = config.sources
    assert isinstance(line, OpcuaSourceConfig)
    assert isinstance(hmi, OpcuaSourceConfig)
    assert line.endpoint() == "opc.tcp://192.0.2.20:4840 (Basic256Sha256, SignAndEncrypt)"
    assert hmi.endpoint() == "opc.tcp://192.0.2.21:48010/hmi"
    assert [point.id for point in config.points["line1-plc"]] == [
        "line1.oven_temp", "line1.oven_setpoint", "line1.conveyor_speed", "line1.running",
        "line1.state", "line1.part_count"]
    assert [point.id for point in config.points["legacy-hmi"]] == [
        "legacy-hmi.tank_level", "legacy-hmi.tank_alarm"]
    alarm = config.points["legacy-hmi"][1]
    assert (alarm.report.deadband, alarm.report.heartbeat) == (0.2, 30.0)
    assert alarm.path == ("sources", 1, "points", 1)
    assert line.auth.password is not None
    assert line.auth.password.get_secret_value() == "s3cret-from-the-environment"
    assert "s3cret" not in repr(line)
    assert "s3cret" not in line.model_dump_json()


def test_the_password_may_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("from-a-file\n", encoding="utf-8")
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(SOURCE + textwrap.dedent("""\
        auth: {username: bridge, password: "${file:password}"}
        points: [{name: temp, node: "ns=2;s=Temp"}]
    """).replace("\n", "\n    ").join(["    ", ""]), encoding="utf-8")
    source = load_config(path).sources[0]
    assert isinstance(source, OpcuaSourceConfig)
    assert source.auth.password is not None
    assert source.auth.password.get_secret_value() == "from-a-file"


def test_the_schema_describes_opcua_sources() -> None:
    schema = json.dumps(root_model().model_json_schema())
    assert "OpcuaSourceConfig" in schema
    assert "Browse path from the Objects folder" in schema


@pytest.mark.parametrize(("lines", "path", "message"), [
    (["points: [{name: t, node: ns=2;s=T, path: 2:Plant/2:T}]"], "sources[0].points[0].node",
     "exactly one of `node`"),
    (["points: [{name: t}]"], "sources[0].points[0].node", "exactly one of `node`"),
    (["points: [{name: t, node: ns=two;s=T}]"], "sources[0].points[0].node", "not a NodeId"),
    (["points: [{name: t, node: ns=2;x=T}]"], "sources[0].points[0].node", "not a NodeId"),
    (["points: [{name: t, path: ''}]"], "sources[0].points[0].path", "at least one element"),
    (["points: [{name: t, path: '2:Pl<ant'}]"], "sources[0].points[0].path",
     "not a browse path"),
    (["points: [{name: t, path: '2:Plant//2:T'}]"], "sources[0].points[0].path",
     "empty element"),
    (["points: []"], "sources[0].points", "at least 1 item"),
    (["deadband: {type: percent, value: 150}", "points: [{name: t, node: i=1}]"],
     "sources[0].deadband.value", "between 0 and 100"),
    (["security: {policy: Basic256Sha256}", "points: [{name: t, node: i=1}]"],
     "sources[0].security.mode", "policy None goes with mode None"),
    (["security: {policy: None, mode: Sign}", "points: [{name: t, node: i=1}]"],
     "sources[0].security.policy", "policy None goes with mode None"),
    (["security: {policy: Basic128Rsa15, mode: Sign}", "points: [{name: t, node: i=1}]"],
     "sources[0].security.policy", "Input should be"),
    (["security: {policy: Basic256Sha256, mode: Sign, client_certificate: c.der}",
      "points: [{name: t, node: i=1}]"], "sources[0].security.private_key", "together"),
    (["auth: {username: bridge}", "points: [{name: t, node: i=1}]"],
     "sources[0].auth.password", "needs a password"),
    (["auth: {password: x}", "points: [{name: t, node: i=1}]"],
     "sources[0].auth.username", "needs a username"),
    (["auth: {username: a, password: b, certificate: c.der, private_key: k.pem}",
      "points: [{name: t, node: i=1}]"], "sources[0].auth.certificate", "not both"),
    (["points: [{name: t, node: i=1, deadband: {type: relative, value: 1}}]"],
     "sources[0].points[0].deadband.type", "Input should be"),
    (["points: [{name: t, node: i=1, colour: red}]"], "sources[0].points[0].colour",
     "unknown key"),
])
def test_mistakes_name_their_key(
    tmp_path: Path, lines: list[str], path: str, message: str
) -> None:
    text = SOURCE + "".join(f"    {line}\n" for line in lines)
    found = load(tmp_path, text)
    assert [issue.path for issue in found] == [path], found
    assert message in found[0].message
    assert found[0].line is not None


@pytest.mark.parametrize(("url", "message"), [
    ("http://plc:4840", "expected an endpoint URL"),
    ("opc.tcp://user:pw@plc:4840", "credentials do not belong in the URL"),
    ("opc.tcp://plc:notaport", "invalid port"),
])
def test_bad_urls(tmp_path: Path, url: str, message: str) -> None:
    text = SOURCE.replace("opc.tcp://127.0.0.1:4840", url) + "    points: [{name: t, node: i=1}]\n"
    found = load(tmp_path, text)
    assert [issue.path for issue in found] == ["sources[0].url"]
    assert message in found[0].message
    assert ":pw@" not in found[0].message


@pytest.mark.parametrize(("lines", "path", "message"), [
    (["mode: poll", "deadband: {type: absolute, value: 1}", "points: [{name: t, node: i=1}]"],
     "sources[0].deadband", "applies to mode subscribe"),
    (["mode: poll", "points: [{name: t, node: i=1, queue_size: 5}]"],
     "sources[0].points[0].queue_size", "applies to mode subscribe"),
    (["poll_interval: 5s", "points: [{name: t, node: i=1}]"], "sources[0].poll_interval",
     "applies to mode poll"),
    (["max_nodes_per_read: 5", "points: [{name: t, node: i=1}]"],
     "sources[0].max_nodes_per_read", "applies to mode poll"),
    (["points: [{name: a, node: i=1}, {name: b, node: i=1, queue_size: 4}]"],
     "sources[0].points[1]", "monitored one way"),
    (["report: {deadband: 0.5}", "points: [{name: a, node: i=1, report: {mode: always}}]"],
     "sources[0].points[0].report", "needs mode: change"),
    (["prefix: ''", "points: [{name: a, node: i=1}, {name: a, path: 2:A}]"],
     "sources[0].points[1]", "defined twice"),
])
def test_settings_that_do_not_fit_together(
    tmp_path: Path, lines: list[str], path: str, message: str
) -> None:
    text = SOURCE + "".join(f"    {line}\n" for line in lines)
    found = load(tmp_path, text)
    assert [issue.path for issue in found] == [path], found
    assert message in found[0].message


def test_two_points_may_read_one_node_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(SOURCE + textwrap.dedent("""\
        points:
          - {name: raw, node: "ns=2;s=T"}
          - {name: scaled, node: "ns=2;s=T", scale: 0.1, unit: degC}
    """).replace("\n", "\n    ").join(["    ", ""]), encoding="utf-8")
    config = load_config(path)
    assert [point.id for point in config.points["plc"]] == ["plc.raw", "plc.scaled"]


def test_endpoint_redacts_credentials() -> None:
    assert redact_url("opc.tcp://user:pw@plc:4840/x") == "opc.tcp://user:***@plc:4840/x"
    assert redact_url("opc.tcp://plc:4840") == "opc.tcp://plc:4840"


def test_point_addresses() -> None:
    assert OpcuaPoint(name="a", node="ns=2;s=T").address == "ns=2;s=T"
    assert OpcuaPoint(name="a", path="2:Plant/2:T").address == "/2:Plant/2:T"
    assert OpcuaPoint(name="a", path="/2:Plant.2:T").address == "/2:Plant.2:T"
