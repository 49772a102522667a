"""The Sparkplug B edge node against the local Mosquitto, with a Modbus device behind it:
births, data and deaths, commands, bad points and 64-bit integers in the births
(``test_sparkplug_session.py`` has what spans connections).

A whole bridge runs (``BridgeRun``): a pymodbus server behind a ``TcpProxy`` (so the device
can go away and come back), and the MQTT sink with ``format: sparkplug_b``, itself behind a
proxy where a test cuts its connection. A subscriber on the test's own group decodes every
message the edge node publishes. Each test has its own Sparkplug group id.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers.brokers import (
    BridgeRun,
    TcpProxy,
    wait_until,
)
from helpers.modbus_servers import ModbusTestServer
from helpers.sparkplug import (
    SETPOINT,
    TEMP,
    Subscriber,
    assert_seq_runs_on,
    bridge_config,
    command,
    lab_config,
    lab_value,
    properties,
    rebirth,
    sink_status,
)

from bridge.registry import load_config
from protocols.mqtt.sink_config import MqttSinkConfig
from protocols.mqtt.sparkplug import BD_SEQ, REBIRTH
from protocols.mqtt.sparkplug_b_pb2 import DataType, Payload

pytestmark = pytest.mark.broker

EXAMPLE = Path(__file__).resolve().parents[2] / "mappings" / "sparkplug-example.yaml"


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
