"""The Sparkplug B edge node against the local Mosquitto, with a Modbus device behind it:
births, data and deaths, commands, ``bdSeq`` across restarts, ``kill -9`` and refused
connects, the primary host's ``STATE`` and paced rebirths.

A whole bridge runs (``BridgeRun``): a pymodbus server behind a ``TcpProxy`` (so the device
can go away and come back), and the MQTT sink with ``format: sparkplug_b``, itself behind a
proxy where a test cuts its connection. A subscriber on the test's own group decodes every
message the edge node publishes. Each test has its own Sparkplug group id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from helpers.brokers import (
    MQTT_HOST,
    MQTT_PORT,
    SETTLE,
    BridgeRun,
    TcpProxy,
    assert_no_tasks_left,
    require_broker,
    unique,
    wait_on,
    wait_until,
    write_sink_config,
)
from helpers.daemon import running_daemon
from helpers.modbus_servers import ModbusTestServer, device

from bridge.core.model import Value
from bridge.core.status import EndpointStatus
from bridge.registry import load_config
from protocols.mqtt.sink_config import MqttSinkConfig
from protocols.mqtt.sparkplug import BD_SEQ, REBIRTH
from protocols.mqtt.sparkplug_b_pb2 import DataType, Payload
from protocols.mqtt.sparkplug_session import BdSeqFile, HostState, PrimaryHost, parse_state

pytestmark = pytest.mark.broker

EXAMPLE = Path(__file__).resolve().parents[2] / "mappings" / "sparkplug-example.yaml"
EDGE = "edge-01"
TEMP, SETPOINT = "boiler.temp", "boiler.setpoint"


@dataclass(frozen=True)
class Received:
    """One message the edge node published, decoded."""

    type: str
    device: str | None
    payload: Payload

    def metrics(self) -> dict[str, Payload.Metric]:
        return {metric.name: metric for metric in self.payload.metrics}


class Subscriber:
    """Subscribes to everything of one Sparkplug group and decodes every message."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.received: list[Received] = []
        self._arrived = asyncio.Event()
        self._client = aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-spb-"))
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        await self._client.__aenter__()
        await self._client.subscribe(f"spBv1.0/{self.group}/#", qos=1)
        self._task = asyncio.create_task(self._receive(), name="test.sparkplug-subscriber")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task  # raises what made it fail: a message that did not decode
        finally:
            await self._client.__aexit__(None, None, None)

    async def _receive(self) -> None:
        async for message in self._client.messages:
            levels = str(message.topic).split("/")
            if levels[2] in ("NCMD", "DCMD"):
                continue  # the test's own commands, some malformed on purpose
            assert isinstance(message.payload, bytes)
            # Every message must decode: a Sparkplug host would drop the node otherwise.
            payload = Payload.FromString(message.payload)
            self.received.append(Received(levels[2], levels[4] if len(levels) > 4 else None,
                                          payload))
            self._arrived.set()

    async def next(self, kind: str, device: str | None = None, *, after: int = 0
                   ) -> tuple[int, Received]:
        """The first message of ``kind`` (for ``device``) at or after position ``after``."""
        def find() -> int | None:
            for position in range(after, len(self.received)):
                message = self.received[position]
                if message.type == kind and (device is None or message.device == device):
                    return position
            return None

        await wait_on(self._arrived, lambda: find() is not None, SETTLE,
                      lambda: f"{kind} {device or ''} after {[m.type for m in self.received]}")
        position = find()
        assert position is not None
        return position, self.received[position]

    async def command(self, kind: str, payload: bytes, device: str | None = None) -> None:
        """Publish an NCMD (or, with ``device``, a DCMD) to the edge node."""
        topic = f"spBv1.0/{self.group}/{kind}/{EDGE}" + (f"/{device}" if device else "")
        await self._client.publish(topic, payload, qos=1)


def command(*metrics: Payload.Metric) -> bytes:
    return Payload(timestamp=1, metrics=list(metrics)).SerializeToString()


def rebirth() -> bytes:
    return command(Payload.Metric(name=REBIRTH, datatype=DataType.Boolean, boolean_value=True))


def properties(metric: Payload.Metric) -> dict[str, Any]:
    return {key: getattr(value, str(value.WhichOneof("value")))
            for key, value in zip(metric.properties.keys, metric.properties.values, strict=True)}


@pytest.fixture
def group() -> str:
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    return unique("fbtest-")


@pytest.fixture
async def plc() -> AsyncIterator[ModbusTestServer]:
    # Input register 0: temperature in tenths of a degree; holding register 0: the setpoint.
    async with ModbusTestServer([device(1, input=[215], holding=[40])]) as server:
        yield server


@pytest.fixture
async def plc_link(plc: ModbusTestServer) -> AsyncIterator[TcpProxy]:
    """The Modbus device's connection: ``pause()`` takes the device away."""
    async with TcpProxy("127.0.0.1", plc.port) as proxy:
        yield proxy


@pytest.fixture
async def broker_link(group: str) -> AsyncIterator[TcpProxy]:
    """The edge node's connection to Mosquitto: ``cut()`` kills it as a network failure
    would."""
    async with TcpProxy(MQTT_HOST, MQTT_PORT) as proxy:
        yield proxy


@pytest.fixture
async def subscriber(group: str) -> AsyncIterator[Subscriber]:
    async with Subscriber(group) as running:
        yield running


@pytest.fixture(autouse=True)
async def _no_tasks_left() -> AsyncIterator[None]:
    yield
    await assert_no_tasks_left()


def bridge_config(tmp_path: Path, group: str, plc_port: int, broker_port: int,
                  **sink: Any) -> Path:
    """A bridge with one Modbus device, ``boiler``, and the Sparkplug sink ``scada``."""
    plant = {
        "id": "plant", "protocol": "modbus", "host": "127.0.0.1", "port": plc_port,
        "timeout": "300ms", "retries": 0,
        "devices": [{"id": "boiler", "unit": 1, "interval": "50ms", "prefix": "boiler.",
                     "report": {"mode": "change"},
                     "points": [
                         {"name": "temp", "address": 30001, "type": "int16", "scale": 0.1,
                          "unit": "degC"},
                         {"name": "setpoint", "address": 40001, "type": "int16",
                          "unit": "degC", "writable": True},
                     ]}],
    }
    return write_sink_config(tmp_path, {
        "id": "scada", "protocol": "mqtt", "format": "sparkplug_b", "host": "127.0.0.1",
        "port": broker_port, "group_id": group, "edge_node_id": EDGE, **sink},
        sources=[plant])


def sink_status(bridge: BridgeRun) -> EndpointStatus:
    return bridge.sink("scada").status


def assert_seq_runs_on(messages: list[Received]) -> None:
    """From each NBIRTH (``seq`` 0) on, every message's ``seq`` is the last one's plus 1."""
    last: int | None = None
    for message in messages:
        if message.type == "NDEATH":
            assert not message.payload.HasField("seq")
            last = None
        elif message.type == "NBIRTH":
            assert message.payload.seq == 0
            last = 0
        else:
            assert last is not None, f"{message.type} before any NBIRTH"
            assert message.payload.seq == (last + 1) % 256, [m.type for m in messages]
            last = message.payload.seq


async def test_births_data_and_a_device_that_goes_down_and_comes_back(
        tmp_path: Path, group: str, plc: ModbusTestServer, plc_link: TcpProxy,
        broker_link: TcpProxy, subscriber: Subscriber) -> None:
    path = bridge_config(tmp_path, group, plc_link.port, broker_link.port)
    async with BridgeRun(path) as bridge:
        _, nbirth = await subscriber.next("NBIRTH")
        bd_seq = nbirth.metrics()[BD_SEQ].long_value
        assert nbirth.metrics()[REBIRTH].boolean_value is False
        at, dbirth = await subscriber.next("DBIRTH", "boiler")
        metrics = dbirth.metrics()
        assert set(metrics) == {TEMP, SETPOINT}
        temp = metrics[TEMP]
        assert (temp.datatype, temp.double_value) == (DataType.Double, 21.5)
        assert properties(temp) == {"engUnit": "degC", "Quality": 192}
        assert temp.timestamp > 0
        setpoint = metrics[SETPOINT]
        assert (setpoint.datatype, setpoint.long_value) == (DataType.Int64, 40)

        await plc.set_registers(1, 0, [41])  # the setpoint, changed at the device
        # (A loaded machine may time a read out: the points then go bad and good again in
        # DDATAs of their own.)
        after = at
        while True:
            after, data = await subscriber.next("DDATA", "boiler", after=after + 1)
            changes = [metric for metric in data.payload.metrics
                       if metric.alias == setpoint.alias and metric.long_value == 41]
            if changes:
                break
        [change] = changes
        assert not change.HasField("name")
        assert (change.alias, change.long_value) == (setpoint.alias, 41)
        assert properties(change) == {"Quality": 192}

        plc_link.pause()  # the device goes away
        down, _ = await subscriber.next("DDEATH", "boiler", after=at)
        plc_link.resume()
        up, reborn = await subscriber.next("DBIRTH", "boiler", after=down)
        assert reborn.metrics()[TEMP].double_value == 21.5
        assert properties(reborn.metrics()[TEMP])["Quality"] == 192
        assert all(message.type != "DDATA" for message in subscriber.received[down:up])
        # The events of the dead device (bad, then good again) left the outbox all the same.
        await wait_until(lambda: bridge.depth("scada") == 0, what="an empty outbox")

    # A clean stop says the NDEATH itself, with the NBIRTH's bdSeq.
    _, death = await subscriber.next("NDEATH")
    assert death.metrics()[BD_SEQ].long_value == bd_seq
    assert_seq_runs_on(subscriber.received)


async def test_ncmd_rebirth_publishes_every_birth_again(
        tmp_path: Path, group: str, plc_link: TcpProxy, broker_link: TcpProxy,
        subscriber: Subscriber) -> None:
    path = bridge_config(tmp_path, group, plc_link.port, broker_link.port)
    async with BridgeRun(path) as bridge:
        _, first = await subscriber.next("NBIRTH")
        at, _ = await subscriber.next("DBIRTH", "boiler")
        await subscriber.command("NCMD", rebirth())
        again_at, again = await subscriber.next("NBIRTH", after=at + 1)
        assert again.payload.seq == 0
        assert again.metrics()[BD_SEQ].long_value == first.metrics()[BD_SEQ].long_value
        await subscriber.next("DBIRTH", "boiler", after=again_at)
        assert sink_status(bridge).counters["rebirths"] == 1
    assert_seq_runs_on(subscriber.received)


async def test_malformed_commands_are_counted_and_ignored(
        tmp_path: Path, group: str, plc_link: TcpProxy, broker_link: TcpProxy,
        subscriber: Subscriber) -> None:
    path = bridge_config(tmp_path, group, plc_link.port, broker_link.port, commands=True)
    async with BridgeRun(path) as bridge:
        at, _ = await subscriber.next("DBIRTH", "boiler")
        await subscriber.command("NCMD", b"\x08\xff\xff not protobuf")
        await subscriber.command("DCMD", b"\xff\xff\xff", device="boiler")
        await subscriber.command("DCMD", command(Payload.Metric(name=SETPOINT, long_value=1)),
                                 device="kettle")
        await subscriber.command("NCMD", command(Payload.Metric(name="Node Control/Reboot",
                                                                boolean_value=True)))
        status = sink_status(bridge)
        await wait_until(lambda: status.counters["commands_rejected"] == 4,
                         what="four rejected commands")
        assert "unknown node metric" in status.details["last_command_rejection"]["reason"]
        # Still the same session: a rebirth works and nothing died.
        await subscriber.command("NCMD", rebirth())
        await subscriber.next("NBIRTH", after=at)
        assert all(message.type != "NDEATH" for message in subscriber.received)
        assert status.counters["writes"] == 0


async def test_ndeath_is_the_will_when_the_connection_dies(
        tmp_path: Path, group: str, plc_link: TcpProxy, broker_link: TcpProxy,
        subscriber: Subscriber) -> None:
    path = bridge_config(tmp_path, group, plc_link.port, broker_link.port)
    async with BridgeRun(path):
        at, nbirth = await subscriber.next("NBIRTH")
        bd_seq = nbirth.metrics()[BD_SEQ].long_value
        await subscriber.next("DBIRTH", "boiler")
        broker_link.cut()  # no DISCONNECT: the broker publishes the will
        died, will = await subscriber.next("NDEATH", after=at)
        assert will.metrics()[BD_SEQ].long_value == bd_seq
        # The sink reconnects: a new session with the next bdSeq, born again.
        reborn_at, reborn = await subscriber.next("NBIRTH", after=died)
        assert reborn.metrics()[BD_SEQ].long_value == (bd_seq + 1) % 256
        await subscriber.next("DBIRTH", "boiler", after=reborn_at)
    assert_seq_runs_on(subscriber.received)


async def test_dcmd_writes_a_writable_point_on_the_device_and_audits_it(
        tmp_path: Path, group: str, plc: ModbusTestServer, plc_link: TcpProxy,
        broker_link: TcpProxy, subscriber: Subscriber,
        caplog: pytest.LogCaptureFixture) -> None:
    path = bridge_config(tmp_path, group, plc_link.port, broker_link.port, commands=True)
    caplog.set_level(logging.INFO, logger="bridge.audit")
    async with BridgeRun(path) as bridge:
        _, dbirth = await subscriber.next("DBIRTH", "boiler")
        alias = dbirth.metrics()[SETPOINT].alias
        await subscriber.command("DCMD", command(
            Payload.Metric(alias=alias, datatype=DataType.Int64, long_value=55)),
            device="boiler")
        status = sink_status(bridge)
        await wait_until(lambda: status.counters["writes"] == 1, what="the write")
        assert await plc.holding(1, 0) == [55]
        # A point that is not writable is refused, and the device keeps its value.
        await subscriber.command("DCMD", command(
            Payload.Metric(name=TEMP, datatype=DataType.Double, double_value=99.0)),
            device="boiler")
        await wait_until(lambda: status.counters["commands_refused"] == 1,
                         what="the refusal")
    audit = [record.getMessage() for record in caplog.records if record.name == "bridge.audit"]
    assert audit == [
        "write: Sparkplug sink scada (DCMD to device boiler), point boiler.setpoint, value 55",
        "write refused: Sparkplug sink scada (DCMD to device boiler), point boiler.temp, "
        "value 99.0: the point is not writable",
    ]


async def test_dcmd_is_refused_and_counted_without_commands(
        tmp_path: Path, group: str, plc: ModbusTestServer, plc_link: TcpProxy,
        broker_link: TcpProxy, subscriber: Subscriber,
        caplog: pytest.LogCaptureFixture) -> None:
    path = bridge_config(tmp_path, group, plc_link.port, broker_link.port)
    caplog.set_level(logging.INFO, logger="bridge.audit")
    async with BridgeRun(path) as bridge:
        await subscriber.next("DBIRTH", "boiler")
        await subscriber.command("DCMD", command(Payload.Metric(name=SETPOINT, long_value=60)),
                                 device="boiler")
        status = sink_status(bridge)
        await wait_until(lambda: status.counters["commands_refused"] == 1,
                         what="the refusal")
        assert status.counters["writes"] == 0
    assert await plc.holding(1, 0) == [40]
    [audit] = [record.getMessage() for record in caplog.records
               if record.name == "bridge.audit"]
    assert audit.startswith("write refused: Sparkplug sink scada (DCMD to device boiler), "
                            "point boiler.setpoint, value 60: commands are off")


def test_the_example_validates() -> None:
    config = load_config(EXAMPLE)
    [sink] = config.sinks
    assert isinstance(sink, MqttSinkConfig)
    assert (sink.format, sink.group_id, sink.edge_node_id, sink.commands) == (
        "sparkplug_b", "plant", "edge-01", True)
    writable = {point_id for point_id, point in config.point_index().items()
                if point.spec.writable}
    assert writable == {"boiler.setpoint", "boiler.pump_command"}


async def test_the_sinks_point_filter_chooses_the_metrics(
        tmp_path: Path, group: str, plc: ModbusTestServer, plc_link: TcpProxy,
        broker_link: TcpProxy, subscriber: Subscriber) -> None:
    path = bridge_config(tmp_path, group, plc_link.port, broker_link.port, commands=True,
                         points=["boiler.temp"])
    async with BridgeRun(path) as bridge:
        _, dbirth = await subscriber.next("DBIRTH", "boiler")
        assert set(dbirth.metrics()) == {TEMP}
        # A point the sink does not take is no metric: a DCMD for it is rejected.
        await subscriber.command("DCMD", command(Payload.Metric(name=SETPOINT, long_value=60)),
                                 device="boiler")
        status = sink_status(bridge)
        await wait_until(lambda: status.counters["commands_rejected"] == 1, what="the rejection")
        assert status.counters["writes"] == 0
    assert await plc.holding(1, 0) == [40]


def lab_config(tmp_path: Path, group: str, broker_port: int = MQTT_PORT, **sink: Any) -> Path:
    """A bridge whose only source, ``lab``, reads untyped JSON values from Mosquitto (under
    ``<group>/lab/``), and the Sparkplug sink ``scada``."""
    lab = {"id": "lab", "protocol": "mqtt", "host": MQTT_HOST, "port": MQTT_PORT,
           "clean_session": True,
           "points": [{"name": f"lab.{name}", "topic": f"{group}/lab/{name}", "path": "v"}
                      for name in ("level", "total", "offset")]}
    return write_sink_config(tmp_path, {
        "id": "scada", "protocol": "mqtt", "format": "sparkplug_b", "host": MQTT_HOST,
        "port": broker_port, "group_id": group, "edge_node_id": EDGE, **sink},
        sources=[lab])


async def lab_value(group: str, name: str, document: str) -> None:
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-lab-")) as client:
        await client.publish(f"{group}/lab/{name}", document.encode(), qos=1)


async def test_a_bad_point_is_born_null_with_its_quality_and_64_bit_integers_stay_exact(
        tmp_path: Path, group: str, subscriber: Subscriber) -> None:
    async with BridgeRun(lab_config(tmp_path, group)) as bridge:
        await wait_until(lambda: bridge.runtime.sources["lab"].status.state.value == "up",
                         what="the lab source up")
        # The first reading of lab.level finds no value: the point is bad from the start.
        await lab_value(group, "level", '{"other": 1}')
        at, dbirth = await subscriber.next("DBIRTH", "lab")
        metrics = dbirth.metrics()
        assert set(metrics) == {"lab.level", "lab.total", "lab.offset"}
        level = metrics["lab.level"]
        assert (level.is_null, properties(level)) == (True, {"Quality": 0})
        assert metrics["lab.total"].is_null

        # Values no Double holds exactly: born again as UInt64 and Int64, every digit kept.
        await lab_value(group, "total", '{"v": 18446744073709551615}')
        at, reborn = await subscriber.next("DBIRTH", "lab", after=at + 1)
        total = reborn.metrics()["lab.total"]
        assert (total.datatype, total.long_value) == (DataType.UInt64, (1 << 64) - 1)
        await lab_value(group, "offset", '{"v": -9223372036854775807}')
        at, reborn = await subscriber.next("DBIRTH", "lab", after=at + 1)
        offset = reborn.metrics()["lab.offset"]
        assert offset.datatype == DataType.Int64
        assert offset.long_value - (1 << 64) == -(1 << 63) + 1  # two's complement
        await lab_value(group, "total", '{"v": 18446744073709551614}')
        _, data = await subscriber.next("DDATA", "lab", after=at + 1)
        [change] = data.payload.metrics
        assert (change.alias, change.long_value) == (total.alias, (1 << 64) - 2)
    assert_seq_runs_on(subscriber.received)


def bd_seq_of(message: Any) -> int:
    return int(message.metrics()[BD_SEQ].long_value)


# --- bdSeq ------------------------------------------------------------------------------


async def test_bdseq_goes_on_from_the_last_session_after_a_restart(
        tmp_path: Path, group: str, plc_link: TcpProxy, subscriber: Subscriber) -> None:
    path = bridge_config(tmp_path, group, plc_link.port, MQTT_PORT)
    async with BridgeRun(path):
        _, first = await subscriber.next("NBIRTH")
    died, death = await subscriber.next("NDEATH")
    assert bd_seq_of(death) == bd_seq_of(first) == 0
    async with BridgeRun(path):
        _, second = await subscriber.next("NBIRTH", after=died)
    assert bd_seq_of(second) == 1
    saved = json.loads((tmp_path / "state" / "sparkplug" / "scada.json").read_text())
    assert saved == {"group_id": group, "edge_node_id": "edge-01", "bd_seq": 1}


async def test_a_refused_connect_does_not_use_up_a_bdseq(
        tmp_path: Path, group: str, plc_link: TcpProxy, broker_link: TcpProxy,
        subscriber: Subscriber) -> None:
    broker_link.pause()  # the broker is down: every connect is closed at once
    path = bridge_config(tmp_path, group, plc_link.port, broker_link.port, timeout="500ms")
    async with BridgeRun(path):
        await wait_until(lambda: broker_link.connections >= 3, 20, what="three refused connects")
        broker_link.resume()
        _, nbirth = await subscriber.next("NBIRTH")
        assert bd_seq_of(nbirth) == 0
        broker_link.cut()  # the will reached the broker: the next session takes the next one
        died, will = await subscriber.next("NDEATH")
        assert bd_seq_of(will) == 0
        _, reborn = await subscriber.next("NBIRTH", after=died)
        assert bd_seq_of(reborn) == 1


async def test_bdseq_goes_on_after_kill_9(tmp_path: Path, group: str, plc_link: TcpProxy,
                                          subscriber: Subscriber) -> None:
    path = bridge_config(tmp_path, group, plc_link.port, MQTT_PORT)
    document = yaml.safe_load(path.read_text())
    document["api"] = {"host": "127.0.0.1", "port": 0}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    async with running_daemon(path) as daemon:
        _, first = await subscriber.next("NBIRTH")
        daemon.process.kill()
        await daemon.process.wait()
    died, will = await subscriber.next("NDEATH")  # the broker's: the old session's will
    assert bd_seq_of(will) == bd_seq_of(first) == 0
    async with running_daemon(path):
        _, second = await subscriber.next("NBIRTH", after=died)
    assert bd_seq_of(second) == 1


def test_the_bdseq_file_belongs_to_its_edge_node(tmp_path: Path) -> None:
    path = tmp_path / "sparkplug" / "scada.json"
    BdSeqFile(path, "plant", "edge-01").save(7)
    assert BdSeqFile(path, "plant", "edge-01").load() == 7
    assert BdSeqFile(path, "plant", "edge-02").load() is None
    path.write_text("{not json")
    assert BdSeqFile(path, "plant", "edge-01").load() is None
    assert not path.with_name("scada.json.tmp").exists()


# --- the primary host's STATE -------------------------------------------------------------


async def publish_state(host: str, online: bool, timestamp: int) -> None:
    """The host application's STATE, retained as Sparkplug 3.0 has it."""
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-host-")) as client:
        payload = json.dumps({"online": online, "timestamp": timestamp}).encode()
        await client.publish(f"spBv1.0/STATE/{host}", payload, qos=1, retain=True)


async def clear_state(host: str) -> None:
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-host-")) as client:
        await client.publish(f"spBv1.0/STATE/{host}", b"", qos=1, retain=True)


async def test_data_waits_in_the_outbox_while_the_primary_host_is_offline(
        tmp_path: Path, group: str, plc: ModbusTestServer, plc_link: TcpProxy,
        subscriber: Subscriber) -> None:
    host = unique("scada-")
    path = bridge_config(tmp_path, group, plc_link.port, MQTT_PORT, primary_host=host)
    try:
        async with BridgeRun(path) as bridge:
            status = sink_status(bridge)
            # No STATE yet: the edge node is connected but not born, the events wait.
            await wait_until(lambda: bridge.depth("scada") > 0, what="events in the outbox")
            await wait_until(lambda: "waiting for the primary host" in str(status.last_error),
                             what="the sink waiting for the host")
            assert subscriber.received == []
            await publish_state(host, True, 1000)
            _, nbirth = await subscriber.next("NBIRTH")
            await subscriber.next("DBIRTH", "boiler")
            await wait_until(lambda: bridge.depth("scada") == 0, what="an empty outbox")

            await publish_state(host, False, 2000)  # the host goes away
            died, death = await subscriber.next("NDEATH")
            assert bd_seq_of(death) == bd_seq_of(nbirth)
            await plc.set_registers(1, 0, [47])  # a change while nobody listens
            await wait_until(lambda: bridge.depth("scada") > 0, what="the change buffered")
            assert all(message.type == "NDEATH" for message in subscriber.received[died:])

            await publish_state(host, True, 3000)  # back: born again, then the buffered data
            reborn_at, reborn = await subscriber.next("NBIRTH", after=died)
            assert bd_seq_of(reborn) == bd_seq_of(nbirth) + 1
            at, _ = await subscriber.next("DBIRTH", "boiler", after=reborn_at)
            _, data = await subscriber.next("DDATA", "boiler", after=at)
            assert 47 in [metric.long_value for metric in data.payload.metrics]
            await wait_until(lambda: bridge.depth("scada") == 0, what="an empty outbox")
            assert bridge.sink("scada").sink.details()["sparkplug"]["primary_host"][
                "online"] is True
    finally:
        await clear_state(host)
    assert_seq_runs_on(subscriber.received)


def test_an_older_state_is_ignored_and_a_malformed_one_refused() -> None:
    host = PrimaryHost("scada")
    assert host.topic == "spBv1.0/STATE/scada"
    assert host.take(parse_state(b'{"online": true, "timestamp": 5}'))
    assert not host.take(HostState(False, 4))
    assert host.online.is_set()
    for payload in (b"ONLINE", b"[]", b'{"online": "yes", "timestamp": 1}',
                    b'{"online": true}'):
        with pytest.raises(ValueError, match="STATE"):
            parse_state(payload)


# --- rebirths and commands ---------------------------------------------------------------


async def test_a_burst_of_rebirth_requests_gives_few_births(
        tmp_path: Path, group: str, plc_link: TcpProxy, subscriber: Subscriber) -> None:
    path = bridge_config(tmp_path, group, plc_link.port, MQTT_PORT, rebirth_interval="1s")
    async with BridgeRun(path) as bridge:
        at, _ = await subscriber.next("DBIRTH", "boiler")
        started = time.monotonic()
        for _ in range(100):
            await subscriber.command("NCMD", rebirth())
        status = sink_status(bridge)
        await wait_until(lambda: status.counters["rebirth_requests"] == 100,
                         what="100 rebirth requests")
        elapsed = time.monotonic() - started
        # One at once, the rest folded into one a second later (more only on a machine so
        # slow the burst itself took longer than the interval).
        await wait_until(lambda: status.counters["rebirths"] >= 2, what="the folded rebirth")

        def births(kind: str) -> int:
            return [message.type for message in subscriber.received[at + 1:]].count(kind)

        await wait_until(lambda: births("NBIRTH") == births("DBIRTH") == status.counters[
            "rebirths"], what="every rebirth received")
        bound = 2 + int(elapsed)
        assert status.counters["rebirths"] <= bound
        assert status.counters["rebirths_folded"] >= 100 - bound
    assert_seq_runs_on(subscriber.received)


async def test_a_device_that_does_not_answer_holds_up_no_other_command(
        tmp_path: Path, group: str, plc: ModbusTestServer, plc_link: TcpProxy,
        subscriber: Subscriber, caplog: pytest.LogCaptureFixture) -> None:
    path = bridge_config(tmp_path, group, plc_link.port, MQTT_PORT, commands=True)
    caplog.set_level(logging.INFO, logger="bridge.audit")
    async with BridgeRun(path) as bridge:
        at, _ = await subscriber.next("DBIRTH", "boiler")
        source = bridge.runtime.sources["plant"].unit.source
        write = source.write
        asked, answer = asyncio.Event(), asyncio.Event()

        async def hanging_write(point_id: str, value: Value) -> None:
            if value == 1:
                asked.set()
                await answer.wait()  # the device does not answer this one yet
            await write(point_id, value)

        source.write = hanging_write  # type: ignore[method-assign]
        status = sink_status(bridge)
        await subscriber.command("DCMD", command(
            Payload.Metric(name=SETPOINT, datatype=DataType.Int64, long_value=1)),
            device="boiler")
        async with asyncio.timeout(10):
            await asked.wait()
        # A rebirth is not held up by the write waiting for its device.
        await subscriber.command("NCMD", rebirth())
        await subscriber.next("NBIRTH", after=at + 1)
        assert status.counters["writes"] == 0
        # A later DCMD of the same device waits for the first (in order); then one command
        # of three metrics is one audit record.
        await subscriber.command("DCMD", command(
            Payload.Metric(name=SETPOINT, datatype=DataType.Int64, long_value=2),
            Payload.Metric(name=SETPOINT, datatype=DataType.Int64, long_value=3),
            Payload.Metric(name=TEMP, datatype=DataType.Double, double_value=9.5)),
            device="boiler")
        answer.set()
        await wait_until(lambda: status.counters["writes"] == 3, what="three writes")
        await wait_until(lambda: status.counters["commands_refused"] == 1, what="the refusal")
        assert await plc.holding(1, 0) == [3]
    audit = [record.getMessage() for record in caplog.records if record.name == "bridge.audit"]
    assert audit == [
        "write: Sparkplug sink scada (DCMD to device boiler), point boiler.setpoint, value 1",
        "write command: Sparkplug sink scada (DCMD to device boiler), 3 points, 2 written, "
        "1 not; point boiler.setpoint, value 2: written; point boiler.setpoint, value 3: "
        "written; point boiler.temp, value 9.5: refused: the point is not writable",
    ]


async def test_a_connection_lost_while_waiting_for_the_primary_host_is_made_again(
        tmp_path: Path, group: str, plc_link: TcpProxy, broker_link: TcpProxy,
        subscriber: Subscriber) -> None:
    host = unique("scada-")
    path = bridge_config(tmp_path, group, plc_link.port, broker_link.port, primary_host=host)
    try:
        async with BridgeRun(path) as bridge:
            status = sink_status(bridge)
            await wait_until(lambda: "waiting for the primary host" in str(status.last_error),
                             what="the sink waiting for the host")
            broker_link.cut()
            await wait_until(lambda: broker_link.connections >= 2, what="a new connection")
            await publish_state(host, True, 1000)
            _, nbirth = await subscriber.next("NBIRTH")
            await subscriber.next("DBIRTH", "boiler")
            # The first connection's will (bdSeq 0) was published when it was cut.
            assert bd_seq_of(nbirth) == 1
    finally:
        await clear_state(host)
