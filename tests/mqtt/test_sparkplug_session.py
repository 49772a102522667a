"""The Sparkplug B edge node's session across connections, against the local Mosquitto: ``bdSeq``
across restarts, ``kill -9`` and refused connects, the primary host's ``STATE``, paced rebirths
and commands that do not hold each other up."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
import yaml
from helpers.brokers import (
    MQTT_PORT,
    BridgeRun,
    TcpProxy,
    unique,
    wait_until,
)
from helpers.daemon import running_daemon
from helpers.modbus_servers import ModbusTestServer
from helpers.sparkplug import (
    SETPOINT,
    TEMP,
    Subscriber,
    assert_seq_runs_on,
    bd_seq_of,
    bridge_config,
    clear_state,
    command,
    publish_state,
    rebirth,
    sink_status,
)

from bridge.core.model import Value
from protocols.mqtt.sparkplug_b_pb2 import DataType, Payload
from protocols.mqtt.sparkplug_session import BdSeqFile, HostState, PrimaryHost, parse_state

pytestmark = pytest.mark.broker


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
