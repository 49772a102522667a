"""Register holes: a request refused for an address inside it is split, and the device's plan
learns where the hole is, against a real pymodbus server whose map has holes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import assert_no_other_tasks
from helpers.brokers import wait_on
from helpers.modbus_servers import (
    WAIT,
    ModbusTestServer,
    SourceRunner,
    build_unit,
    device,
    source_config,
)

from bridge.core.model import Quality
from bridge.core.status import ConnectionState
from bridge.registry import load_config
from bridge.runtime import Runtime
from protocols.modbus.holes import DevicePlan
from protocols.modbus.planner import Block, Span, halves, join, spans_in

ILLEGAL_ADDRESS = "device exception: illegal data address (2)"
VALUES = list(range(1000, 1120))
"""Holding register i holds 1000 + i."""


@pytest.fixture
async def runners() -> AsyncIterator[list[SourceRunner]]:
    """Source runners a test starts; stopped and leak-checked after."""
    started: list[SourceRunner] = []
    yield started
    for runner in started:
        await runner.stop()
    assert_no_other_tasks()


def start(runners: list[SourceRunner], tmp_path: Path, port: int,
          points: list[dict[str, Any]]) -> SourceRunner:
    """A source polling unit 1 at ``port`` for ``points``, with the default ``max_gap``."""
    directory = tmp_path / f"source{len(runners)}"
    runner = SourceRunner(build_unit(directory, source_config(
        host="127.0.0.1", port=port,
        devices=[{"id": "meter", "unit": 1, "interval": "50ms", "points": points}])))
    runners.append(runner)
    runner.start()
    return runner


def plan_of(runner: SourceRunner) -> dict[str, list[str]]:
    """The learned plan as the inventory (``/v1/sources``) shows it."""
    entry = runner.status.to_dict()["devices"][0]
    plan: dict[str, list[str]] = entry["details"]["plan"]
    return plan


async def test_neighbours_of_a_hole_read_good(
    runners: list[SourceRunner], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Registers 99 and 110 around a hole 100..109: the default max_gap reads them together.
    async with ModbusTestServer([device(1, holding=VALUES, holes=[range(100, 110)])]) as server:
        caplog.set_level(logging.INFO, logger="protocols.modbus.source")
        runner = start(runners, tmp_path, server.port, [
            {"name": "before", "address": 40100}, {"name": "after", "address": 40111}])
        await runner.wait_for(lambda: runner.has("meter.before", quality=Quality.GOOD)
                              and runner.has("meter.after", quality=Quality.GOOD))
        assert runner.latest("meter.before").value == 1099
        assert runner.latest("meter.after").value == 1110
        assert not [event for event in runner.events if event.quality is not Quality.GOOD]
        assert plan_of(runner) == {"requests": ["holding 99", "holding 110"], "unreadable": []}
        meter = runner.status.children["meter"]
        assert meter.state is ConnectionState.UP

        # From the next cycle on, the block is never asked for again.
        server.requests.clear()
        cycles = meter.counters["cycles"]
        await runner.wait_for(lambda: meter.counters["cycles"] >= cycles + 3)
        asked = {(request.address, request.count) for request in server.requests}
        assert asked == {(99, 1), (110, 1)}
        learned = [record.getMessage() for record in caplog.records
                   if "refuses reads" in record.getMessage()]
        assert learned == ["device meter refuses reads across holding 99-110; polling around "
                           "it in 2 requests"]


async def test_a_point_inside_a_hole_is_the_only_bad_one(
    runners: list[SourceRunner], tmp_path: Path
) -> None:
    # A full map of 50 registers, one of them (20) a hole: once 49 good points turned bad.
    points = [{"name": f"r{index}", "address": 40001 + index} for index in range(50)]
    async with ModbusTestServer([device(1, holding=VALUES, holes=[range(20, 21)])]) as server:
        runner = start(runners, tmp_path, server.port, points)

        def settled() -> bool:
            return all(runner.has(f"meter.r{index}") for index in range(50))

        await runner.wait_for(settled)
        bad = {event.point: event.reason for event in runner.events
               if event.quality is not Quality.GOOD}
        assert bad == {"meter.r20": ILLEGAL_ADDRESS}
        assert [runner.latest(f"meter.r{index}").value for index in (0, 19, 21, 49)] == [
            1000, 1019, 1021, 1049]
        assert plan_of(runner) == {
            "requests": ["holding 0-19", "holding 20", "holding 21-49"],
            "unreadable": [f"holding 20: {ILLEGAL_ADDRESS}"]}
        meter = runner.status.children["meter"]
        assert meter.state is ConnectionState.DEGRADED
        assert meter.last_error == ILLEGAL_ADDRESS

        # A reconnect keeps what was learned: the first cycle already polls around the hole.
        await runner.stop()
        server.requests.clear()
        again = SourceRunner(runner.unit)
        runners.append(again)
        again.start()
        await again.wait_for(lambda: again.has("meter.r49", quality=Quality.GOOD))
        first = [(request.address, request.count) for request in server.requests[:3]]
        assert first == [(0, 20), (20, 1), (21, 29)]


async def test_a_hole_at_a_block_edge_and_bits_sharing_a_register(
    runners: list[SourceRunner], tmp_path: Path
) -> None:
    # Two bits of register 5, a hole at 6..7, an int32 at 8..9: the bits still read good.
    points = [{"name": "run", "address": 40006, "bit": 0},
              {"name": "fault", "address": 40006, "bit": 1},
              {"name": "gap", "address": 40007},
              {"name": "energy", "address": 40009, "type": "uint32"}]
    holding = [0] * 5 + [0b10, 0, 0, 0, 7]
    async with ModbusTestServer([device(1, holding=holding, holes=[range(6, 8)])]) as server:
        runner = start(runners, tmp_path, server.port, points)
        await runner.wait_for(lambda: all(runner.has(f"meter.{point['name']}")
                                          for point in points))
        assert (runner.latest("meter.run").value, runner.latest("meter.fault").value) == (
            False, True)
        assert runner.latest("meter.energy").value == 7
        assert runner.latest("meter.gap").reason == ILLEGAL_ADDRESS
        assert plan_of(runner)["requests"] == ["holding 5", "holding 6", "holding 8-9"]


async def test_a_reload_that_changes_the_source_plans_again(tmp_path: Path) -> None:
    path = tmp_path / "fieldbridge.yaml"

    def write(interval: str) -> None:
        path.write_text(yaml.safe_dump({
            "bridge": {"id": "t", "state_dir": "state"}, "api": {"enabled": False},
            "sources": [{"id": "plc", "protocol": "modbus", "host": "127.0.0.1",
                         "port": server.port, "devices": [{
                             "id": "meter", "interval": interval, "points": [
                                 {"name": "before", "address": 40100},
                                 {"name": "after", "address": 40111}]}]}]}))

    async with ModbusTestServer([device(1, holding=VALUES, holes=[range(100, 110)])]) as server:
        write("50ms")
        runtime = Runtime(load_config(path))
        changed = asyncio.Event()
        runtime.router.add_listener(lambda events: changed.set())
        task = asyncio.create_task(runtime.run(), name="test.runtime")

        def learned() -> bool:
            meter = runtime.sources["plc"].status.children["meter"]
            return "plan" in meter.details and all(
                runtime.router.latest.get(point) is not None
                and runtime.router.latest[point].quality is Quality.GOOD
                for point in ("meter.before", "meter.after"))

        try:
            await wait_on(changed, learned, WAIT, lambda: "the learned plan")
            # Unchanged, the source keeps running: nothing asks for the block again.
            server.requests.clear()
            assert await runtime.reload() == []
            changed.clear()
            await wait_on(changed, lambda: len(server.requests) >= 4, WAIT,
                          lambda: f"polls, got {server.requests}")
            assert (99, 12) not in {(request.address, request.count)
                                    for request in server.requests}
            # Changed, the source is built again and learns its plan afresh.
            write("60ms")
            server.requests.clear()
            assert await runtime.reload() == ["source plc: restarted"]

            def coalesced_again() -> bool:
                return (99, 12) in {(request.address, request.count)
                                    for request in server.requests}

            await wait_on(changed, coalesced_again, WAIT,
                          lambda: f"the block asked for again, got {server.requests}")
            await wait_on(changed, learned, WAIT, lambda: "the plan learned again")
        finally:
            runtime.stop()
            await asyncio.wait_for(task, WAIT)


# -- the plan itself, without a device -----------------------------------------------------


def test_halves_split_between_points() -> None:
    spans = [Span("holding", 0, 2), Span("holding", 5, 1), Span("holding", 9, 1)]
    block = Block("holding", 0, 10)
    assert spans_in(block, [*spans, Span("input", 0, 1)]) == spans
    assert halves(block, spans) == (Block("holding", 0, 2), Block("holding", 5, 5))
    assert halves(Block("holding", 5, 1), [Span("holding", 5, 1)]) is None


def test_join_only_blocks_that_touch() -> None:
    blocks = [Block("holding", 0, 12), Block("holding", 12, 6), Block("holding", 19, 2),
              Block("coil", 0, 1), Block("coil", 1, 1)]
    assert join(blocks) == [Block("coil", 0, 2), Block("holding", 0, 18),
                            Block("holding", 19, 2)]
    assert join([Block("holding", 0, 100), Block("holding", 100, 100)], max_registers=125) == [
        Block("holding", 0, 100), Block("holding", 100, 100)]


def test_a_joined_block_refused_again_is_not_joined_again() -> None:
    spans = tuple(Span("holding", address, 1) for address in range(4))
    plan = DevicePlan("meter", 1, 1.0, (Block("holding", 0, 4),), spans)
    plan.learn(Block("holding", 0, 4), [
        (Block("holding", 0, 1), None), (Block("holding", 1, 1), None),
        (Block("holding", 2, 1), None), (Block("holding", 3, 1), "refused")])
    assert plan.blocks == (Block("holding", 0, 3), Block("holding", 3, 1))
    # The device refuses the joined block (a limit of its own): its parts stay apart.
    plan.learn(Block("holding", 0, 3), [
        (Block("holding", 0, 1), None), (Block("holding", 1, 2), None)])
    assert plan.blocks == (Block("holding", 0, 1), Block("holding", 1, 2),
                           Block("holding", 3, 1))
    assert plan.details()["unreadable"] == ["holding 3: refused"]
    # The device serves the address again: the point is no longer listed as unreadable.
    assert plan.read(Block("holding", 3, 1))
    assert plan.details()["unreadable"] == []
    assert not plan.read(Block("holding", 3, 1))
