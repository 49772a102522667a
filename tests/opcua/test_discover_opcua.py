"""OPC-UA discovery against a real asyncua server: browse, describe, write, validate, run.

The module's server holds a plant of 200 machines with five variables each (1,000), with
engineering units, read-only and writable variables, plus an array, a structure, an unreadable
variable and a reference from a machine back to the plant (a cycle).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Server, ua
from helpers import free_port
from helpers.brokers import SourceRun, TcpProxy, wait_until
from helpers.discovery import in_thread

from bridge import cli
from bridge.core.discovery import Budget, DiscoveryContext, Progress, StreamProgress
from bridge.core.model import Quality
from bridge.demo import asyncua_server_adapter
from bridge.demo.opcua_plant import PlantServer
from bridge.errors import ConnectorError, ErrorCategory
from bridge.registry import load_config
from protocols.opcua.discover import OpcuaDiscoverRequest, discover

pytestmark = pytest.mark.asyncio(loop_scope="module")

NAMESPACE = "urn:fieldbridge:discover-test"
AREAS, LINES, MACHINES = 5, 5, 8
VARIABLES = {
    # name: (value, variant type, engineering unit, writable)
    "Temperature": (61.5, ua.VariantType.Double, "degC", False),
    "Pressure": (1.75, ua.VariantType.Double, "bar", False),
    "Speed": (1450.0, ua.VariantType.Double, "rpm", True),
    "Running": (True, ua.VariantType.Boolean, None, True),
    "Mode": ("auto", ua.VariantType.String, None, False),
}
_DATA_TYPES = {ua.VariantType.Double: ua.ObjectIds.Double,
               ua.VariantType.Boolean: ua.ObjectIds.Boolean,
               ua.VariantType.String: ua.ObjectIds.String,
               ua.VariantType.Int32: ua.ObjectIds.Int32}


def _variable(parent: ua.NodeId, node_id: ua.NodeId, name: str, value: Any,
              variant: ua.VariantType, *, writable: bool = False, rank: int = -1,
              data_type: int | None = None, access: int | None = None,
              reference: int = ua.ObjectIds.HasComponent,
              description: str | None = None) -> ua.AddNodesItem:
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = node_id
    item.BrowseName = ua.QualifiedName(name, node_id.NamespaceIndex if reference !=
                                       ua.ObjectIds.HasProperty else 0)
    item.NodeClass = ua.NodeClass.Variable
    item.ParentNodeId = parent
    item.ReferenceTypeId = ua.NodeId(reference)
    item.TypeDefinition = ua.NodeId(ua.ObjectIds.PropertyType if reference ==
                                    ua.ObjectIds.HasProperty else ua.ObjectIds.BaseDataVariableType)
    attributes = ua.VariableAttributes()
    attributes.DisplayName = ua.LocalizedText(name)
    if description is not None:
        attributes.Description = ua.LocalizedText(description)
    attributes.DataType = ua.NodeId(data_type if data_type is not None else _DATA_TYPES[variant])
    attributes.Value = ua.Variant(value, variant, is_array=rank >= 1 or None)
    attributes.ValueRank = rank
    if rank >= 1:
        attributes.ArrayDimensions = [len(value)]
    level = ua.AccessLevel.CurrentRead.mask | (ua.AccessLevel.CurrentWrite.mask if writable
                                               else 0)
    attributes.AccessLevel = level if access is None else access
    attributes.UserAccessLevel = attributes.AccessLevel
    item.NodeAttributes = attributes
    return item


async def _add(server: Server, items: Sequence[ua.AddNodesItem]) -> None:
    for result in await server.iserver.isession.add_nodes(list(items)):
        result.StatusCode.check()


async def build_plant(server: Server) -> int:
    """The plant under Objects; returns its namespace index."""
    ns = await server.register_namespace(NAMESPACE)
    plant = await server.nodes.objects.add_object(ua.NodeId("Plant", ns), ua.QualifiedName(
        "Plant", ns))
    items: list[ua.AddNodesItem] = []
    units: list[ua.AddNodesItem] = []
    for area in range(AREAS):
        area_node = await plant.add_object(ua.NodeId(f"A{area}", ns), f"{ns}:Area{area}")
        for line in range(LINES):
            line_node = await area_node.add_object(ua.NodeId(f"A{area}L{line}", ns),
                                                   f"{ns}:Line{line}")
            for machine in range(MACHINES):
                key = f"A{area}L{line}M{machine}"
                machine_node = await line_node.add_object(ua.NodeId(key, ns),
                                                          f"{ns}:Machine {machine}")
                for name, (value, variant, unit, writable) in VARIABLES.items():
                    node_id = ua.NodeId(f"{key}.{name}", ns)
                    items.append(_variable(machine_node.nodeid, node_id, name, value, variant,
                                           writable=writable))
                    if unit is not None:
                        units.append(_variable(
                            node_id, ua.NodeId(f"{key}.{name}.EU", ns), "EngineeringUnits",
                            ua.EUInformation(DisplayName=ua.LocalizedText(unit),
                                             Description=ua.LocalizedText(unit)),
                            ua.VariantType.ExtensionObject, data_type=ua.ObjectIds.EUInformation,
                            reference=ua.ObjectIds.HasProperty))
    special = await plant.add_object(ua.NodeId("Special", ns), f"{ns}:Special")
    parent = special.nodeid
    items += [
        _variable(parent, ua.NodeId("Curve", ns), "Curve", [1.0, 2.0, 3.0],
                  ua.VariantType.Double, rank=1),
        _variable(parent, ua.NodeId("Limits", ns), "Limits", ua.Range(Low=0.0, High=100.0),
                  ua.VariantType.ExtensionObject, data_type=ua.ObjectIds.Range),
        _variable(parent, ua.NodeId("Secret", ns), "Secret", 7.0, ua.VariantType.Double,
                  access=0),
        _variable(parent, ua.NodeId("Parts", ns), "Parts made", 1234, ua.VariantType.Int32,
                  writable=True, description="Parts made since the last reset"),
    ]
    await _add(server, items)
    await _add(server, units)
    # A machine refers back to the plant: a browse that followed it would never end.
    machine = server.get_node(ua.NodeId("A0L0M0", ns))
    await machine.add_reference(plant.nodeid, ua.ObjectIds.Organizes)
    return ns


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[str]:
    """The plant server's URL (its namespace has index 2)."""
    instance = Server()
    instance.disable_clock()
    await instance.init()
    instance.set_endpoint("opc.tcp://127.0.0.1:0/")
    instance.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    assert await build_plant(instance) == 2
    await instance.start()
    port = instance.bserver.port
    try:
        yield f"opc.tcp://127.0.0.1:{port}/"
    finally:
        await instance.stop()
        await asyncua_server_adapter.end_sessions(instance)


def _context(tmp_path: Path, **budget: Any) -> DiscoveryContext:
    return DiscoveryContext(progress=StreamProgress(io.StringIO(), tty=False),
                            budget=Budget(**budget), state_dir=tmp_path)


async def test_browse_writes_a_source_that_validates_and_runs(server: str, tmp_path: Path
                                                               ) -> None:
    result = await discover(OpcuaDiscoverRequest(url=server, source_id="plant"),
                            _context(tmp_path))
    assert not result.partial, result.warnings
    assert result.error is None
    by_name = {item.name: item for item in result.items}
    assert len(by_name) == len(result.items) == AREAS * LINES * MACHINES * len(VARIABLES) + 1

    temperature = by_name["Plant.Area0.Line0.Machine_0.Temperature"]
    assert temperature.address == f"nsu={NAMESPACE};s=A0L0M0.Temperature"
    assert (temperature.type, temperature.unit, temperature.writable) == ("Double", "degC",
                                                                          False)
    assert temperature.extra["path"] == "2:Plant/2:Area0/2:Line0/2:Machine 0/2:Temperature"
    speed = by_name["Plant.Area4.Line4.Machine_7.Speed"]
    assert (speed.unit, speed.writable) == ("rpm", True)
    assert by_name["Plant.Area2.Line3.Machine_1.Running"].type == "Boolean"
    parts = by_name["Plant.Special.Parts_made"]
    assert (parts.type, parts.writable, parts.description) == (
        "Int32", True, "Parts made since the last reset")

    text = result.yaml
    not_mapped = text[text.index("# Not mapped:"):]
    assert "2:Plant/2:Special/2:Curve" in not_mapped
    assert "array" in _line(not_mapped, "Curve")
    assert "structure (Range)" in _line(not_mapped, "Limits")
    assert "not readable" in _line(not_mapped, "Secret")
    assert "EngineeringUnits" not in text, "properties are not points"

    path = tmp_path / "plant.yaml"
    path.write_text(text, encoding="utf-8")
    assert cli.main(["validate", str(path)]) == 0
    config = load_config(path)
    expected = {point.id for point in config.points["plant"]}
    assert len(expected) == len(result.items)

    async with SourceRun(path) as run:
        def all_good() -> bool:
            good = {event.point for event in run.events if event.quality is Quality.GOOD}
            return expected <= good
        await wait_until(all_good, 60.0, "a good value for every generated point")
    bad = [event for event in run.events if event.quality is not Quality.GOOD]
    assert not bad, bad[:3]


def _line(text: str, word: str) -> str:
    return next(line for line in text.splitlines() if f":{word} (" in line)


async def test_depth_and_root_limit_the_browse_and_the_cycle_ends(server: str, tmp_path: Path
                                                                  ) -> None:
    shallow = await discover(OpcuaDiscoverRequest(url=server, depth=2), _context(tmp_path))
    assert shallow.items == []
    assert any("depth 2 reached" in warning for warning in shallow.warnings)

    machine = await discover(OpcuaDiscoverRequest(
        url=server, root=f"nsu={NAMESPACE};s=A0L0M0", depth=64), _context(tmp_path))
    # Machine 0 organizes the plant: browsing from it reaches the whole plant, once.
    names = [item.name for item in machine.items]
    assert len(names) == len(set(names)) == AREAS * LINES * MACHINES * len(VARIABLES) + 1
    assert "Temperature" in names
    assert "revisited" not in machine.yaml
    assert "references led to nodes already seen" in machine.yaml


async def test_a_size_bound_gives_a_partial_result(server: str, tmp_path: Path) -> None:
    result = await discover(OpcuaDiscoverRequest(url=server), _context(tmp_path, max_items=1))
    assert result.partial
    assert result.error is None
    assert result.yaml.startswith("# PARTIAL")
    assert any("size bound" in warning for warning in result.warnings)


async def test_unreachable_endpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConnectorError) as caught:
        await discover(OpcuaDiscoverRequest(url=f"opc.tcp://127.0.0.1:{free_port()}/",
                                            timeout=2.0), _context(tmp_path))
    assert caught.value.category is ErrorCategory.TRANSIENT
    assert "refused" in caught.value.reason.lower()


async def test_a_silent_server_times_out(tmp_path: Path) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectorError) as caught:
            await discover(OpcuaDiscoverRequest(url=f"opc.tcp://127.0.0.1:{port}/",
                                                timeout=0.5), _context(tmp_path))
        assert caught.value.category is ErrorCategory.TRANSIENT
    finally:
        silent.close()
        await silent.wait_closed()


async def test_a_refused_security_policy_is_a_clear_error(server: str, tmp_path: Path) -> None:
    request = OpcuaDiscoverRequest.model_validate({
        "url": server, "security": {"policy": "Basic256Sha256", "mode": "SignAndEncrypt"}})
    with pytest.raises(ConnectorError) as caught:
        await discover(request, _context(tmp_path))
    assert caught.value.category is ErrorCategory.CONFIG
    assert "no endpoint with this security policy" in caught.value.reason


class _CutAfterFirstBatch(Progress):
    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy

    def update(self, done: int, total: int | None, note: str) -> None:
        if "browsed" in note:
            self.proxy.cut()


async def test_a_server_breaking_the_browse_gives_a_partial_result(tmp_path: Path) -> None:
    async with PlantServer() as plant, TcpProxy("127.0.0.1", plant.port) as proxy:
        context = DiscoveryContext(progress=_CutAfterFirstBatch(proxy), state_dir=tmp_path)
        result = await discover(OpcuaDiscoverRequest(
            url=f"opc.tcp://127.0.0.1:{proxy.port}/", root=plant.node_id("Boiler"),
            timeout=2.0), context)
    assert result.partial
    assert result.error is not None
    assert result.error.startswith("browse")
    assert result.yaml.startswith("# PARTIAL: the browse did not finish")


async def test_the_command_writes_the_file_and_exits_non_zero_on_failure(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out.yaml"
    status = await in_thread(cli.main, [
        "discover", "opcua", server, "--root", f"nsu={NAMESPACE};s=Special",
        "--output", str(output), "--state-dir", str(tmp_path)])
    assert status == 0, capsys.readouterr().err
    assert "Parts_made" in output.read_text()
    assert "wrote 1 points" in capsys.readouterr().err

    status = await in_thread(cli.main, [
        "discover", "opcua", f"opc.tcp://127.0.0.1:{free_port()}/", "--timeout", "1"])
    assert status == 1
    assert "error: " in capsys.readouterr().err

    status = await in_thread(cli.main, ["discover", "opcua", server, "--depth", "0"])
    assert status == 2
    assert "--depth" in capsys.readouterr().err
