"""Request planning: fewest requests, within the limits, never across tables."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers.modbus_servers import ModbusTestServer, SourceRunner, build_unit, device, source_config

from protocols.modbus.planner import Block, Span, plan


def holding(start: int, count: int = 1) -> Span:
    return Span("holding", start, count)


def test_adjacent_points_share_a_request() -> None:
    assert plan([holding(0), holding(1, 2), holding(3)], max_gap=0) == [Block("holding", 0, 4)]


def test_gap_up_to_max_gap_is_read_through() -> None:
    spans = [holding(0, 2), holding(12, 2)]  # 10 unused registers between
    assert plan(spans, max_gap=10) == [Block("holding", 0, 14)]
    assert plan(spans, max_gap=9) == [Block("holding", 0, 2), Block("holding", 12, 2)]


def test_requests_stay_within_max_registers() -> None:
    spans = [holding(address) for address in range(300)]
    blocks = plan(spans, max_gap=10, max_registers=125)
    assert blocks == [Block("holding", 0, 125), Block("holding", 125, 125),
                      Block("holding", 250, 50)]


def test_a_value_is_never_split_across_requests() -> None:
    # float32s at 0, 2, 4, ...: a 5-register limit fits two of them per request.
    spans = [holding(address, 2) for address in range(0, 12, 2)]
    blocks = plan(spans, max_gap=0, max_registers=5)
    assert blocks == [Block("holding", 0, 4), Block("holding", 4, 4), Block("holding", 8, 4)]


def test_tables_are_never_mixed() -> None:
    spans = [Span("input", 0, 1), holding(1), Span("coil", 0, 1), Span("discrete", 1, 1)]
    assert plan(spans, max_gap=100) == [
        Block("coil", 0, 1), Block("discrete", 1, 1), Block("input", 0, 1),
        Block("holding", 1, 1)]


def test_bit_tables_use_max_bits() -> None:
    spans = [Span("coil", address, 1) for address in range(0, 3000, 3)]
    blocks = plan(spans, max_gap=2, max_bits=2000)
    assert blocks == [Block("coil", 0, 1999), Block("coil", 2001, 997)]


def test_points_sharing_a_register_and_duplicates() -> None:
    # Bit points share register 5; a string contains register 8.
    spans = [holding(5), holding(5), holding(7, 4), holding(8)]
    assert plan(spans, max_gap=1) == [Block("holding", 5, 6)]


def test_plan_is_deterministic() -> None:
    spans = [holding(address, 2) for address in range(0, 400, 3)]
    expected = plan(spans, max_gap=3, max_registers=60)
    rng = random.Random(7)
    for _ in range(20):
        rng.shuffle(spans)
        assert plan(spans, max_gap=3, max_registers=60) == expected


def test_nothing_to_read() -> None:
    assert plan([], max_gap=10) == []


def test_too_large_a_point_is_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        plan([holding(0, 10)], max_gap=0, max_registers=8)


def _fewest(spans: list[Span], max_gap: int, limit: int) -> int:
    """Brute force: the fewest requests for sorted, disjoint spans (dynamic programming)."""

    @functools.cache
    def best(first: int) -> int:
        if first == len(spans):
            return 0
        result = math.inf
        for last in range(first, len(spans)):
            if last > first and spans[last].start - spans[last - 1].end > max_gap:
                break
            if spans[last].end - spans[first].start > limit:
                break
            result = min(result, 1 + best(last + 1))
        return int(result)

    return best(0)


@pytest.mark.parametrize("seed", range(30))
def test_greedy_plan_is_optimal(seed: int) -> None:
    rng = random.Random(seed)
    spans, address = [], 0
    for _ in range(rng.randint(1, 40)):
        address += rng.choice([0, 0, 1, 2, 5, 12])
        count = rng.choice([1, 1, 2, 4])
        spans.append(holding(address, count))
        address += count
    max_gap, limit = rng.choice([0, 2, 10]), rng.choice([4, 8, 20])
    blocks = plan(spans, max_gap=max_gap, max_registers=limit)
    assert len(blocks) == _fewest(spans, max_gap, limit)
    for block in blocks:
        assert block.count <= limit
    covered = {address for block in blocks for address in range(block.start, block.end)}
    assert all(set(range(span.start, span.end)) <= covered for span in spans)


# -- counted at a real server ------------------------------------------------------------


def _meter_points(layout: list[str]) -> list[dict[str, Any]]:
    """Points in address order from a list of types, holding registers from offset 0."""
    points, address = [], 0
    for index, data_type in enumerate(layout):
        points.append({"name": f"p{index}", "table": "holding", "address": address,
                       "type": data_type})
        address += 2 if data_type == "float32" else 1
    return points


@pytest.fixture
async def big_server() -> AsyncIterator[ModbusTestServer]:
    """Unit 1 with 2100 holding registers."""
    async with ModbusTestServer([device(1, holding=[0] * 2100)]) as server:
        yield server


async def _requests_per_cycle(
    server: ModbusTestServer, tmp_path: Path, points: list[dict[str, Any]], **settings: Any
) -> int:
    """Run one poll cycle of a source at ``server`` and count the requests it received."""
    unit = build_unit(tmp_path, source_config(
        host="127.0.0.1", port=server.port,
        devices=[{"id": "meter", "interval": "1h", "points": points}], **settings))
    runner = SourceRunner(unit)
    runner.start()
    try:
        await runner.wait_for(lambda: runner.batches >= 1)
    finally:
        await runner.stop()
    assert len(runner.readings) == len(server.requests)
    return len(server.requests)


async def test_1000_int16_and_500_float32_take_16_requests(
    big_server: ModbusTestServer, tmp_path: Path
) -> None:
    # 2000 registers are at least 16 requests of 125. This map reaches that minimum: each
    # 125-register stretch ends on a value boundary (62 floats + 1 int16, or 1 float + 123
    # int16, or 125 int16), as in a well-laid-out device.
    layout = (["float32"] * 62 + ["int16"]) * 8 + (["float32"] + ["int16"] * 123) * 4 + [
        "int16"] * 500
    assert layout.count("int16") == 1000
    assert layout.count("float32") == 500
    requests = await _requests_per_cycle(big_server, tmp_path, _meter_points(layout))
    assert requests == 16
    assert {request.count for request in big_server.requests} == {125}


async def test_a_float_never_straddles_requests(
    big_server: ModbusTestServer, tmp_path: Path
) -> None:
    # The same 1000 int16 + 500 float32 as two runs: the floats cannot be packed 125 to a
    # request (62 floats fill 124 registers), so they take 9 requests after the 8 for the
    # int16s: one more than the arithmetic minimum, and none of the floats is cut.
    layout = ["int16"] * 1000 + ["float32"] * 500
    requests = await _requests_per_cycle(big_server, tmp_path, _meter_points(layout))
    assert requests == 17
    assert all(request.count <= 125 for request in big_server.requests)


async def test_gap_larger_than_max_gap_splits(
    big_server: ModbusTestServer, tmp_path: Path
) -> None:
    points = [{"name": "a", "table": "holding", "address": 0},
              {"name": "b", "table": "holding", "address": 15}]
    assert await _requests_per_cycle(big_server, tmp_path / "split", points,
                                     max_gap=13) == 2
    big_server.requests.clear()
    assert await _requests_per_cycle(big_server, tmp_path / "merged", points,
                                     max_gap=14) == 1
    assert big_server.requests[0].count == 16
