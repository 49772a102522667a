"""The Modbus TCP server serving bridged points, read and written by a real pymodbus client.

The bridged points come from a Modbus source polling a pymodbus device; the northbound
server serves them under other addresses, types and orders.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import WAIT, free_port
from helpers.api import parse_exposition, sample
from helpers.brokers import wait_on
from helpers.modbus_servers import ModbusTestServer, device
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException

from bridge.api.app import create_app
from bridge.core.codec import BYTE_ORDERS, compile_register_decoder
from bridge.core.model import Quality
from bridge.core.status import ConnectionState
from bridge.errors import ServerError
from bridge.registry import load_config
from bridge.runtime import Runtime

UNIT = 1
TEMPERATURE = 21.5
COUNT = -123456
LABEL = "AB12"

HOLDING = [
    *struct.unpack(">2H", struct.pack(">f", TEMPERATURE)),  # 40001 temp
    *struct.unpack(">2H", struct.pack(">i", COUNT)),  # 40003 count
    *struct.unpack(">2H", LABEL.encode()),  # 40005 label
    20,  # 40007 setpoint
]
SOURCE_POINTS = [
    {"name": "temp", "address": 40001, "type": "float32"},
    {"name": "count", "address": 40003, "type": "int32"},
    {"name": "label", "address": 40005, "type": "string", "length": 2},
    {"name": "setpoint", "address": 40007, "writable": True},
    {"name": "run", "table": "coil", "address": 0},
]
FOUR = ("ABCD", "CDAB", "BADC", "DCBA")
EIGHT = ("ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA")


@dataclass(frozen=True)
class Served:
    """One served entry as the test expects to read it back."""

    address: int
    count: int
    type: str
    order: str
    value: Any


def register_map() -> tuple[list[dict[str, Any]], list[Served]]:
    """Entries from holding address 100 on: every type and order the codec knows."""
    entries: list[dict[str, Any]] = []
    expected: list[Served] = []
    address = 100
    cases = ([("meter.temp", "float32", order, 2, TEMPERATURE) for order in FOUR]
             + [("meter.temp", "float64", order, 4, TEMPERATURE) for order in EIGHT]
             + [("meter.count", "int32", order, 2, COUNT) for order in FOUR]
             + [("meter.count", "int64", order, 4, COUNT) for order in EIGHT]
             + [("meter.setpoint", "uint16", "ABCD", 1, 20),
                ("meter.setpoint", "int16", "BADC", 1, 20),
                ("meter.setpoint", "uint32", "CDAB", 2, 20),
                ("meter.setpoint", "uint64", "DCBA", 4, 20)]
             + [("meter.label", "string", order, 2, LABEL) for order in ("ABCD", "BADC")])
    for point, data_type, order, count, value in cases:
        entry: dict[str, Any] = {"point": point, "table": "holding", "address": address,
                                 "type": data_type, "order": order}
        if data_type == "string":
            entry["length"] = count
        entries.append(entry)
        expected.append(Served(address, count, data_type, order, value))
        address += count
    return entries, expected


ENTRIES, EXPECTED = register_map()
SPECIAL = [
    # temperature as tenths in an input register, and with policies for bad values
    {"point": "meter.temp", "table": "input", "address": 10, "type": "int16", "scale": 0.1},
    {"point": "meter.temp", "table": "input", "address": 11, "type": "int16", "scale": 0.1,
     "when_bad": "last"},
    {"point": "meter.temp", "table": "input", "address": 12, "type": "int16", "scale": 0.5,
     "when_bad": "sentinel", "sentinel": -1},
    {"point": "meter.run", "table": "coil", "address": 5},
    {"point": "meter.run", "table": "discrete", "address": 7},
    {"point": "meter.run", "table": "holding", "address": 300, "type": "uint16", "bit": 3},
    {"point": "meter.setpoint", "table": "holding", "address": 400, "type": "uint16",
     "scale": 0.1, "writable": True},
]


def write_config(tmp_path: Path, source_port: int, server_port: int,
                 interval: str = "50ms", sinks: list[dict[str, Any]] | None = None,
                 **server: Any) -> Path:
    """A configuration with one Modbus source and one Modbus server."""
    document = {
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "api": {"enabled": False},
        "sources": [{"id": "plc", "protocol": "modbus", "host": "127.0.0.1",
                     "port": source_port, "timeout": "200ms", "retries": 0,
                     "devices": [{"id": "meter", "unit": UNIT, "interval": interval,
                                  "points": SOURCE_POINTS}]}],
        "servers": [{"id": "north", "protocol": "modbus", "port": server_port,
                     "units": [{"unit": UNIT, "registers": ENTRIES + SPECIAL}], **server}],
        "sinks": sinks or [],
    }
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class North:
    """A running runtime with its northbound server, its device and a connected client."""

    runtime: Runtime
    device: ModbusTestServer
    client: AsyncModbusTcpClient
    port: int

    changed: asyncio.Event

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait until ``condition`` holds, checked after every stored batch of events and
        every change of a source's state."""
        await wait_on(self.changed, condition, WAIT, lambda: what)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, *, wait_good: bool = True, interval: str = "50ms",
                  sinks: list[dict[str, Any]] | None = None, **server: Any
                  ) -> AsyncIterator[North]:
    """The device, the runtime serving it northbound, and a client of the server."""
    async with ModbusTestServer([device(UNIT, holding=HOLDING, coils=[True])]) as plc:
        port = free_port()
        runtime = Runtime(load_config(write_config(tmp_path, plc.port, port, interval,
                                                   sinks, **server)))
        changed = asyncio.Event()
        runtime.router.add_listener(lambda events: changed.set())
        runtime.watch_states(changed.set)
        task = asyncio.create_task(runtime.run(), name="test.runtime")
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        try:
            await asyncio.wait_for(runtime.ready.wait(), WAIT)
            await client.connect()
            north = North(runtime, plc, client, port, changed)
            if wait_good:
                def good() -> bool:
                    latest = runtime.router.latest
                    return all(latest.get(f"meter.{point['name']}") is not None
                               and latest[f"meter.{point['name']}"].quality is Quality.GOOD
                               for point in SOURCE_POINTS)
                await north.until(good, "every point good")
            yield north
        finally:
            client.close()
            runtime.stop()
            await task


async def test_every_type_and_order_reads_back(tmp_path: Path) -> None:
    async with running(tmp_path) as north:
        for served in EXPECTED:
            response = await north.client.read_holding_registers(
                served.address, count=served.count, device_id=UNIT)
            assert not response.isError(), served
            length = served.count if served.type == "string" else None
            decode = compile_register_decoder(served.type, served.order,  # type: ignore[arg-type]
                                              length=length)
            assert decode(response.registers) == served.value, served
        # Known words, independent of the codec: 21.5 is 0x41AC0000.
        first = await north.client.read_holding_registers(100, count=4, device_id=UNIT)
        assert first.registers == [0x41AC, 0x0000, 0x0000, 0x41AC]
        assert {served.order for served in EXPECTED} == set(BYTE_ORDERS)


async def test_start_address_not_zero_and_partial_reads(tmp_path: Path) -> None:
    async with running(tmp_path) as north:
        second_word = await north.client.read_holding_registers(101, count=1, device_id=UNIT)
        assert second_word.registers == [0x0000]
        tenths = await north.client.read_input_registers(10, count=1, device_id=UNIT)
        assert tenths.registers == [215]
        coil = await north.client.read_coils(5, count=1, device_id=UNIT)
        assert coil.bits[0] is True
        discrete = await north.client.read_discrete_inputs(7, count=1, device_id=UNIT)
        assert discrete.bits[0] is True
        bit = await north.client.read_holding_registers(300, count=1, device_id=UNIT)
        assert bit.registers == [1 << 3]


async def test_addresses_outside_the_map_answer_exception_02(tmp_path: Path) -> None:
    async with running(tmp_path) as north:
        for read in (north.client.read_holding_registers(0, count=1, device_id=UNIT),
                     north.client.read_holding_registers(99, count=2, device_id=UNIT),
                     north.client.read_input_registers(13, count=1, device_id=UNIT),
                     north.client.read_coils(0, count=1, device_id=UNIT)):
            response = await read
            assert response.isError()
            assert response.exception_code == 2
        counters = north.runtime.servers["north"].status.counters
        assert counters["exception_02"] == 4


async def test_a_source_going_down_answers_by_policy(tmp_path: Path) -> None:
    async with running(tmp_path) as north:
        good = await north.client.read_input_registers(10, count=3, device_id=UNIT)
        assert good.registers == [215, 215, 43]
        await north.device.stop()
        status = north.runtime.sources["plc"].status

        def down() -> bool:
            return status.state is ConnectionState.DOWN
        await north.until(down, "the source down")
        default = await north.client.read_input_registers(10, count=1, device_id=UNIT)
        assert default.isError()
        assert default.exception_code == 4
        last = await north.client.read_input_registers(11, count=1, device_id=UNIT)
        assert last.registers == [215]
        sentinel = await north.client.read_input_registers(12, count=1, device_id=UNIT)
        assert sentinel.registers == [0xFFFE]  # -1 in halves
        whole = await north.client.read_holding_registers(100, count=2, device_id=UNIT)
        assert whole.isError()
        assert whole.exception_code == 4
        entry = north.runtime.facade().servers()[0]
        assert entry["state"] == "up"
        assert entry["counters"]["exception_04"] >= 2


async def test_a_stale_value_answers_exception_04(tmp_path: Path) -> None:
    stale = {"point": "meter.temp", "table": "input", "address": 20, "type": "int16",
             "scale": 0.1, "stale_after": "2s"}
    SPECIAL.append(stale)
    try:
        # Polled once an hour: after the first reading, the value only ages.
        async with running(tmp_path, interval="1h") as north:
            served = await north.client.read_input_registers(20, count=1, device_id=UNIT)
            assert served.registers == [215]
            received = north.runtime.router.latest["meter.temp"].received_at
            await asyncio.sleep(received + 2.0 - time.time() + 0.05)
            response = await north.client.read_input_registers(20, count=1, device_id=UNIT)
            assert response.isError()
            assert response.exception_code == 4
            kept = await north.client.read_input_registers(10, count=1, device_id=UNIT)
            assert kept.registers == [215]  # no stale_after: any age is current
    finally:
        SPECIAL.remove(stale)


async def test_writes_accepted_refused_and_audited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(tmp_path) as north:
        with caplog.at_level(logging.INFO, logger="bridge.audit"):
            accepted = await north.client.write_register(400, 250, device_id=UNIT)
            assert not accepted.isError()
            assert await north.device.holding(UNIT, 6) == [25]
            read_only = await north.client.write_register(100, 1, device_id=UNIT)
            assert read_only.isError()
            assert read_only.exception_code == 2
            # The source refuses what its uint16 cannot hold: the reply says so.
            too_large = await north.client.write_register(400, 65535, device_id=UNIT)
            assert too_large.isError()
            assert too_large.exception_code == 3
            outside = await north.client.write_register(401, 1, device_id=UNIT)
            assert outside.isError()
            assert outside.exception_code == 2
        audit = [record.getMessage() for record in caplog.records
                 if record.name == "bridge.audit"]
        assert any(message.startswith("write: modbus server north unit 1, point "
                                      "meter.setpoint, value 25") for message in audit), audit
        assert any(message.startswith("write failed: modbus server north unit 1")
                   for message in audit), audit
        assert north.runtime.servers["north"].status.counters["writes"] == 2


async def test_serving_goes_on_through_a_sink_outage(tmp_path: Path) -> None:
    # The sink's broker is not there: events wait in its outbox, the server serves on.
    sink = {"id": "broker", "protocol": "mqtt", "host": "127.0.0.1", "port": free_port()}
    async with running(tmp_path, sinks=[sink]) as north:
        assert north.runtime.sinks["broker"].status.state is not ConnectionState.UP
        await north.device.set_registers(UNIT, 0, list(struct.unpack(">2H",
                                                                      struct.pack(">f", 30.0))))
        await north.until(lambda: north.runtime.router.latest["meter.temp"].value == 30.0,
                          "the new temperature")
        response = await north.client.read_input_registers(10, count=1, device_id=UNIT)
        assert response.registers == [300]


async def test_the_port_is_bound_while_every_source_is_down(tmp_path: Path) -> None:
    port = free_port()
    runtime = Runtime(load_config(write_config(tmp_path, free_port(), port)))
    task = asyncio.create_task(runtime.run(), name="test.runtime")
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    try:
        await asyncio.wait_for(runtime.ready.wait(), WAIT)
        assert await client.connect()
        response = await client.read_holding_registers(100, count=2, device_id=UNIT)
        assert response.isError()
        assert response.exception_code == 4
        assert runtime.facade().servers()[0]["port"] == port
    finally:
        client.close()
        runtime.stop()
        await task


async def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runtime = Runtime(load_config(write_config(tmp_path, free_port(), port)))
        with pytest.raises(ServerError, match=rf"server 'north' cannot listen on "
                           rf"modbus://127.0.0.1:{port}: Address already in use"):
            await runtime.run()


async def test_clients_outside_the_allowed_networks_are_refused(tmp_path: Path) -> None:
    async with running(tmp_path, wait_good=False, allowed_networks=["10.0.0.0/8"]) as north:
        with pytest.raises((ConnectionException, ModbusIOException)):
            await north.client.read_holding_registers(100, count=2, device_id=UNIT)
        assert north.runtime.servers["north"].status.counters["clients_refused"] >= 1


async def test_the_connection_cap_refuses_one_more_client(tmp_path: Path) -> None:
    async with running(tmp_path, max_connections=1) as north:
        assert not (await north.client.read_coils(5, count=1, device_id=UNIT)).isError()
        second = AsyncModbusTcpClient("127.0.0.1", port=north.port, timeout=1, retries=0)
        try:
            await second.connect()
            with pytest.raises((ConnectionException, ModbusIOException)):
                await second.read_coils(5, count=1, device_id=UNIT)
        finally:
            second.close()
        counters = north.runtime.servers["north"].status.counters
        assert counters["clients_refused"] >= 1
        assert counters["clients"] == 1


async def test_the_inventory_and_metrics_count_requests_and_clients(tmp_path: Path) -> None:
    async with running(tmp_path) as north:
        await north.client.read_holding_registers(100, count=2, device_id=UNIT)
        await north.client.read_holding_registers(0, count=1, device_id=UNIT)
        transport = httpx.ASGITransport(app=create_app(north.runtime.facade()))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            (entry,) = (await http.get("/v1/servers")).json()["items"]
            metrics = parse_exposition((await http.get("/metrics")).text)
        assert (entry["id"], entry["kind"], entry["state"], entry["port"]) == (
            "north", "server", "up", north.port)
        assert entry["details"]["connected_clients"] == 1
        assert entry["counters"]["requests"] == 2
        assert entry["counters"]["exception_02"] == 1
        assert sample(metrics, "fieldbridge_server_requests_total", server="north",
                      protocol="modbus") == 2
        assert sample(metrics, "fieldbridge_server_up", server="north", protocol="modbus") == 1
