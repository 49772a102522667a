"""What cpppo's simulator cannot serve, at the pycomm3 seam with a counting fake client:
structures (UDTs) flattened into points, the tag database upload, the packing of reads into
multi-service requests within the connection size, and discovery from a tag database."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SourceRunner
from helpers.logix_server import FakeClient, build_unit, source_yaml

from bridge.config.models import ResolvedPoint
from bridge.core.discovery import DiscoveryContext
from bridge.core.model import Quality
from bridge.registry import load_config
from protocols.logix.discover import LogixDiscoverRequest, discover
from protocols.logix.points import items, pack

pytestmark = pytest.mark.asyncio


def resolved(tmp_path: Path, text: str) -> list[ResolvedPoint]:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    return list(config.points["plc"])


async def test_a_structure_is_flattened_into_its_members(tmp_path: Path) -> None:
    points = [{"name": "filler", "tag": "Filler", "type": "STRUCT", "members": [
        {"name": "Speed", "type": "REAL"}, {"name": "Fault", "type": "BOOL"},
        {"name": "Status.Code", "type": "DINT"}, {"name": "Missing", "type": "INT"}]},
        {"name": "torque", "tag": "Program:Main.Capper.Torque", "type": "REAL"}]
    client = FakeClient(values={
        "Filler": {"Speed": 120.5, "Fault": False, "Status": {"Code": 7}},
        "Program:Main": {"Capper": {"Torque": 3.5}}}, database={})
    unit = build_unit(tmp_path, source_yaml(1, points), client)
    async with SourceRunner(unit) as runner:
        await runner.wait_for(lambda: len({event.point for event in runner.events}) == 5)
        events = {event.point: event for event in runner.events}
    assert events["filler.Speed"].value == 120.5
    assert events["filler.Fault"].value is False
    assert events["filler.Status.Code"].value == 7
    assert events["torque"].value == 3.5
    assert events["filler.Missing"].quality is Quality.BAD
    assert "Filler.Missing" in (events["filler.Missing"].reason or "")
    # An uploaded database: nothing is declared from the configuration.
    assert client.declared == {}
    assert runner.status.details["tag_database"] == "uploaded"


async def test_a_refused_upload_declares_the_configured_types(tmp_path: Path) -> None:
    points = [{"name": "total", "tag": "Total", "type": "DINT"},
              {"name": "temps", "tag": "Temps[2]", "type": "REAL", "count": 3},
              {"name": "step", "tag": "Program:Main.Step", "type": "INT"},
              {"name": "speed", "tag": "Motor.Speed", "type": "REAL"}]
    client = FakeClient(values={"Total": 1, "Temps": [0.0, 0.0, 1.0, 2.0, 3.0],
                                "Program:Main": {"Step": 2}, "Motor": {"Speed": 1.0}})
    unit = build_unit(tmp_path, source_yaml(1, points), client)
    async with SourceRunner(unit) as runner:
        await runner.wait_for(lambda: len(runner.events) >= 6)
    assert {name: (declared.type, declared.elements)
            for name, declared in client.declared.items()} == {
        "Total": ("DINT", 0), "Temps": ("REAL", 5), "Program:Main.Step": ("INT", 0)}
    assert client.reads[0] == ["Total", "Program:Main.Step", "Motor.Speed", "Temps[2]{3}"]


async def test_reads_are_packed_within_the_connection_size(tmp_path: Path) -> None:
    points = [{"name": f"tag{number}", "tag": f"Tag_With_A_Long_Name_{number}",
               "type": "LREAL"} for number in range(200)]
    text = source_yaml(1, points)
    planned = items(resolved(tmp_path, text))
    large = pack(planned, 4002)
    small = pack(planned, 500)
    assert sum(len(packet) for packet in large) == 200
    assert len(large) < len(small)
    for packet in small:
        assert sum(item.request_bytes + 2 for item in packet) <= 500
        assert sum(item.reply_bytes + 2 for item in packet) <= 500
    client = FakeClient(values={f"Tag_With_A_Long_Name_{number}": float(number)
                                for number in range(200)}, size=500)
    unit = build_unit(tmp_path, text, client)
    async with SourceRunner(unit) as runner:
        await runner.wait_for(lambda: len(runner.events) >= 200)
        assert runner.status.details["requests_per_cycle"] == len(small)
        assert runner.status.details["connection_size"] == 500
    assert [len(read) for read in client.reads[:len(small)]] == [len(packet) for packet in small]


async def test_write_goes_through_the_inverse_transform(tmp_path: Path) -> None:
    points = [{"name": "speed", "tag": "Speed", "type": "INT", "scale": 0.1, "writable": True},
              {"name": "mode", "tag": "Mode", "type": "DINT", "writable": True,
               "enum": {0: "off", 1: "auto"}},
              {"name": "small", "tag": "Small", "type": "SINT", "writable": True}]
    client = FakeClient(values={"Speed": 0, "Mode": 0, "Small": 0}, database={})
    unit = build_unit(tmp_path, source_yaml(1, points), client)
    async with SourceRunner(unit) as runner:
        await runner.wait_for(lambda: len(runner.events) >= 3)
        await runner.source.write("speed", 25.5)
        await runner.source.write("mode", "auto")
        with pytest.raises(Exception, match="range of a SINT"):
            await runner.source.write("small", 300)
    assert client.writes == [("Speed", 255), ("Mode", 1)]


UPLOADED = {
    "Line_Speed": {"tag_type": "atomic", "data_type_name": "REAL", "dim": 0},
    "Zone_Temp": {"tag_type": "atomic", "data_type_name": "REAL", "dim": 1,
                  "dimensions": [4, 0, 0]},
    "Program:Main.Step": {"tag_type": "atomic", "data_type_name": "INT", "dim": 0},
    "Recipe": {"tag_type": "struct", "data_type_name": "STRING", "dim": 0},
    "Filler": {"tag_type": "struct", "data_type_name": "FILLER", "dim": 0, "data_type": {
        "attributes": ["Speed", "Status", "History"],
        "internal_tags": {
            "Speed": {"tag_type": "atomic", "data_type_name": "REAL"},
            "Status": {"tag_type": "struct", "data_type_name": "STATUS", "data_type": {
                "attributes": ["Code"],
                "internal_tags": {"Code": {"tag_type": "atomic", "data_type_name": "DINT"}}}},
            "History": {"tag_type": "atomic", "data_type_name": "REAL", "array": 10}}}},
    "Timer1": {"tag_type": "struct", "data_type_name": "TIMER", "dim": 0, "data_type": {
        "attributes": [], "internal_tags": {}}},
}


async def test_discovery_writes_a_mapping_from_the_tag_database(tmp_path: Path) -> None:
    client = FakeClient(database=UPLOADED, values={
        "Line_Speed": 1.5, "Zone_Temp": [1.0, 2.0, 3.0, 4.0], "Program:Main": {"Step": 3},
        "Recipe": "cola", "Filler": {"Speed": 2.0, "Status": {"Code": 1}}})
    request = LogixDiscoverRequest(host="127.0.0.1", port=1)
    found = await discover(request, DiscoveryContext(), client_factory=client.factory)
    assert {item.address for item in found.items} == {
        "Line_Speed", "Zone_Temp[0]", "Program:Main.Step", "Recipe", "Filler"}
    assert any("Timer1" in warning for warning in found.warnings)
    assert "1756-L83E/B" in found.yaml
    path = tmp_path / "discovered.yaml"
    path.write_text(found.yaml, encoding="utf-8")
    config = load_config(path)
    source = config.sources[0]
    assert sorted(point.id for point in config.points[source.id]) == sorted([
        "Filler.Speed", "Filler.Status.Code", "Line_Speed", "Main.Step", "Recipe",
        "Zone_Temp.0", "Zone_Temp.1", "Zone_Temp.2", "Zone_Temp.3"])
    unit = build_unit(tmp_path / "run", found.yaml, client)
    async with SourceRunner(unit) as runner:
        await runner.wait_for(lambda: len({event.point for event in runner.events}) == 9)
    assert all(event.quality is Quality.GOOD for event in runner.events)
