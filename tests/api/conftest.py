"""Fixtures of the API tests: a runtime with a small plant of points, and a client on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from helpers.api import (
    NOW,
    add_point,
    add_source,
    close_runtime,
    feed,
    make_event,
    open_runtime,
    write_config,
)

from bridge.api.app import create_app
from bridge.core.counters import EVENTS, READINGS, REJECTED
from bridge.core.model import Quality
from bridge.errors import ErrorCategory
from bridge.runtime import Runtime


@pytest.fixture
async def plant(tmp_path: Path) -> AsyncIterator[Runtime]:
    """A runtime with two sources, five points, and values for four of them."""
    runtime, router = await open_runtime(write_config(tmp_path))
    add_source(runtime, "plc1")
    boiler = runtime.sources["plc1"].status.child("boiler", "tcp://plc1.plant:502/1")
    boiler.success()
    runtime.sources["plc1"].status.success()
    counters = runtime.sources["plc1"].status.counters
    for counter, count in ((READINGS, 12), (EVENTS, 10), (REJECTED, 2)):
        counters.add(counter, count)
    meter = add_source(runtime, "meter-bus")
    meter.down("connection refused", ErrorCategory.TRANSIENT)
    add_point(runtime, "boiler.supply_temp", "plc1", "boiler", unit="degC",
              tags={"area": "north", "kind": "temperature"})
    add_point(runtime, "boiler.return_temp", "plc1", "boiler", unit="degC",
              tags={"area": "north", "kind": "temperature"})
    add_point(runtime, "boiler.setpoint", "plc1", "boiler", unit="degC", writable=True,
              tags={"area": "north", "kind": "setpoint"})
    add_point(runtime, "meter:1.energy", "meter-bus", "meter:1", unit="kWh",
              tags={"area": "south"})
    add_point(runtime, "meter:1.power", "meter-bus", "meter:1", unit="kW",
              tags={"area": "south"})
    await feed(runtime, [
        make_event("boiler.supply_temp", 71.5, ts=NOW - 10, unit="degC"),
        make_event("boiler.return_temp", 55.0, ts=NOW - 10, unit="degC"),
        make_event("boiler.setpoint", 70, ts=NOW - 10, unit="degC"),
        make_event("meter:1.energy", None, ts=NOW - 5, source="meter-bus",
                   quality=Quality.BAD, unit="kWh"),
    ])
    yield runtime
    await close_runtime(runtime, router)


@pytest.fixture
async def client(plant: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in-process."""
    transport = httpx.ASGITransport(app=create_app(plant.facade()))
    async with httpx.AsyncClient(transport=transport, base_url="http://fieldbridge.test") as http:
        yield http
