"""The Logix source against cpppo's EtherNet/IP simulator: every atomic type, an array
slice, a program-scoped tag, multi-service reads, write-back, a tag the controller rejects,
a CIP attribute, and a controller that stops answering."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import SourceRunner
from helpers.logix_server import LogixSimulator, build_unit, source_yaml

from bridge.core.model import Quality
from bridge.core.status import ConnectionState
from bridge.errors import ReadError, WriteError

pytestmark = pytest.mark.asyncio

POINTS = [
    {"name": "flag", "tag": "Flag", "type": "BOOL", "writable": True},
    {"name": "small", "tag": "Small", "type": "SINT", "writable": True},
    {"name": "count", "tag": "Count", "type": "INT", "writable": True},
    {"name": "total", "tag": "Total", "type": "DINT", "writable": True},
    {"name": "big", "tag": "Big", "type": "LINT", "writable": True},
    {"name": "speed", "tag": "Speed", "type": "REAL", "writable": True, "scale": 0.5},
    {"name": "precise", "tag": "Precise", "type": "LREAL", "writable": True},
    {"name": "label", "tag": "Name", "type": "STRING"},
    {"name": "temps", "tag": "Temps[2]", "type": "REAL", "count": 4},
    {"name": "step", "tag": "Program:Main.Step", "type": "DINT", "writable": True},
]


def latest(runner: SourceRunner) -> dict[str, object]:
    """The last event of each point."""
    return {event.point: event for event in runner.events}


async def test_every_type_reads_and_writes_back(tmp_path: Path) -> None:
    async with LogixSimulator() as simulator:
        unit = build_unit(tmp_path, source_yaml(simulator.port, POINTS))
        async with SourceRunner(unit) as runner:
            await runner.wait_for(lambda: runner.status.state is ConnectionState.UP
                                  and len(latest(runner)) == 13)
            first = latest(runner)
            assert all(event.quality is Quality.GOOD for event in first.values()), first
            writes = {"flag": True, "small": -5, "count": 1234, "total": -70000,
                      "big": 2**40, "speed": 10.5, "precise": 3.25, "step": 7}
            for point, value in writes.items():
                await runner.source.write(point, value)
            await runner.wait_for(lambda: all(
                latest(runner)[point].value == value for point, value in writes.items()))
            details = runner.status.details
            assert details["connection_size"] >= 500
            assert details["tag_database"] == "configured types"
            # Ten tags and one four-element slice: one multi-service request per cycle.
            assert details["requests_per_cycle"] == 1
            assert [event.point for event in runner.events[:13]] == [
                "flag", "small", "count", "total", "big", "speed", "precise", "label", "step",
                "temps.2", "temps.3", "temps.4", "temps.5"]
            assert latest(runner)["label"].value == ""
            reading = await runner.source.read("speed")
            assert reading[0].value == pytest.approx(21.0)  # the raw REAL: 10.5 / 0.5


async def test_a_tag_the_controller_rejects_is_bad_and_named(tmp_path: Path) -> None:
    points = [{"name": "total", "tag": "Total", "type": "DINT"},
              {"name": "beyond", "tag": "Temps[20]", "type": "REAL"},
              {"name": "missing", "tag": "NoSuchTag", "type": "DINT"}]
    async with LogixSimulator() as simulator:
        unit = build_unit(tmp_path, source_yaml(simulator.port, points))
        async with SourceRunner(unit) as runner:
            await runner.wait_for(lambda: len(latest(runner)) == 3)
            events = latest(runner)
            assert events["total"].quality is Quality.GOOD
            assert events["beyond"].quality is Quality.BAD
            assert "Temps[20]" in events["beyond"].reason
            assert events["missing"].quality is Quality.BAD
            assert "NoSuchTag" in events["missing"].reason
            assert runner.status.state is ConnectionState.DEGRADED
            assert "NoSuchTag" in (runner.status.last_error or "")
            with pytest.raises(ReadError, match="NoSuchTag"):
                await runner.source.read("missing")
            with pytest.raises(WriteError, match="tag NoSuchTag"):
                await runner.source.write("missing", 1)


@pytest.mark.parametrize("controller", [True, False])
async def test_cip_attributes_of_the_identity_object(tmp_path: Path, controller: bool) -> None:
    points = [{"name": "vendor", "cip": {"class": 1, "instance": 1, "attribute": 1},
               "type": "INT"},
              {"name": "product", "cip": {"class": 1, "instance": 1, "attribute": 7},
               "type": "STRING"}]
    async with LogixSimulator() as simulator:
        unit = build_unit(tmp_path, source_yaml(simulator.port, points,
                                                controller=controller))
        async with SourceRunner(unit) as runner:
            await runner.wait_for(lambda: len(latest(runner)) == 2)
            events = latest(runner)
            assert events["vendor"].value == 1  # Rockwell Automation/Allen-Bradley
            assert "1756" in str(events["product"].value)
            assert runner.status.details["requests_per_cycle"] == 2


async def test_a_controller_that_stops_answering_goes_down_then_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge.core.status")
    points = [{"name": "total", "tag": "Total", "type": "DINT"}]
    async with LogixSimulator() as simulator:
        unit = build_unit(tmp_path, source_yaml(simulator.port, points, timeout="300ms"))
        async with SourceRunner(unit, supervised=True) as runner:
            await runner.wait_for(lambda: runner.status.state is ConnectionState.UP)
            simulator.pause()
            try:
                await runner.wait_for(lambda: runner.status.state is ConnectionState.DOWN)
                assert runner.events[-1].quality is Quality.BAD
            finally:
                simulator.resume()
            await runner.wait_for(lambda: runner.status.state is ConnectionState.UP
                                  and runner.events[-1].quality is Quality.GOOD)
    messages = [record.getMessage() for record in caplog.records
                if record.name == "bridge.core.status"]
    assert len([message for message in messages if "source plc down" in message]) == 1, messages
    assert len([message for message in messages if "source plc recovered" in message]) == 1


async def test_without_the_upload_the_configured_types_are_used(tmp_path: Path) -> None:
    points = [{"name": "total", "tag": "Total", "type": "DINT"},
              {"name": "temps", "tag": "Temps[0]", "type": "REAL", "count": 2}]
    async with LogixSimulator() as simulator:
        unit = build_unit(tmp_path, source_yaml(simulator.port, points, upload_tags=False,
                                                connection_size=500))
        async with SourceRunner(unit) as runner:
            await runner.wait_for(lambda: len(latest(runner)) == 3)
            assert all(event.quality is Quality.GOOD for event in latest(runner).values())
            assert runner.status.details["tag_database"] == "configured types"
            assert runner.status.details["connection_size"] == 500
