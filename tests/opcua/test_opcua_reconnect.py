"""An OPC-UA connection that breaks: the source reports it, the supervisor reconnects, and
every monitored item is created again on the restarted server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import free_port
from helpers.opcua_server import VARIABLES, FreezingProxy, SourceRunner, source_config

from bridge.core.model import Quality
from bridge.core.status import ConnectionState
from bridge.demo.opcua_plant import PlantServer
from bridge.errors import ErrorCategory


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_server_restart_restores_every_monitored_item(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # picked once: the restarted server listens where the first did
    servers = [PlantServer(port=port, variables=VARIABLES)]
    await servers[0].start()
    plant = servers[0]
    cycle = {"poll_interval": 0.05} if mode == "poll" else {}
    config = source_config(plant.url, [
        {"name": "temp", "node": plant.node_id("Boiler.Temperature")},
        {"name": "pressure", "path": plant.browse_path("Boiler.Pressure")},
        {"name": "mode", "node": plant.node_id("Boiler.Mode")},
    ], mode=mode, **cycle)
    points = {"plc.temp": 80.5, "plc.pressure": 2.25, "plc.mode": "manual"}
    try:
        async with SourceRunner.of(config, tmp_path, supervised=True) as runner:
            await runner.wait_for(lambda: all(runner.has(point) for point in points))
            await servers[0].stop()
            restarted = PlantServer(port=port, variables=VARIABLES)
            servers.append(restarted)
            await restarted.start()
            await restarted.set("Boiler.Temperature", 80.5)
            await restarted.set("Boiler.Pressure", 2.25)
            await restarted.set("Boiler.Mode", "manual")
            await runner.wait_for(lambda: all(
                runner.has(point, quality=Quality.GOOD, value=value)
                for point, value in points.items()))
            assert runner.status.counters["reconnects"] >= 1
            assert runner.status.state is ConnectionState.UP
            assert runner.status.error_category is ErrorCategory.TRANSIENT
        # The loss is reported once by the status, not by asyncua's tracebacks.
        client_noise = [record.getMessage() for record in caplog.records
                        if record.name.startswith("asyncua.client")
                        and record.levelno >= logging.WARNING]
        assert not client_noise
    finally:
        for server in servers:
            await server.stop()


async def test_a_silent_connection_is_noticed_by_the_keepalive(tmp_path: Path) -> None:
    async with PlantServer(variables=VARIABLES) as plant, FreezingProxy(plant.port) as proxy:
        config = source_config(proxy.url, [
            {"name": "temp", "node": plant.node_id("Boiler.Temperature")}],
            keepalive=0.2, timeout=0.5)
        async with SourceRunner.of(config, tmp_path) as runner:
            await runner.wait_for(lambda: runner.has("plc.temp"))
            proxy.frozen = True
            error = await runner.failure()
        assert error.category is ErrorCategory.TRANSIENT
        assert error.reason == "connection lost: no answer in time"
