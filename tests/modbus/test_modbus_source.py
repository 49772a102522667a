"""The Modbus source against real peers: pymodbus servers, a hung device, a babbling one,
and a serial line made of a socat pty pair."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_no_other_tasks, free_port
from helpers.modbus_servers import (
    ModbusTestServer,
    PtyPair,
    SourceRunner,
    build_unit,
    device,
    garbage_server,
    pty_pair_fixture,  # noqa: F401 (the fixture ``pty_pair``)
    silent_server,
    source_config,
)
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from bridge.core.model import Quality
from bridge.core.source import SourceContext
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ErrorCategory, ReadError, WriteError
from protocols.modbus.client import ClientHooks
from protocols.modbus.config import ModbusSourceConfig
from protocols.modbus.holes import DevicePlan
from protocols.modbus.planner import Block
from protocols.modbus.source import ModbusSource, next_deadline

POINTS: list[dict[str, Any]] = [
    {"name": "temperature", "address": 40001, "type": "int16", "scale": 0.1, "unit": "degC"},
    {"name": "voltage", "address": 40002, "type": "float32", "order": "CDAB", "round": 3},
    {"name": "energy", "address": 40004, "type": "uint32", "order": "CDAB"},
    {"name": "running", "address": 40006, "bit": 0},
    {"name": "alarm", "address": 40006, "bit": 2},
    {"name": "model", "address": 40007, "type": "string", "length": 2},
    {"name": "flow", "address": 30001},
    {"name": "pump", "table": "coil", "address": 1},
    {"name": "door", "address": 10003},
]
HOLDING = [
    0xFF9C,  # -100 -> -10.0 degC
    0xE979, 0x42F6,  # 123.456 with the low word first
    0xD687, 0x0012,  # 1234567
    0b101,  # running and alarm
    0x4D33, 0x3230,  # "M320"
]


def fast(**settings: Any) -> dict[str, Any]:
    """Source settings that fail fast, for tests that wait for timeouts."""
    return {"timeout": "100ms", "retries": 1, **settings}


def plc_device(**settings: Any) -> dict[str, Any]:
    """The device every test polls: unit 1, polled every 50 ms, the POINTS above."""
    return {"id": "meter", "unit": 1, "interval": "50ms", "points": POINTS, **settings}


@pytest.fixture
async def server() -> AsyncIterator[ModbusTestServer]:
    """A Modbus TCP server whose unit 1 holds HOLDING, one input register, coils, inputs."""
    async with ModbusTestServer([device(1, holding=HOLDING, input=[42],
                                        coils=[False, True], discrete=[False, False, True])]
                                ) as running:
        yield running


@pytest.fixture
async def runners() -> AsyncIterator[list[SourceRunner]]:
    """Source runners a test starts; stopped (cancellation checked) and leak-checked after."""
    started: list[SourceRunner] = []
    yield started
    for runner in started:
        await runner.stop()
    assert_no_other_tasks()


def start(runners: list[SourceRunner], tmp_path: Path, **settings: Any) -> SourceRunner:
    """Build a source from settings (YAML through load_config) and start it."""
    directory = tmp_path / f"source{len(runners)}"
    directory.mkdir()
    runner = SourceRunner(build_unit(directory, source_config(**settings)))
    runners.append(runner)
    runner.start()
    return runner


def all_points_good(runner: SourceRunner, prefix: str = "meter.") -> bool:
    """Every POINT has a good last event."""
    return all(runner.has(f"{prefix}{point['name']}", quality=Quality.GOOD) for point in POINTS)


async def test_values_decode_end_to_end(
    server: ModbusTestServer, runners: list[SourceRunner], tmp_path: Path
) -> None:
    runner = start(runners, tmp_path, host="127.0.0.1", port=server.port,
                   devices=[plc_device()])
    await runner.wait_for(lambda: all_points_good(runner))

    values = {point["name"]: runner.latest(f"meter.{point['name']}").value for point in POINTS}
    assert values == {
        "temperature": -10.0, "voltage": 123.456, "energy": 1234567, "running": True,
        "alarm": True, "model": "M320", "flow": 42, "pump": True, "door": True,
    }
    assert runner.latest("meter.temperature").unit == "degC"
    assert runner.latest("meter.voltage").protocol == "modbus"

    # The device's value changes; the next poll carries it.
    await server.set_registers(1, 0, [250])
    await runner.wait_for(lambda: runner.has("meter.temperature", value=25.0))

    # Holding 0-7, input 0, coil 1, discrete 2: four requests per cycle.
    counters = runner.status.children["meter"].counters
    assert counters["requests"] == counters["responses"] == 4 * counters["cycles"]
    assert runner.status.state is ConnectionState.UP
    assert runner.status.children["meter"].state is ConnectionState.UP
    functions = {(request.function_code, request.address, request.count)
                 for request in server.requests}
    assert functions == {(3, 0, 8), (4, 0, 1), (1, 1, 1), (2, 2, 1)}


async def test_exception_response_marks_only_that_block_bad(
    server: ModbusTestServer, runners: list[SourceRunner], tmp_path: Path
) -> None:
    points = [*POINTS, {"name": "missing", "address": 40100}]  # beyond the device's map
    runner = start(runners, tmp_path, host="127.0.0.1", port=server.port,
                   devices=[plc_device(points=points)])
    await runner.wait_for(lambda: runner.has("meter.missing", quality=Quality.BAD)
                          and all_points_good(runner))

    missing = runner.latest("meter.missing")
    assert missing.value is None
    assert missing.reason == "device exception: illegal data address (2)"
    meter = runner.status.children["meter"]
    assert meter.state is ConnectionState.DEGRADED
    assert meter.error_category is ErrorCategory.DEVICE
    assert runner.status.state is ConnectionState.DEGRADED
    # It keeps polling the rest.
    cycles = meter.counters["cycles"]
    await runner.wait_for(lambda: meter.counters["cycles"] >= cycles + 2)
    assert meter.counters["exceptions"] >= 1


async def test_device_recovers_by_itself(runners: list[SourceRunner], tmp_path: Path) -> None:
    busy = True
    answered = asyncio.Event()

    async def action(function_code: int, start_address: int, address: int, count: int,
                     registers: list[int], values: list[int] | list[bool] | None
                     ) -> ExcCodes | None:
        if busy:
            return ExcCodes.DEVICE_BUSY
        answered.set()
        return None

    busy_device = SimDevice(1, simdata=[SimData(0, values=HOLDING, datatype=DataType.REGISTERS)],
                            action=action)
    async with ModbusTestServer([busy_device]) as server:
        runner = start(runners, tmp_path, host="127.0.0.1", port=server.port,
                       devices=[plc_device(points=POINTS[:3])])
        await runner.wait_for(lambda: runner.has("meter.temperature", quality=Quality.BAD))
        assert runner.latest("meter.temperature").reason == \
            "device exception: server device busy (6)"
        assert runner.status.children["meter"].state is ConnectionState.DEGRADED

        busy = False
        await runner.wait_for(lambda: runner.has("meter.temperature", value=-10.0))
        assert runner.latest("meter.temperature").quality is Quality.GOOD
        assert runner.status.children["meter"].state is ConnectionState.UP
        assert runner.status.state is ConnectionState.UP
        await runner.stop()


async def test_hung_device_times_out_while_another_source_polls(
    server: ModbusTestServer, runners: list[SourceRunner], tmp_path: Path
) -> None:
    async with silent_server() as hung_port:
        hung = start(runners, tmp_path, **fast(host="127.0.0.1", port=hung_port,
                                               devices=[plc_device()]))
        healthy = start(runners, tmp_path, id="other", host="127.0.0.1", port=server.port,
                        devices=[plc_device(id="healthy")])

        await hung.wait_for(lambda: hung.has("meter.temperature", quality=Quality.BAD))
        event = hung.latest("meter.temperature")
        assert event.reason == "timeout after 2 attempts"
        # The whole device turns bad at once: the rest of its cycle is not requested.
        assert all(hung.has(f"meter.{point['name']}", quality=Quality.BAD) for point in POINTS)
        meter = hung.status.children["meter"]
        assert meter.state is ConnectionState.DOWN
        assert meter.error_category is ErrorCategory.TRANSIENT
        assert meter.counters["timeouts"] == meter.counters["cycles"]

        # Meanwhile the other source polled on: several cycles, all good.
        await healthy.wait_for(lambda: all_points_good(healthy, "healthy.")
                               and healthy.status.children["healthy"].counters["cycles"] >= 3)
        for runner in runners:
            await runner.stop()


async def test_garbage_answer_is_a_protocol_error(
    runners: list[SourceRunner], tmp_path: Path
) -> None:
    async with garbage_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n") as port:
        runner = start(runners, tmp_path, **fast(host="127.0.0.1", port=port,
                                                 devices=[plc_device()]))
        await runner.wait_for(lambda: runner.has("meter.temperature", quality=Quality.BAD))
        assert runner.latest("meter.temperature").reason == \
            "protocol error: answer is not Modbus"
        meter = runner.status.children["meter"]
        assert meter.state is ConnectionState.DOWN
        assert meter.error_category is ErrorCategory.PROTOCOL
        assert meter.counters["protocol_errors"] >= 1
        await runner.stop()


async def test_undecodable_frame_drops_the_connection_as_protocol_error(
    runners: list[SourceRunner], tmp_path: Path
) -> None:
    # A well-formed MBAP header for unit 1 around an unknown function code 0x55.
    frame = bytes.fromhex("000000000003015500")
    async with garbage_server(frame) as port:
        runner = start(runners, tmp_path, **fast(host="127.0.0.1", port=port,
                                                 devices=[plc_device()]))
        error = await runner.failure()
        assert error.category is ErrorCategory.PROTOCOL
        assert error.reason == "connection closed after an answer that is not Modbus"
        assert all(runner.has(f"meter.{point['name']}", quality=Quality.BAD) for point in POINTS)


async def test_server_stopped_raises_connector_error(
    server: ModbusTestServer, runners: list[SourceRunner], tmp_path: Path
) -> None:
    runner = start(runners, tmp_path, host="127.0.0.1", port=server.port,
                   devices=[plc_device()])
    await runner.wait_for(lambda: all_points_good(runner))

    await server.stop()
    error = await runner.failure()
    assert error.category is ErrorCategory.TRANSIENT
    assert error.endpoint == f"tcp://127.0.0.1:{server.port}"
    for point in POINTS:
        event = runner.latest(f"meter.{point['name']}")
        assert event.quality is Quality.BAD
        assert event.reason == error.reason
    assert runner.status.children["meter"].state is ConnectionState.DOWN


async def test_connection_refused_raises_and_points_turn_bad(
    runners: list[SourceRunner], tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    runner = start(runners, tmp_path, **fast(host="127.0.0.1", port=port,
                                             devices=[plc_device()]))
    error = await runner.failure()
    assert error.category is ErrorCategory.TRANSIENT
    assert error.reason == f"cannot connect to 127.0.0.1:{port}"
    assert runner.latest("meter.energy").quality is Quality.BAD


async def test_rtu_over_tcp(runners: list[SourceRunner], tmp_path: Path) -> None:
    async with ModbusTestServer([device(1, holding=HOLDING, input=[42], coils=[False, True],
                                        discrete=[False, False, True])],
                                framer=FramerType.RTU) as server:
        runner = start(runners, tmp_path, transport="rtu-over-tcp", host="127.0.0.1",
                       port=server.port, devices=[plc_device()])
        assert runner.source.endpoint == f"rtu+tcp://127.0.0.1:{server.port}"
        await runner.wait_for(lambda: all_points_good(runner))
        assert runner.latest("meter.voltage").value == 123.456
        await runner.stop()


async def test_live_read_through(
    server: ModbusTestServer, runners: list[SourceRunner], tmp_path: Path
) -> None:
    runner = start(runners, tmp_path, host="127.0.0.1", port=server.port,
                   devices=[plc_device(interval="1h")])
    await runner.wait_for(lambda: all_points_good(runner))
    await server.set_registers(1, 3, [0x0001, 0x0000])  # energy 1 (CDAB)

    readings = await runner.source.read("meter.energy")
    events = [event for reading in readings for event in runner.unit.mapper.map(reading)]
    assert [(event.point, event.value) for event in events] == [("meter.energy", 1)]
    with pytest.raises(ReadError, match="no such point"):
        await runner.source.read("meter.nothing")


async def test_live_read_needs_a_connection(tmp_path: Path) -> None:
    unit = build_unit(tmp_path, source_config(host="127.0.0.1", devices=[plc_device()]))
    with pytest.raises(ReadError, match="not connected"):
        await unit.source.read("meter.energy")


# -- write-back -------------------------------------------------------------------------

WRITABLE: list[dict[str, Any]] = [
    {"name": "setpoint", "address": 40001, "type": "int16", "scale": 0.1, "writable": True},
    {"name": "ratio", "address": 40002, "type": "float32", "order": "CDAB", "writable": True},
    {"name": "mode", "address": 40004, "enum": {0: "standby", 1: "heating"}, "writable": True},
    {"name": "flag", "address": 40005, "bit": 2, "writable": True},
    {"name": "label", "address": 40006, "type": "string", "length": 2, "writable": True},
    {"name": "pump", "table": "coil", "address": 1, "writable": True},
    {"name": "fixed", "address": 40008},
    {"name": "beyond", "address": 40100, "writable": True},
]


async def test_write_back(runners: list[SourceRunner], tmp_path: Path) -> None:
    registers = [200, 0, 0, 0, 0b1001, 0x4142, 0, 5]
    async with ModbusTestServer([device(1, holding=registers, coils=[False, False])]) as server:
        runner = start(runners, tmp_path, host="127.0.0.1", port=server.port,
                       devices=[plc_device(points=WRITABLE)])
        await runner.wait_for(lambda: runner.has("meter.setpoint", value=20.0))
        source = runner.source
        server.requests.clear()

        await source.write("meter.setpoint", 25.5)  # 255 in tenths
        await source.write("meter.ratio", 1.5)
        await source.write("meter.mode", "heating")
        await source.write("meter.flag", True)
        await source.write("meter.label", "OK")
        await source.write("meter.pump", True)
        assert await server.holding(1, 0, 7) == [255, 0x0000, 0x3FC0, 1, 0b1101, 0x4F4B, 0]
        assert await server.coils(1, 1) == [True]
        writes = [(request.function_code, request.address) for request in server.requests
                  if request.function_code in (5, 6, 16)]
        assert writes == [(6, 0), (16, 1), (6, 3), (6, 4), (16, 5), (5, 1)]

        # Clearing one bit keeps its neighbours.
        await source.write("meter.flag", False)
        assert await server.holding(1, 4) == [0b1001]

        # The next poll shows what was written, in engineering units.
        await runner.wait_for(lambda: runner.has("meter.setpoint", value=25.5)
                              and runner.has("meter.mode", value="heating"))
        assert runner.latest("meter.ratio").value == 1.5
        assert runner.latest("meter.label").value == "OK"

        with pytest.raises(WriteError, match="not one of the point's labels: heating, standby"):
            await source.write("meter.mode", "boost")
        with pytest.raises(WriteError, match="finer than the point resolves"):
            await source.write("meter.setpoint", 25.55)
        with pytest.raises(WriteError, match="expected a number"):
            await source.write("meter.setpoint", "warm")
        with pytest.raises(WriteError, match="out of range"):
            await source.write("meter.setpoint", 4000)
        with pytest.raises(WriteError, match="expected true or false"):
            await source.write("meter.pump", 2)
        with pytest.raises(WriteError, match="illegal data address") as device_refused:
            await source.write("meter.beyond", 1)
        assert device_refused.value.category is ErrorCategory.DEVICE
        await runner.stop()
        with pytest.raises(WriteError, match="not connected"):
            await source.write("meter.setpoint", 20)


# -- the serial line -------------------------------------------------------------------


@pytest.mark.serial
async def test_rtu_serial_line_with_two_units(
    pty_pair: PtyPair, runners: list[SourceRunner], tmp_path: Path
) -> None:
    bus = ModbusSerialServer(
        [device(1, holding=HOLDING, input=[42], coils=[False, True],
                discrete=[False, False, True]),
         device(2, holding=[0x0064, *HOLDING[1:]], input=[7], coils=[False, False],
                discrete=[False, False, False])],
        port=pty_pair.device_end, baudrate=19200, reconnect_delay=0)
    await bus.serve_forever(background=True)
    try:
        serial = {"port": pty_pair.bridge_end, "baudrate": 19200}
        runner = start(runners, tmp_path, transport="rtu", serial=serial, timeout="500ms",
                       devices=[plc_device(), plc_device(id="second", unit=2)])
        assert runner.source.endpoint == f"rtu://{pty_pair.bridge_end}@19200"
        await runner.wait_for(lambda: all_points_good(runner)
                              and all_points_good(runner, "second."))
        assert runner.latest("meter.temperature").value == -10.0
        assert runner.latest("second.temperature").value == 10.0
        assert runner.latest("meter.flow").value == 42
        assert runner.latest("second.flow").value == 7
        assert runner.latest("second.pump").value is False
        await runner.stop()
    finally:
        await bus.shutdown()


@pytest.mark.serial
async def test_serial_settings_the_driver_refuses_are_a_config_error_logged_once(
    pty_pair: PtyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A pty refuses even parity: once an "internal error" with a traceback on every retry.
    unit = build_unit(tmp_path, source_config(
        transport="rtu", serial={"port": pty_pair.bridge_end, "parity": "E"},
        devices=[plc_device()]))
    caplog.set_level(logging.INFO)
    async with SourceRunner(unit, supervised=True) as runner:
        await runner.wait_for(lambda: runner.status.counters["reconnects"] >= 3)
        status = runner.status
        assert status.state is ConnectionState.DOWN
        assert status.error_category is ErrorCategory.CONFIG
        assert status.last_error == (
            f"serial port {pty_pair.bridge_end} refuses the settings (9600 baud, 8 data "
            "bits, parity E, 1 stop bits): Invalid argument")
        assert runner.latest("meter.temperature").reason == status.last_error
    assert not [record for record in caplog.records
                if record.levelno >= logging.ERROR or record.exc_info]
    down = [record.getMessage() for record in caplog.records
            if record.name == "bridge.core.status" and "source plc down" in record.getMessage()]
    assert down == [f"source plc down: {status.last_error} (config)"]


# -- scheduling and the connection lock, with a small fake client ------------------------


class FakeResponse:
    """A successful register response."""

    def __init__(self, count: int) -> None:
        self.registers = [0] * count
        self.bits: list[bool] = []
        self.exception_code = 0

    def isError(self) -> bool:  # noqa: N802 - pymodbus' name
        return False


class FakeClient:
    """Answers every read after ``delay`` seconds, recording how many were in flight at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.connected = False
        self.connected_once = asyncio.Event()
        self.closed = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.reads = 0

    async def connect(self) -> bool:
        self.connected = True
        self.connected_once.set()
        return True

    def close(self) -> None:
        self.connected = False
        self.closed += 1

    async def _read(self, count: int) -> ModbusPDU:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)  # the device's answer time, not test syncing
        finally:
            self.in_flight -= 1
        self.reads += 1
        response: Any = FakeResponse(count)
        return response  # type: ignore[no-any-return]

    def read_holding_registers(self, address: int, *, count: int = 1, device_id: int = 1,
                               no_response_expected: bool = False) -> Awaitable[ModbusPDU]:
        return self._read(count)

    read_input_registers = read_holding_registers
    read_coils = read_holding_registers
    read_discrete_inputs = read_holding_registers


def fake_source(client: FakeClient, interval: float, devices: int) -> ModbusSource:
    """A source of ``devices`` devices, two blocks each, on one fake client."""
    config = ModbusSourceConfig.model_validate(
        {"id": "fake", "protocol": "modbus", "host": "192.0.2.1"})
    plans = [DevicePlan(f"d{index}", index + 1, interval,
                        (Block("holding", 0, 2), Block("holding", 100, 2)))
             for index in range(devices)]
    return ModbusSource(config, plans, client_factory=lambda _config, _hooks: client)


async def test_devices_on_one_connection_take_turns_and_overruns_are_counted() -> None:
    client = FakeClient(delay=0.02)
    source = fake_source(client, interval=0.01, devices=3)
    status = EndpointStatus(name="fake", kind="source", protocol="modbus", endpoint="x")
    published = asyncio.Event()
    batches: list[int] = []

    async def publish(readings: Any) -> None:
        batches.append(len(readings))
        if len(batches) >= 9:
            published.set()

    task = asyncio.create_task(source.run(SourceContext(status=status, publish=publish)))
    async with asyncio.timeout(10):
        await published.wait()
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert client.closed == 1
    assert client.most_in_flight == 1
    assert set(batches) == {2}
    # Each cycle takes ~6 x 20 ms of turns on the line against a 10 ms interval.
    assert status.counters["overruns"] > 0
    assert status.counters["overruns"] == sum(
        child.counters["overruns"] for child in status.children.values())
    assert_no_other_tasks()


def test_schedule_keeps_to_its_grid() -> None:
    # On time: the next deadline is one interval on, whatever the cycle took.
    assert next_deadline(10.0, 1.0, 10.3) == (11.0, 0)
    assert next_deadline(11.0, 1.0, 11.999) == (12.0, 0)
    # Late by 2.5 intervals: the missed deadlines are skipped, the grid is kept.
    assert next_deadline(10.0, 1.0, 13.5) == (14.0, 3)
    # Exactly on a later grid point: poll now, one deadline (11) was missed.
    assert next_deadline(10.0, 1.0, 12.0) == (12.0, 1)


async def test_connection_loss_reported_by_the_client_ends_run() -> None:
    seen: list[ClientHooks] = []
    client = FakeClient(delay=0)

    def factory(config: ModbusSourceConfig, hooks: ClientHooks) -> Any:
        seen.append(hooks)
        return client

    config = ModbusSourceConfig.model_validate(
        {"id": "fake", "protocol": "modbus", "host": "192.0.2.1"})
    source = ModbusSource(config, [], client_factory=factory)
    status = EndpointStatus(name="fake", kind="source", protocol="modbus", endpoint="x")

    async def publish(readings: Any) -> None:
        raise AssertionError("nothing to publish")

    task = asyncio.create_task(source.run(SourceContext(status=status, publish=publish)))
    async with asyncio.timeout(10):
        await client.connected_once.wait()
    # run() marked the source up in the same step that connected, before this task resumed.
    assert status.state is ConnectionState.UP
    # The client reports the connection lost: run() ends with ConnectorError.
    seen[0].connect(False)
    await asyncio.wait([task], timeout=10)
    error = task.exception()
    assert error is not None
    assert "connection closed" in str(error)
    assert client.closed == 1
