"""Modbus discovery against a real pymodbus server: units, readable blocks, holes, the
generated device running, the request rate, and the failures."""

from __future__ import annotations

import io
import itertools
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from helpers import free_port
from helpers.brokers import SourceRun, wait_until
from helpers.discovery import in_thread
from helpers.modbus_servers import (  # noqa: F401 (pty_pair_fixture: the fixture ``pty_pair``)
    ModbusTestServer,
    PtyPair,
    pty_pair_fixture,
    silent_server,
)
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from bridge import cli
from bridge.core.discovery import Budget, Discovery, DiscoveryContext, StreamProgress
from bridge.core.model import Quality
from bridge.errors import ConnectorError, ErrorCategory
from bridge.registry import load_config
from protocols.modbus.discover import ModbusDiscoverRequest, describe_estimate, discover

Blocks = Sequence[tuple[int, Sequence[Any]]]


def _table(blocks: Blocks, kind: DataType) -> list[SimData]:
    if not blocks:
        return [SimData(0, count=1, datatype=DataType.INVALID)]
    return [SimData(start, values=list(values), datatype=kind) for start, values in blocks]


def _device(unit: int, *, coils: Blocks = (), discrete: Blocks = (), holding: Blocks = (),
            input: Blocks = ()) -> SimDevice:
    return SimDevice(unit, simdata=(_table(coils, DataType.BITS), _table(discrete, DataType.BITS),
                                    _table(holding, DataType.REGISTERS),
                                    _table(input, DataType.REGISTERS)))


def plant() -> list[SimDevice]:
    """Unit 1 and unit 2, with holes between their register blocks."""
    return [
        _device(1, coils=[(0, [True, False] * 8)], discrete=[(0, [False] * 16)],
                holding=[(0, range(100, 110)), (20, range(5)), (100, range(1000, 1130))],
                input=[(0, [7, 8, 9])]),
        _device(2, coils=[(0, [False] * 16)], discrete=[(0, [True] * 16)],
                holding=[(5, [55, 56]), (50, [500])], input=[(10, [1, 2, 3])]),
    ]


EXPECTED = {
    (1, "coil"): [(0, 15)],
    (1, "discrete"): [(0, 15)],
    (1, "input"): [(0, 2)],
    (1, "holding"): [(0, 9), (20, 24), (100, 229)],
    (2, "coil"): [(0, 15)],
    (2, "discrete"): [(0, 15)],
    (2, "input"): [(10, 12)],
    (2, "holding"): [(5, 6), (50, 50)],
}


def blocks_of(result: Discovery) -> dict[tuple[int, str], list[tuple[int, int]]]:
    """The readable blocks in the listing, by (unit id, table)."""
    found: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for item in result.items:
        runs = found.setdefault((item.extra["unit_id"], item.extra["table"]), [])
        offset = item.extra["offset"]
        if runs and runs[-1][1] == offset - 1:
            runs[-1] = (runs[-1][0], offset)
        else:
            runs.append((offset, offset))
    return found


def _context(**budget: Any) -> DiscoveryContext:
    return DiscoveryContext(progress=StreamProgress(io.StringIO(), tty=False),
                            budget=Budget(**budget))


@pytest_asyncio.fixture
async def server() -> AsyncIterator[ModbusTestServer]:
    async with ModbusTestServer(plant()) as running:
        yield running


async def test_the_scan_finds_exactly_the_readable_blocks_and_the_device_runs(
    server: ModbusTestServer, tmp_path: Path
) -> None:
    request = ModbusDiscoverRequest(host="127.0.0.1", port=server.port, units="1-3",
                                    range="0-299", rate=1000, timeout=0.5)
    result = await discover(request, _context())
    assert not result.partial, result.warnings
    assert blocks_of(result) == EXPECTED
    assert "No answer from unit 3." in result.yaml
    assert "cannot be inferred" in result.yaml
    assert "# unit 1: 180 readable addresses; polling them all takes 7 requests." in result.yaml
    assert {item.type for item in result.items if item.extra["table"] == "holding"} == {
        "uint16"}
    assert {item.type for item in result.items if item.extra["table"] == "coil"} == {"bool"}

    path = tmp_path / "modbus.yaml"
    path.write_text(result.yaml, encoding="utf-8")
    expected = {point.id for point in load_config(path).points["modbus"]}
    assert len(expected) == len(result.items)
    async with SourceRun(path) as run:
        def latest() -> dict[str, Any]:
            return {event.point: event for event in run.events}

        await wait_until(lambda: expected <= {point for point, event in latest().items()
                                              if event.quality is Quality.GOOD},
                         what="a good value for every generated point")
    values = latest()
    assert values["unit-1.holding_3"].value == 103
    assert values["unit-1.holding_229"].value == 1129
    assert values["unit-2.holding_50"].value == 500
    assert values["unit-1.coil_0"].value is True
    assert not [event for event in run.events if event.quality is not Quality.GOOD]


async def test_requests_keep_to_the_rate(server: ModbusTestServer) -> None:
    request = ModbusDiscoverRequest(host="127.0.0.1", port=server.port, units="2",
                                    tables="holding", range="0-39", rate=200)
    started = time.monotonic()
    result = await discover(request, _context())
    elapsed = time.monotonic() - started
    assert blocks_of(result) == {(2, "holding"): [(5, 6)]}
    requests = len(server.requests)
    assert requests > 30  # a hole costs one request
    assert elapsed >= (requests - 1) / 200 * 0.95


async def test_a_size_bound_gives_a_partial_scan(server: ModbusTestServer) -> None:
    request = ModbusDiscoverRequest(host="127.0.0.1", port=server.port, units="1",
                                    tables="holding", range="0-299", rate=1000)
    result = await discover(request, _context(max_items=5))
    assert result.partial
    assert result.yaml.startswith("# PARTIAL")
    assert any("size bound" in warning for warning in result.warnings)


async def test_rtu_frames_over_tcp(tmp_path: Path) -> None:
    async with ModbusTestServer(plant(), framer=FramerType.RTU) as server:
        result = await discover(ModbusDiscoverRequest(
            host="127.0.0.1", port=server.port, transport="rtu-over-tcp", units="2",
            tables="holding,input", range="0-59", rate=1000), _context())
    assert blocks_of(result) == {(2, "holding"): [(5, 6), (50, 50)], (2, "input"): [(10, 12)]}
    assert "transport: rtu-over-tcp" in result.yaml


async def test_an_unreachable_device_is_a_clear_error() -> None:
    with pytest.raises(ConnectorError) as caught:
        await discover(ModbusDiscoverRequest(host="127.0.0.1", port=free_port()), _context())
    assert caught.value.category is ErrorCategory.TRANSIENT
    assert "cannot connect" in str(caught.value)


async def test_a_device_that_never_answers_times_out() -> None:
    async with silent_server() as port:
        with pytest.raises(ConnectorError) as caught:
            await discover(ModbusDiscoverRequest(host="127.0.0.1", port=port, units="1-2",
                                                 timeout=0.2, rate=1000), _context())
    assert "no unit answered" in caught.value.reason
    assert "no answer after 0.2 s" in caught.value.reason


async def test_the_command(server: ModbusTestServer, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "device.yaml"
    status = await in_thread(cli.main, [
        "discover", "modbus", f"127.0.0.1:{server.port}", "--units", "2", "--tables",
        "holding", "--range", "0-59", "--rate", "1000", "--output", str(output)])
    assert status == 0, capsys.readouterr().err
    assert "name: holding_50" in output.read_text()
    assert await in_thread(cli.main, ["validate", str(output)]) == 0
    status = await in_thread(cli.main, ["discover", "modbus", "127.0.0.1", "--units", "300"])
    assert status == 2
    assert "--units" in capsys.readouterr().err


@pytest.mark.serial
async def test_serial_rtu(pty_pair: PtyPair) -> None:
    bridge_end, device_end = pty_pair.bridge_end, pty_pair.device_end
    bus = ModbusSerialServer(plant(), port=device_end, baudrate=19200, reconnect_delay=0)
    await bus.serve_forever(background=True)
    try:
        request = ModbusDiscoverRequest.model_validate({
            "transport": "rtu", "serial": {"port": bridge_end, "baudrate": 19200},
            "units": "1-2", "tables": "input", "range": "0-19", "rate": 1000,
            "timeout": 0.5})
        result = await discover(request, _context())
    finally:
        await bus.shutdown()
    assert blocks_of(result) == {(1, "input"): [(0, 2)], (2, "input"): [(10, 12)]}
    assert f"port: {bridge_end}" in result.yaml


def test_the_estimate_of_the_default_scan() -> None:
    request = ModbusDiscoverRequest(host="127.0.0.1")
    assert describe_estimate(request.scan_settings()) == (
        "scanning 1 unit x 4 tables x 1000 addresses: 19 requests if every address reads, "
        "up to about 4004 if none does; at 20 requests/s that is 0.9 s to 3 min 20 s (an "
        "unanswered request waits 1 s, twice)")


async def test_progress_counts_the_whole_scan_on_a_terminal(server: ModbusTestServer) -> None:
    stream = io.StringIO()
    ticks = itertools.count()
    context = DiscoveryContext(progress=StreamProgress(
        stream, tty=True, clock=lambda: float(next(ticks))))
    request = ModbusDiscoverRequest(host="127.0.0.1", port=server.port, units="2-3",
                                    tables="holding,input", range="0-59", rate=1000)
    result = await discover(request, context)
    lines = stream.getvalue().split("\n")
    assert lines[0] == ("discover: scanning 2 units x 2 tables x 60 addresses: 6 requests if "
                        "every address reads, up to about 244 if none does; at 1000 requests/s "
                        "that is 0.006 s to 0.2 s (an unanswered request waits 1 s, twice)")
    counts = [int(match.group(1)) for match in re.finditer(r"\] (\d+)/240 ", lines[1])]
    assert counts == sorted(counts)
    assert counts[-1] == 120  # unit 3 is absent: not scanned
    assert "] 60/240 unit 2 input (3 readable, " in lines[1]
    assert "] 120/240 unit 2 holding (6 readable, " in lines[1]
    assert lines[1].endswith("\r\x1b[Kdiscover: 6 readable addresses on 1 units, "
                             f"{len(server.requests)} requests")
    assert "discover:" not in result.yaml
    assert "\r" not in result.yaml


async def test_the_command_writes_the_same_yaml_and_the_estimate_on_stderr(
    server: ModbusTestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--units", "2", "--tables", "holding", "--range", "0-59", "--rate", "1000"]
    status = await in_thread(cli.main, ["discover", "modbus", f"127.0.0.1:{server.port}",
                                        *arguments])
    assert status == 0
    written = capsys.readouterr()
    assert written.err.startswith("discover: scanning 1 unit x 1 table x 60 addresses: 2 "
                                  "requests if every address reads, up to about 61 if none")
    result = await discover(ModbusDiscoverRequest(
        host="127.0.0.1", port=server.port, units="2", tables="holding", range="0-59",
        rate=1000), DiscoveryContext(command=f"fieldbridge discover modbus 127.0.0.1:"
                                              f"{server.port}"))

    def dated(text: str) -> str:
        return re.sub(r"on \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", "on DATE", text)

    assert dated(written.out) == dated(result.yaml)


@pytest.mark.serial
async def test_serial_settings_the_driver_refuses_are_a_clear_error(pty_pair: PtyPair) -> None:
    request = ModbusDiscoverRequest.model_validate({
        "transport": "rtu", "serial": {"port": pty_pair.bridge_end, "parity": "E"}})
    with pytest.raises(ConnectorError) as caught:
        await discover(request, _context())
    assert caught.value.category is ErrorCategory.CONFIG
    assert caught.value.reason == (
        f"serial port {pty_pair.bridge_end} refuses the settings (9600 baud, 8 data bits, "
        "parity E, 1 stop bits): Invalid argument")
