"""The S7 source against python-snap7's server: every type, arrays, coalesced reads, bit
writes that leave their neighbours alone, refused addresses, and a PLC that goes away."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import SourceRunner
from helpers.s7_server import S7TestServer, build_s7, s7_yaml

from bridge.core.model import Quality
from bridge.core.status import ConnectionState
from bridge.errors import ErrorCategory, WriteError
from protocols.s7.source import S7Source

POINTS: list[dict[str, Any]] = [
    {"name": "running", "address": "DB1.DBX0.3"},
    {"name": "alarm", "address": "DB1.DBX0.5", "writable": True},
    {"name": "mode", "address": "DB1.DBB1", "writable": True},
    {"name": "status", "address": "DB1.DBW2"},
    {"name": "count", "address": "DB1.DBD4"},
    {"name": "delta", "address": "DB1.DBW8:INT", "writable": True},
    {"name": "total", "address": "DB1.DBD10:DINT"},
    {"name": "temperature", "address": "DB10.DBD4:REAL", "unit": "degC", "writable": True},
    {"name": "energy", "area": "DB", "db": 10, "start": 8, "type": "LREAL"},
    {"name": "recipe", "address": "DB2.DBB0:STRING[10]", "writable": True},
    {"name": "label", "area": "DB", "db": 2, "start": 12, "type": "WSTRING[4]"},
    {"name": "stamp", "address": "DB2.DBB24:DATE_AND_TIME"},
    {"name": "levels", "address": "DB1.DBW20:INT", "count": 3},
    {"name": "flags", "address": "DB1.DBX30.6", "count": 4},
    {"name": "motor", "address": "M0.1", "writable": True},
    {"name": "speed", "address": "MW2", "scale": 0.1},
    {"name": "sensor", "address": "IW2"},
    {"name": "valve", "address": "QB0"},
    {"name": "cycle_timer", "address": "T1"},
    {"name": "parts", "address": "C1", "writable": True},
]


def fill(server: S7TestServer) -> None:
    """The values POINTS read."""
    db1, db2, db10 = server.dbs[1], server.dbs[2], server.dbs[10]
    db1[0] = 0b0000_1000  # running on, alarm off
    db1[1] = 7
    struct.pack_into(">HIhi", db1, 2, 0xBEEF, 4_000_000_000, -5, -70000)
    struct.pack_into(">hhh", db1, 20, 1, -2, 3)
    db1[30], db1[31] = 0b0100_0000, 0b0000_0101  # flags: bits 30.6, 30.7, 31.0, 31.1
    struct.pack_into(">fd", db10, 4, 21.5, 1234.5678)
    db2[0:7] = bytes([10, 5]) + b"hello"
    db2[12:20] = struct.pack(">HH", 4, 2) + "Ωk".encode("utf-16-be")
    db2[24:32] = bytes([0x24, 0x05, 0x01, 0x12, 0x30, 0x15, 0x25, 0x03])
    server.areas["M"][0] = 0b10
    struct.pack_into(">H", server.areas["M"], 2, 1234)
    struct.pack_into(">H", server.areas["I"], 2, 99)
    server.areas["Q"][0] = 0x81
    struct.pack_into(">H", server.areas["T"], 2, 0x2123)  # 123 x 1 s
    struct.pack_into(">H", server.areas["C"], 2, 0x0042)  # 42


@pytest.fixture
def server() -> Iterator[S7TestServer]:
    """A PLC with DB1 (40 bytes), DB2 (40), DB10 (16) and the M, I, Q, T, C areas."""
    with S7TestServer({1: 40, 2: 40, 10: 16}) as running:
        fill(running)
        yield running


def runner(tmp_path: Path, port: int, points: list[dict[str, Any]] = POINTS,
           **settings: Any) -> SourceRunner:
    return SourceRunner(build_s7(tmp_path, s7_yaml(port, points, **settings)),
                        supervised=True)


def s7(run: SourceRunner) -> S7Source:
    source = run.source
    assert isinstance(source, S7Source)
    return source


async def test_every_type_and_array_reads_good(tmp_path: Path, server: S7TestServer) -> None:
    async with runner(tmp_path, server.port) as run:
        await run.wait_for(lambda: run.has("plc.parts"))
        values = {event.point: event.value for event in run.events
                  if event.quality is Quality.GOOD}
    assert values == {
        "plc.running": True, "plc.alarm": False, "plc.mode": 7, "plc.status": 0xBEEF,
        "plc.count": 4_000_000_000, "plc.delta": -5, "plc.total": -70000,
        "plc.temperature": 21.5, "plc.energy": 1234.5678, "plc.recipe": "hello",
        "plc.label": "Ωk", "plc.stamp": "2024-05-01T12:30:15.250",
        "plc.levels.0": 1, "plc.levels.1": -2, "plc.levels.2": 3,
        "plc.flags.0": True, "plc.flags.1": False, "plc.flags.2": True, "plc.flags.3": False,
        "plc.motor": True, "plc.speed": 123.4, "plc.sensor": 99, "plc.valve": 0x81,
        "plc.cycle_timer": 123.0, "plc.parts": 42,
    }
    assert run.status.details["pdu_size"] == 480


async def test_reads_are_coalesced_within_the_pdu(tmp_path: Path,
                                                  server: S7TestServer) -> None:
    async with runner(tmp_path, server.port) as run:
        await run.wait_for(lambda: run.status.counters["cycles"] >= 1)
        blocks = list(s7(run).blocks)
        requests = run.status.details["requests_per_cycle"]
    # DB1, DB2, DB10, M, I, Q, T, C: one request each.
    assert requests == len(blocks) == 8
    assert sum(1 for block in blocks if block.area == "DB") == 3


async def test_a_smaller_pdu_splits_the_plan(tmp_path: Path) -> None:
    points = [{"name": f"word{index}", "address": f"DB1.DBW{index * 100}"}
              for index in range(8)]
    with S7TestServer({1: 800}) as server:
        async with runner(tmp_path, server.port, points, pdu_size=240, max_gap=200) as run:
            await run.wait_for(lambda: run.status.counters["cycles"] >= 1)
            blocks = list(s7(run).blocks)
    # 222 data bytes per read at a PDU of 240: DBW0..DBW700 in three requests.
    assert [(block.start, block.count) for block in blocks] == [
        (0, 202), (300, 202), (600, 102)]
    assert run.status.details["pdu_size"] == 240


async def test_bit_writes_leave_neighbouring_bits_alone(tmp_path: Path,
                                                        server: S7TestServer) -> None:
    async with runner(tmp_path, server.port) as run:
        await run.wait_for(lambda: run.has("plc.alarm"))
        await s7(run).write("plc.alarm", True)
        assert server.dbs[1][0] == 0b0010_1000
        await s7(run).write("plc.motor", False)
        server.areas["M"][0] |= 0b1000_0000
        await s7(run).write("plc.motor", True)
        assert server.areas["M"][0] == 0b1000_0010
        await s7(run).write("plc.alarm", False)
        assert server.dbs[1][0] == 0b0000_1000


async def test_writes_encode_every_writable_type(tmp_path: Path,
                                                 server: S7TestServer) -> None:
    async with runner(tmp_path, server.port) as run:
        await run.wait_for(lambda: run.has("plc.parts"))
        source = s7(run)
        await source.write("plc.delta", -300)
        await source.write("plc.temperature", -4.25)
        await source.write("plc.recipe", "batch")
        await source.write("plc.mode", 200)
        await source.write("plc.parts", 517)
        with pytest.raises(WriteError) as refused:
            await source.write("plc.delta", 40000)
        assert refused.value.category is ErrorCategory.CONFIG
        with pytest.raises(WriteError):
            await source.write("plc.recipe", "far too long text")
    db1, db2, db10 = server.dbs[1], server.dbs[2], server.dbs[10]
    assert struct.unpack_from(">h", db1, 8)[0] == -300
    assert struct.unpack_from(">f", db10, 4)[0] == -4.25
    assert bytes(db2[0:7]) == bytes([10, 5]) + b"batch"
    assert db1[1] == 200
    assert db1[0] == 0b0000_1000
    assert bytes(server.areas["C"][2:4]) == bytes([0x05, 0x17])


async def test_a_refused_address_is_bad_and_names_it(tmp_path: Path,
                                                     server: S7TestServer) -> None:
    points = [{"name": "good", "address": "DB1.DBW0"},
              {"name": "missing", "address": "DB7.DBW0"},
              {"name": "past_end", "address": "DB1.DBD38:REAL"},
              {"name": "also_good", "address": "DB1.DBW4"}]
    async with runner(tmp_path, server.port, points, max_gap=64) as run:
        await run.wait_for(lambda: run.has("plc.past_end", quality=Quality.BAD)
                           and run.has("plc.good", quality=Quality.GOOD)
                           and run.has("plc.also_good", quality=Quality.GOOD))
        missing = run.latest("plc.missing")
        past_end = run.latest("plc.past_end")
        assert run.status.state is ConnectionState.DEGRADED
    assert missing.quality is Quality.BAD
    assert missing.reason is not None
    assert missing.reason.startswith("DB7.DBW0: ")
    assert past_end.reason is not None
    assert past_end.reason.startswith("DB1.DBD38:REAL: ")


async def test_a_plc_that_goes_away_turns_down_then_up(
        tmp_path: Path, server: S7TestServer, caplog: pytest.LogCaptureFixture) -> None:
    async with runner(tmp_path, server.port, timeout="200ms") as run:
        await run.wait_for(lambda: run.has("plc.count", quality=Quality.GOOD))
        with caplog.at_level(logging.INFO):
            server.stop()
            await run.wait_for(lambda: run.status.state is ConnectionState.DOWN)
            assert run.has("plc.count", quality=Quality.BAD)
            # Several reconnects fail (the backoff is 50-200 ms) before the PLC is back.
            await run.wait_for(lambda: run.status.counters["errors"] >= 3)
            server.start()
            await run.wait_for(lambda: run.status.state is ConnectionState.UP
                               and run.has("plc.count", quality=Quality.GOOD))
    changes = [record.getMessage() for record in caplog.records
               if record.name == "bridge.core.status"]
    assert len([line for line in changes if line.startswith("source plc down")]) == 1, changes
    assert len([line for line in changes if line.startswith("source plc recovered")]) == 1


async def test_a_refused_iso_connection_explains_put_get(tmp_path: Path) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(64)  # the COTP connection request
        writer.write(bytes.fromhex("0300000b" "06800001000100"))  # a disconnect request
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with runner(tmp_path, port) as run:
            await run.wait_for(lambda: run.status.last_error is not None)
            reason = run.status.last_error
            category = run.status.error_category
    finally:
        server.close()
        await server.wait_closed()
    assert reason is not None
    assert "refused the ISO connection" in reason
    assert "rack and slot" in reason
    assert "PUT/GET" in reason
    assert category is ErrorCategory.AUTH


async def test_a_live_read_goes_to_the_plc_now(tmp_path: Path, server: S7TestServer) -> None:
    points = [{"name": "speed", "address": "MW2:INT"},
              {"name": "missing", "address": "DB9.DBW0"}]
    async with runner(tmp_path, server.port, points) as run:
        await run.wait_for(lambda: run.has("plc.speed", quality=Quality.GOOD))
        struct.pack_into(">h", server.areas["M"], 2, -77)
        readings = await s7(run).read("plc.speed")
        refused = await s7(run).read("plc.missing")
        events = [event for reading in readings for event in run.unit.mapper.map(reading)]
        bad = [event for reading in refused for event in run.unit.mapper.map(reading)]
    assert [(event.point, event.value) for event in events] == [("plc.speed", -77)]
    assert [event.quality for event in bad] == [Quality.BAD]
    assert bad[0].reason is not None
    assert bad[0].reason.startswith("DB9.DBW0: ")


async def test_python_snap7_stays_quiet_unless_debugging(
        tmp_path: Path, server: S7TestServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        async with runner(tmp_path, server.port, [{"name": "speed", "address": "MW2"}]) as run:
            await run.wait_for(lambda: run.has("plc.speed", quality=Quality.GOOD))
    assert [record.getMessage() for record in caplog.records
            if record.name.startswith("snap7.") and record.name != "snap7.server"] == []
