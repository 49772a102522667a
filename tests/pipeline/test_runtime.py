"""The whole daemon in one process: the demo configuration against the plant simulator."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import httpx
import pytest

from bridge.api.server import ApiServer
from bridge.config.models import Config
from bridge.core.model import Event, Quality, Value
from bridge.demo.run import PORT_VARIABLE, load_demo_config
from bridge.demo.simulator import PlantSimulator
from bridge.runtime import Runtime

DEMO_POINTS = {
    f"boiler.{name}" for name in (
        "supply_temp", "return_temp", "pressure", "energy", "pump_running", "burner_on",
        "alarm", "mode", "setpoint", "pump_command", "flow")
}
SETTLE = 10.0
"""Seconds any awaited condition may take before the test fails."""


@pytest.fixture
async def simulator() -> AsyncIterator[PlantSimulator]:
    # Steps faster than the demo polls (1 s), so every poll sees moved registers.
    async with PlantSimulator(port=0, seed=20, interval=0.2) as running:
        yield running


@pytest.fixture
def config(
    simulator: PlantSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Config:
    monkeypatch.setenv(PORT_VARIABLE, str(simulator.port))
    return load_demo_config(state_dir=tmp_path / "state", api_port=0)


def number(value: Value) -> float:
    """A value that must be a number."""
    assert isinstance(value, int | float), value
    assert not isinstance(value, bool), value
    return value


class Running:
    """A runtime running as a task, with every stored event recorded."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        runtime.router.add_listener(self._record)
        self.task = asyncio.create_task(runtime.run(services=[ApiServer]),
                                        name="test.runtime")

    def _record(self, events: Sequence[Event]) -> None:
        self.events.extend(events)
        self._changed.set()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait for stored events to make ``condition`` true."""
        async with asyncio.timeout(SETTLE):
            while not condition():
                self._changed.clear()
                waiter = asyncio.create_task(self._changed.wait(), name="test.events")
                try:
                    done, _ = await asyncio.wait({waiter, self.task},
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if self.task in done:
                    self.task.result()
                    pytest.fail(f"the runtime stopped before {what}")

    async def until_every_point_reported(self) -> None:
        """Wait until every demo point has a stored value."""
        latest = self.runtime.router.latest
        await self.until(lambda: latest.keys() >= DEMO_POINTS, "every point reported")

    def values(self, point: str) -> list[Value]:
        """Every value stored for ``point``, oldest first."""
        return [event.value for event in self.events if event.point == point]

    async def stop(self) -> float:
        """Stop the runtime; returns how long it took."""
        started = time.monotonic()
        self.runtime.stop()
        async with asyncio.timeout(SETTLE):
            await self.task
        return time.monotonic() - started


@pytest.fixture
async def running(config: Config) -> AsyncIterator[Running]:
    runner = Running(Runtime(config))
    async with asyncio.timeout(SETTLE):
        await runner.runtime.ready.wait()
    yield runner
    if not runner.task.done():
        await runner.stop()


async def test_every_demo_point_gets_a_good_value(running: Running) -> None:
    router = running.runtime.router
    await running.until_every_point_reported()
    assert {point.id for point in running.runtime.points.values()
            if point.source == "plant"} == DEMO_POINTS
    for point in DEMO_POINTS:
        event = router.latest[point]
        assert event.quality is Quality.GOOD, (point, event.reason)
        assert event.source == "plant"
        assert event.protocol == "modbus"
        assert event.bridge == "demo"
        assert event.tags["site"] == "demo"
    latest = {point: router.latest[point].value for point in DEMO_POINTS}
    assert 55 < number(latest["boiler.supply_temp"]) < 75
    assert 35 < number(latest["boiler.return_temp"]) < 55
    assert 1.0 < number(latest["boiler.pressure"]) < 2.2
    assert latest["boiler.energy"] == pytest.approx(1250.0, abs=50)
    assert latest["boiler.setpoint"] == 65.0
    assert latest["boiler.pump_command"] is True
    assert latest["boiler.pump_running"] is True
    assert latest["boiler.flow"] is True
    assert latest["boiler.mode"] in ("idle", "heating", "alarm")
    assert router.latest["boiler.supply_temp"].unit == "degC"
    status = running.runtime.inventory()[0]
    assert status["state"] == "up"


async def test_the_api_serves_what_the_router_holds(running: Running) -> None:
    await running.until_every_point_reported()
    base = f"http://127.0.0.1:{running.runtime.api_port}"
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as client:
        response = await client.get("/v1/points", params={"limit": 100, "source": "plant"})
        assert response.status_code == 200, response.text
    served = {item["id"]: item for item in response.json()["items"]}
    assert served.keys() == DEMO_POINTS
    # A poll may land after the response: compare with the stored events, not the latest.
    stored = {event.id: event for event in running.events}
    for point, item in served.items():
        event = stored[item["event_id"]]
        assert event.point == point
        assert item["value"] == event.value
        assert item["quality"] == "good"


async def test_values_move_and_history_grows(running: Running) -> None:
    def moved() -> bool:
        return (len(set(running.values("boiler.supply_temp"))) >= 2
                and len(set(running.values("boiler.pressure"))) >= 2)

    await running.until(moved, "the temperatures and the pressure moved")
    store = running.runtime.store
    assert store.history_count("boiler.supply_temp") >= 2
    history = store.history("boiler.supply_temp", newest_first=False)
    assert [event.value for event in history] == running.values("boiler.supply_temp")
    energies = [number(value) for value in running.values("boiler.energy")]
    assert energies == sorted(energies)


async def test_deadband_and_heartbeat_hold_back_unchanged_values(running: Running) -> None:
    # Three polls of every point: the booleans that did not change were reported once.
    await running.until(lambda: len(set(running.values("boiler.supply_temp"))) >= 3,
                        "three supply temperatures")
    assert running.values("boiler.setpoint") == [65.0]
    assert running.values("boiler.pump_command") == [True]
    temperatures = [number(value) for value in running.values("boiler.supply_temp")]
    steps = [abs(after - before) for before, after in itertools.pairwise(temperatures)]
    assert min(steps) > 0.2, "changes within the deadband are not reported"


async def test_stop_is_prompt_and_keeps_what_was_polled(running: Running) -> None:
    await running.until_every_point_reported()
    took = await running.stop()
    assert took < 5.0
    assert running.runtime.store.written == len(running.events)
    assert not [task for task in asyncio.all_tasks()
                if task is not asyncio.current_task() and not task.done()
                and not task.get_name().startswith("simulator")]


async def test_restart_on_the_same_state_dir_restores_last_values(
    config: Config, running: Running
) -> None:
    await running.until_every_point_reported()
    await running.stop()
    before = dict(running.runtime.router.latest)

    # Restart with the source disabled, so nothing new can arrive: what the router holds
    # is exactly what the store gave back.
    quiet = dataclasses.replace(
        config, sources=[source.model_copy(update={"enabled": False})
                         for source in config.sources])
    again = Running(Runtime(quiet))
    async with asyncio.timeout(SETTLE):
        await again.runtime.ready.wait()
    try:
        restored = again.runtime.router.latest
        assert restored.keys() == before.keys()
        for point, event in before.items():
            assert restored[point].id == event.id
            assert restored[point].value == event.value
            assert restored[point].ts == pytest.approx(event.ts, abs=0.001)
        assert again.runtime.store.history_count("boiler.supply_temp") >= 1
        assert again.runtime.inventory()[0]["state"] == "disabled"
    finally:
        await again.stop()
