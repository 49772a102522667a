"""What a sink that mirrors the bridge sees of it (``SinkContext.bridge``): the configured
points with their value types, source and device states as they change, and the audited write
path shared with ``PUT /v1/points/{id}``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bridge.config.models import Config
from bridge.core.status import EndpointStatus
from bridge.demo.run import PORT_VARIABLE, load_demo_config
from bridge.errors import ErrorCategory, NotWritableError, WriteError
from bridge.facade import SinkFacade
from bridge.runtime import Runtime


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    # Nothing listens there: these tests never start a source.
    monkeypatch.setenv(PORT_VARIABLE, "1")
    return load_demo_config(state_dir=tmp_path / "state", api_port=0)


@pytest.fixture
def runtime(config: Config) -> Runtime:
    return Runtime(config)


def test_points_carry_device_unit_writability_and_value_type(runtime: Runtime) -> None:
    points = SinkFacade(runtime).points()
    expected = {
        "boiler.supply_temp": ("plant", "boiler", "degC", False, "number"),  # int16 scaled
        "boiler.energy": ("plant", "boiler", "kWh", False, "number"),
        "boiler.pressure": ("plant", "boiler", "bar", False, "number"),  # float32
        "boiler.pump_running": ("plant", "boiler", None, False, "bool"),  # a bit
        "boiler.pump_command": ("plant", "boiler", None, True, "bool"),  # a coil
        "boiler.mode": ("plant", "boiler", None, False, "string"),  # an enum's labels
        "boiler.setpoint": ("plant", "boiler", "degC", True, "number"),
    }
    for point_id, (source, device, unit, writable, value_type) in expected.items():
        point = points[point_id]
        assert (point.source, point.device, point.unit, point.writable, point.value_type) == (
            source, device, unit, writable, value_type), point_id


def test_points_are_the_same_mapping_until_a_reload_replaces_them(runtime: Runtime) -> None:
    bridge = SinkFacade(runtime)
    first = bridge.points()
    assert bridge.points() is first
    runtime.points = dict(runtime.points)  # what a reload does
    assert bridge.points() is not first
    assert bridge.points() == first


def test_only_enabled_sources_are_shown(runtime: Runtime) -> None:
    # The demo's OPC-UA source is configured but disabled.
    assert set(SinkFacade(runtime).sources()) == {"plant"}


def test_a_watcher_hears_of_every_change_of_a_source_or_device_until_it_stops(
        runtime: Runtime) -> None:
    bridge = SinkFacade(runtime)
    heard: list[str] = []
    stop = bridge.watch(lambda: heard.append("change"))
    source = bridge.sources()["plant"]
    source.up()
    source.up()  # no change, nothing heard
    source.child("boiler").down("timeout", ErrorCategory.TRANSIENT)
    source.child("new-device").up()  # a device first seen while running is watched too
    assert heard == ["change"] * 3
    stop()
    source.down("connection lost", ErrorCategory.TRANSIENT)
    assert heard == ["change"] * 3
    stop()  # stopping twice is harmless


def test_a_state_mirrored_from_a_worker_process_is_heard_too() -> None:
    heard: list[str] = []
    worker = EndpointStatus(name="plant", kind="source", protocol="modbus", endpoint="x")
    worker.up()
    daemon = EndpointStatus(name="plant", kind="source", protocol="modbus", endpoint="x")
    daemon.watch(lambda status: heard.append(status.name))
    daemon.mirror(worker.snapshot())
    daemon.mirror(worker.snapshot())
    assert heard == ["plant"]


async def test_a_write_to_a_point_that_is_not_writable_is_refused_and_audited(
        runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bridge.audit"), pytest.raises(NotWritableError):
        await SinkFacade(runtime).write("boiler.supply_temp", 60.0, "Sparkplug sink sp")
    [record] = [record for record in caplog.records if record.name == "bridge.audit"]
    assert record.getMessage() == ("write refused: Sparkplug sink sp, point boiler.supply_temp, "
                                   "value 60.0: the point is not writable")


async def test_a_write_the_source_cannot_carry_out_is_audited_as_failed(
        runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    # The source was never started: the Modbus connection refuses the write.
    with caplog.at_level(logging.INFO, logger="bridge.audit"), pytest.raises(WriteError):
        await SinkFacade(runtime).write("boiler.setpoint", 55.5, "Sparkplug sink sp")
    [record] = [record for record in caplog.records if record.name == "bridge.audit"]
    assert record.getMessage().startswith(
        "write failed: Sparkplug sink sp, point boiler.setpoint, value 55.5: ")


async def test_a_write_to_a_point_that_is_not_configured_is_a_key_error(
        runtime: Runtime) -> None:
    with pytest.raises(KeyError):
        await SinkFacade(runtime).write("boiler.nothing", 1, "Sparkplug sink sp")
