"""The OPC-UA source against a real asyncua server: subscribe, poll, bad nodes, write-back.

One server serves the whole module (it takes a second to start); each test reads the
variables it changes itself, so the tests do not depend on each other's order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import ua
from helpers import free_port
from helpers.opcua_server import (
    VARIABLES,
    ServerRecorder,
    SourceRunner,
    source_config,
)

from bridge.core.model import Quality
from bridge.core.status import ConnectionState
from bridge.demo.opcua_plant import NAMESPACE_URI, PlantServer
from bridge.errors import ErrorCategory, ReadError, WriteError

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def plant() -> AsyncIterator[PlantServer]:
    async with PlantServer(variables=VARIABLES, max_nodes_per_read=3) as server:
        await server.set("Sensor.Locked", None, status=ua.StatusCodes.BadNotReadable)
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def recorder(plant: PlantServer) -> ServerRecorder:
    watcher = ServerRecorder(plant)
    watcher.attach()
    return watcher


async def test_subscribe_delivers_changes_with_source_timestamps(
    plant: PlantServer, tmp_path: Path
) -> None:
    config = source_config(plant.url, [
        {"name": "temp", "node": plant.node_id("Boiler.Temperature"), "unit": "degC"},
        {"name": "pressure", "path": plant.browse_path("Boiler.Pressure")},
    ])
    async with SourceRunner.of(config, tmp_path) as runner:
        await runner.wait_for(lambda: runner.has("plc.temp") and runner.has("plc.pressure"))
        assert runner.status.state is ConnectionState.UP
        stamp = datetime(2026, 3, 4, 5, 6, 7, 250000, tzinfo=UTC)
        await plant.set("Boiler.Temperature", 71.25, source_timestamp=stamp)
        await runner.wait_for(lambda: runner.has("plc.temp", value=71.25))
        event = runner.latest("plc.temp")
        assert event.quality is Quality.GOOD
        assert event.ts == stamp.timestamp()
        assert event.received_at > event.ts
        assert (event.source, event.protocol, event.unit) == ("plc", "opcua", "degC")
        assert isinstance(runner.latest("plc.pressure").value, float)


async def test_status_codes_become_quality(plant: PlantServer, tmp_path: Path) -> None:
    config = source_config(plant.url, [{"name": "flaky", "node": plant.node_id("Sensor.Flaky")}])
    async with SourceRunner.of(config, tmp_path) as runner:
        await plant.set("Sensor.Flaky", 5.5)
        await runner.wait_for(lambda: runner.has("plc.flaky", value=5.5))
        await plant.set("Sensor.Flaky", 5.75, status=ua.StatusCodes.UncertainLastUsableValue)
        await runner.wait_for(lambda: runner.has("plc.flaky", quality=Quality.UNCERTAIN))
        uncertain = runner.latest("plc.flaky")
        assert (uncertain.value, uncertain.reason) == (5.75, "UncertainLastUsableValue")
        await plant.set("Sensor.Flaky", 0.0, status=ua.StatusCodes.BadSensorFailure)
        await runner.wait_for(lambda: runner.has("plc.flaky", quality=Quality.BAD))
        bad = runner.latest("plc.flaky")
        assert (bad.value, bad.reason) == (None, "BadSensorFailure")
        # A bad value is the device's trouble, not the configuration's: the source stays up.
        assert runner.status.state is ConnectionState.UP
        await plant.set("Sensor.Flaky", 6.0)
        await runner.wait_for(lambda: runner.has("plc.flaky", quality=Quality.GOOD, value=6.0))


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_unusable_nodes_are_bad_and_the_others_flow(
    plant: PlantServer, tmp_path: Path, mode: str
) -> None:
    cycle = {"poll_interval": 0.05} if mode == "poll" else {}
    config = source_config(plant.url, [
        {"name": "temp", "node": plant.node_id("Boiler.Pressure")},
        {"name": "missing", "node": f"ns={plant.namespace};s=No.Such.Node"},
        {"name": "lost", "path": f"{plant.namespace}:Plant/{plant.namespace}:Nowhere"},
        {"name": "foreign", "node": "nsu=urn:not:on:this:server;s=Boiler.Temperature"},
        {"name": "locked", "node": plant.node_id("Sensor.Locked")},
        {"name": "curve", "node": plant.node_id("Sensor.Curve")},
        {"name": "running", "node": f"nsu={NAMESPACE_URI};s=Boiler.Running"},
    ], mode=mode, **cycle)
    bad = ["plc.missing", "plc.lost", "plc.foreign", "plc.locked", "plc.curve"]
    async with SourceRunner.of(config, tmp_path) as runner:
        await runner.wait_for(lambda: all(runner.has(point, quality=Quality.BAD)
                                          for point in bad))
        reasons = {point: runner.latest(point).reason for point in bad}
        assert reasons["plc.missing"] == "BadNodeIdUnknown"
        assert reasons["plc.lost"] == "BadNoMatch"
        assert reasons["plc.foreign"] == "namespace urn:not:on:this:server is not on the server"
        assert reasons["plc.locked"] == "BadNotReadable"
        assert "array" in (reasons["plc.curve"] or "")
        await runner.wait_for(lambda: runner.has("plc.running", quality=Quality.GOOD,
                                                 value=True))
        await runner.wait_for(lambda: runner.status.state is ConnectionState.DEGRADED)
        assert runner.status.error_category is ErrorCategory.CONFIG
        unavailable = runner.status.details["unavailable"]
        assert len(unavailable) == 4, unavailable  # the array is a value problem, not a node's
        await plant.set("Boiler.Pressure", 2.25)
        await runner.wait_for(lambda: runner.has("plc.temp", value=2.25))
        assert not runner.task or not runner.task.done()


@pytest.mark.parametrize(("limit", "batches"), [(None, [3, 3, 1]), (2, [2, 2, 2, 1])])
async def test_poll_reads_in_batches_the_server_accepts(
    plant: PlantServer, recorder: ServerRecorder, tmp_path: Path, limit: int | None,
    batches: list[int],
) -> None:
    names = ["Boiler.Temperature", "Boiler.Pressure", "Boiler.Running", "Boiler.Mode",
             "Pump.Speed", "Pump.Starts", "Sensor.Flaky"]
    points = [{"name": name.replace(".", "_").lower(), "node": plant.node_id(name)}
              for name in names]
    extra = {"max_nodes_per_read": limit} if limit is not None else {}
    config = source_config(plant.url, points, mode="poll", poll_interval=0.05, **extra)
    recorder.clear()
    async with SourceRunner.of(config, tmp_path) as runner:
        # Two whole cycles: the batches repeat, every node once per cycle.
        await runner.wait_for(lambda: len(recorder.reads) >= 2 * len(batches))
        await runner.wait_for(lambda: all(runner.has(f"plc.{point['name']}")
                                          for point in points))
    cycle = recorder.reads[:len(batches)]
    assert [len(read) for read in cycle] == batches
    assert sorted(node for read in cycle for node in read) == sorted(
        plant.node_id(name) for name in names)
    assert recorder.reads[len(batches):2 * len(batches)] == cycle
    assert max(len(read) for read in recorder.reads) <= (limit or 3)
    assert runner.status.details["read_batches"] == len(batches)


async def test_monitoring_settings_are_asked_of_the_server(
    plant: PlantServer, recorder: ServerRecorder, tmp_path: Path
) -> None:
    config = source_config(plant.url, [
        {"name": "temp", "node": plant.node_id("Boiler.Temperature")},
        {"name": "speed", "node": plant.node_id("Pump.Speed"), "sampling_interval": "20ms",
         "queue_size": 5, "deadband": {"type": "percent", "value": 2.5}},
    ], sampling_interval="100ms", queue_size=2, deadband={"type": "absolute", "value": 0.5})
    recorder.clear()
    async with SourceRunner.of(config, tmp_path) as runner:
        await runner.wait_for(lambda: runner.has("plc.temp") and runner.has("plc.speed"))
    by_node = {item.ItemToMonitor.NodeId.to_string(): item.RequestedParameters
               for item in recorder.monitored}
    temp, speed = by_node[plant.node_id("Boiler.Temperature")], by_node[plant.node_id("Pump.Speed")]
    assert (temp.SamplingInterval, temp.QueueSize) == (100.0, 2)
    assert (temp.Filter.DeadbandType, temp.Filter.DeadbandValue) == (ua.DeadbandType.Absolute,
                                                                      0.5)
    assert (speed.SamplingInterval, speed.QueueSize) == (20.0, 5)
    assert (speed.Filter.DeadbandType, speed.Filter.DeadbandValue) == (ua.DeadbandType.Percent,
                                                                       2.5)


async def test_write_back_converts_to_the_node_type(plant: PlantServer, tmp_path: Path) -> None:
    config = source_config(plant.url, [
        {"name": "setpoint", "node": plant.node_id("Boiler.Setpoint"), "scale": 0.1,
         "writable": True},
        {"name": "starts", "node": plant.node_id("Pump.Starts"), "writable": True},
        {"name": "state", "path": plant.browse_path("Pump.State"), "writable": True,
         "enum": {0: "off", 1: "on", 2: "fault"}},
        {"name": "mode", "node": plant.node_id("Boiler.Mode")},
    ])
    async with SourceRunner.of(config, tmp_path) as runner:
        await runner.wait_for(lambda: runner.has("plc.state"))
        source = runner.source
        await source.write("plc.setpoint", 65.5)
        assert await plant.get("Boiler.Setpoint") == pytest.approx(655.0)
        await source.write("plc.starts", 40)
        assert await plant.get("Pump.Starts") == 40
        await source.write("plc.state", "fault")
        assert await plant.get("Pump.State") == 2
        await runner.wait_for(lambda: runner.has("plc.state", value="fault"))
        with pytest.raises(WriteError, match="Int32") as refused:
            await source.write("plc.starts", 2.5)
        assert refused.value.category is ErrorCategory.CONFIG
        with pytest.raises(WriteError, match="outside the range"):
            await source.write("plc.starts", 2**40)
        with pytest.raises(WriteError, match="not one of the point's labels"):
            await source.write("plc.state", "exploded")
        readings = await source.read("plc.setpoint")
        assert [runner.unit.mapper.map(reading)[0].value for reading in readings] == [
            pytest.approx(65.5)]


async def test_live_read_and_write_need_a_connection(plant: PlantServer, tmp_path: Path) -> None:
    config = source_config(plant.url, [{"name": "starts", "node": plant.node_id("Pump.Starts"),
                                    "writable": True}])
    runner = SourceRunner.of(config, tmp_path)
    with pytest.raises(ReadError, match="not connected") as error:
        await runner.source.read("plc.starts")
    assert error.value.category is ErrorCategory.TRANSIENT
    with pytest.raises(WriteError, match="no such point"):
        await runner.source.write("plc.other", 1)


async def test_nothing_listening_is_transient(tmp_path: Path) -> None:
    config = source_config(f"opc.tcp://127.0.0.1:{free_port()}/",
                           [{"name": "x", "node": "ns=2;s=X"}], timeout=1)
    runner = SourceRunner.of(config, tmp_path)
    runner.start()
    error = await runner.failure()
    assert error.category is ErrorCategory.TRANSIENT
    assert error.reason.startswith("connect:")
