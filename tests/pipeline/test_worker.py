"""Sources and sinks in worker processes: real child processes, against Mosquitto, RabbitMQ
and the plant simulator, with the daemon's store, router and outbox as usual."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pickle
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest
import yaml
from helpers.brokers import (
    MQTT_HOST,
    MQTT_PORT,
    BridgeRun,
    RabbitAdmin,
    require_broker,
    unique,
    wait_until,
)
from helpers.sinks import SINK, bodies, feed, make_event, write_bridge_config
from helpers.workers import WITHIN, assert_gone, sink_worker_up

from bridge.core.counters import READINGS
from bridge.core.model import Quality, Reading
from bridge.core.sink import OutboxRow
from bridge.core.status import ConnectionState, EndpointStatus, StatusSnapshot
from bridge.demo.run import PORT_VARIABLE, load_demo_config
from bridge.demo.simulator import PlantSimulator
from bridge.errors import ConfigError, ConnectorError, ErrorCategory
from bridge.pipeline.delivery import DeliveryFigures
from bridge.pipeline.worker import SinkWorker, WorkerSource
from bridge.pipeline.worker.frames import (
    SINK_ANSWERS,
    SINK_REQUESTS,
    SOURCE_ORDERS,
    SOURCE_REPORTS,
    STARTS,
    Arrivals,
    CallFailed,
    Confirmed,
    ConfirmRows,
    Events,
    ReadDone,
    ReadPoint,
    ReadRows,
    Rows,
    Start,
    Status,
    Stored,
    WorkerFrame,
    WriteDone,
    WritePoint,
    encode,
    read_frame,
    read_frames,
)
from bridge.registry import load_config
from bridge.runtime import Runtime


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test uses."""
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    return unique("fbworker/")


@pytest.fixture
async def publisher(prefix: str) -> AsyncIterator[aiomqtt.Client]:
    """A separate client that publishes test messages."""
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-pub-")) as client:
        yield client


def write_bridge(tmp_path: Path, source: dict[str, Any]) -> Path:
    """A one-source configuration with its store under ``tmp_path``."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "sources": [source]}, sort_keys=False), encoding="utf-8")
    return path


def mqtt_source(prefix: str, **options: Any) -> dict[str, Any]:
    """Temperature messages on ``<prefix>/<device>/t``, mapped to ``<device>.temp``."""
    return {"id": "telemetry", "protocol": "mqtt", "host": MQTT_HOST, "port": MQTT_PORT,
            "clean_session": True, "qos": 1, "report": {"mode": "always"},
            "points": [{"name": "{device}.temp", "topic": f"{prefix}/{{device}}/t",
                        "path": "t"}], **options}


def workers_of(status: EndpointStatus) -> list[dict[str, Any]]:
    """The per-worker entries of a source's inventory."""
    entries = status.details.get("workers", [])
    assert isinstance(entries, list)
    return entries


async def workers_up(status: EndpointStatus, count: int) -> None:
    """Wait until ``count`` workers report their connection up."""
    await wait_until(lambda: status.state is ConnectionState.UP
                     and len(workers_of(status)) == count, WITHIN,
                     f"{count} workers up (state {status.state}, {status.last_error})")


@pytest.mark.broker
async def test_shared_subscription_spreads_messages_over_workers_each_stored_once(
    tmp_path: Path, prefix: str, publisher: aiomqtt.Client
) -> None:
    config = write_bridge(tmp_path, mqtt_source(prefix, workers=2))
    async with BridgeRun(config) as run:
        status = run.runtime.sources["telemetry"].status
        await workers_up(status, 2)
        pids = [entry["pid"] for entry in workers_of(status)]
        for index in range(400):
            await publisher.publish(f"{prefix}/dev{index % 20}/t",
                                    json.dumps({"t": index}), qos=1)
        router = run.runtime.router
        await wait_until(lambda: router.counters["events"] >= 400, WITHIN, "400 events stored")
        await wait_until(lambda: sum(entry["readings"] for entry in workers_of(status)) == 400,
                         WITHIN, "both workers' counts reported")
        entries = workers_of(status)
        store = run.runtime.store
        stored = sorted(event.value for device in range(20)
                        for event in store.history(f"dev{device}.temp", limit=100))
        assert router.counters["events"] == 400
        assert status.counters["readings"] == 400
        assert status.counters["events"] == 400
    assert stored == list(range(400)), "every message stored exactly once"
    assert all(entry["readings"] > 0 for entry in entries), entries
    assert {event["protocol"] for event in (store_event.to_dict() for store_event in
                                            run.runtime.router.latest.values())} == {"mqtt"}
    assert_gone(pids)


@pytest.mark.broker
async def test_a_killed_worker_is_started_again_and_the_others_keep_serving(
    tmp_path: Path, prefix: str, publisher: aiomqtt.Client
) -> None:
    config = write_bridge(tmp_path, mqtt_source(prefix, workers=1))
    async with BridgeRun(config) as run:
        running = run.runtime.sources["telemetry"]
        status = running.status
        await workers_up(status, 1)
        (first,) = workers_of(status)
        os.kill(first["pid"], signal.SIGKILL)
        await wait_until(lambda: status.counters["reconnects"] >= 1, WITHIN, "restart counted")
        assert "exited with status -9" in (status.last_error or "")
        await workers_up(status, 1)
        (second,) = workers_of(status)
        assert second["pid"] != first["pid"]
        await publisher.publish(f"{prefix}/boiler/t", json.dumps({"t": 7}), qos=1)
        router = run.runtime.router
        await wait_until(lambda: "boiler.temp" in router.latest, WITHIN, "event after restart")
        assert router.latest["boiler.temp"].value == 7
    assert_gone([first["pid"], second["pid"]])


@pytest.mark.broker
async def test_a_malformed_payload_is_counted_in_the_daemons_inventory(
    tmp_path: Path, prefix: str, publisher: aiomqtt.Client
) -> None:
    config = write_bridge(tmp_path, mqtt_source(prefix, workers=1))
    async with BridgeRun(config) as run:
        status = run.runtime.sources["telemetry"].status
        await workers_up(status, 1)
        await publisher.publish(f"{prefix}/boiler/t", b"{not json", qos=1)
        await publisher.publish(f"{prefix}/boiler/t", json.dumps({"t": 3}), qos=1)
        router = run.runtime.router
        await wait_until(lambda: "boiler.temp" in router.latest, WITHIN, "the good message")
        await wait_until(lambda: status.counters["rejected"] == 1, WITHIN, "rejection reported")
        entry = run.runtime.inventory()[0]
    assert entry["state"] == "up"
    assert entry["counters"]["readings"] == 2
    assert "last_rejection" in entry["details"]
    assert entry["details"]["workers"][0]["readings"] == 2


def test_more_than_one_worker_needs_a_broker_that_shares_messages(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "bridge: {id: edge}\n"
        "sources:\n"
        "  - id: plc\n"
        "    protocol: modbus\n"
        "    host: 127.0.0.1\n"
        "    workers: 2\n"
        "    devices:\n"
        "      - id: meter\n"
        "        points: [{name: power, address: 40001, type: int16}]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    (issue,) = raised.value.issues
    assert (issue.line, issue.path) == (6, "sources[0].workers")
    assert "at most one worker process" in issue.message


async def test_a_modbus_source_in_a_worker_polls_reads_and_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PlantSimulator(port=0, seed=3, interval=0.2) as simulator:
        monkeypatch.setenv(PORT_VARIABLE, str(simulator.port))
        demo = load_demo_config(state_dir=tmp_path / "state", api_port=0)
        sources = [source.model_copy(update={"workers": 1}) if source.enabled else source
                   for source in demo.sources]
        config = dataclasses.replace(demo, sources=sources)
        runtime = Runtime(config)
        running = next(each for each in runtime.sources.values() if each.enabled)
        assert isinstance(running.unit.source, WorkerSource)
        task = asyncio.create_task(runtime.run(), name="test.runtime")
        try:
            status = running.status
            await workers_up(status, 1)
            await wait_until(lambda: "boiler.supply_temp" in runtime.router.latest, WITHIN,
                             "a polled value")
            assert status.children["boiler"].state is ConnectionState.UP
            await running.unit.source.write("boiler.setpoint", 61.5)
            (reading,) = await running.unit.source.read("boiler.setpoint")
            assert running.unit.mapper.map(reading)[0].value == 61.5
            pid = workers_of(status)[0]["pid"]
        finally:
            runtime.stop()
            await task
    assert_gone([pid])


# --- a sink in a worker process ------------------------------------------------------------


@pytest.mark.broker
async def test_a_sink_worker_delivers_the_outbox_in_order_and_reports_its_figures(
    tmp_path: Path, rabbit: RabbitAdmin
) -> None:
    queue = unique("fbtest.worker.")
    config = write_bridge_config(tmp_path, rabbit, {"workers": 1, "topology": {
        "queues": [{"name": queue}]}})
    events = [make_event("plant", f"boiler.t{index % 7}", float(index)) for index in range(600)]
    async with BridgeRun(config) as bridge:
        pid = await sink_worker_up(bridge, SINK)
        await feed(bridge, events)
        await bridge.delivered(SINK, len(events), within=WITHIN)
        # The engine's figures, measured in the worker process, reach the daemon's inventory
        # and metrics.
        delivery = bridge.sink(SINK).delivery
        await wait_until(lambda: delivery.confirm_latency is not None, WITHIN,
                         "the worker's confirm latency")
        entry = bridge.runtime.sink_entry(SINK)
    received = rabbit.drain(queue, len(events))
    assert [delivery.message_id for delivery in received] == [event.id for event in events]
    assert bodies(received) == [event.to_dict() for event in events]
    assert entry["counters"]["confirmed"] == len(events)
    assert entry["outbox"]["events"] == 0
    assert entry["details"]["worker_pid"] == pid
    assert entry["details"]["window"] == 1000
    assert entry["details"]["confirm_latency_ms"] is not None
    assert entry["details"]["in_flight"] == 0
    assert pid is not None
    assert_gone([pid])


@pytest.mark.broker
async def test_a_killed_sink_worker_loses_nothing(tmp_path: Path, rabbit: RabbitAdmin) -> None:
    queue = unique("fbtest.worker.")
    config = write_bridge_config(tmp_path, rabbit, {"workers": 1, "topology": {
        "queues": [{"name": queue}]}})
    first = [make_event("plant", "boiler.a", float(index)) for index in range(300)]
    second = [make_event("plant", "boiler.b", float(index)) for index in range(300)]
    async with BridgeRun(config) as bridge:
        running = bridge.sink(SINK)
        status = running.status
        await wait_until(lambda: status.state is ConnectionState.UP, WITHIN, "the sink up")
        await feed(bridge, first)
        await bridge.delivered(SINK, len(first), within=WITHIN)
        assert isinstance(running.delivery, SinkWorker)
        assert running.delivery.pid is not None
        killed = running.delivery.pid
        os.kill(killed, signal.SIGKILL)
        # Stored while no worker runs: kept in the outbox for the next one.
        await feed(bridge, second)
        # Stored first: an outbox that is empty only because the router has not stored the
        # second batch yet is not drained.
        await wait_until(lambda: bridge.runtime.router.pending == 0, WITHIN, "the batch stored")
        await wait_until(lambda: status.counters["reconnects"] >= 1, WITHIN, "the restart")
        await wait_until(lambda: bridge.depth(SINK) == 0, WITHIN, "the outbox drained")
    received = rabbit.drain(queue, len(first) + len(second))
    ids = [delivery.message_id for delivery in received]
    assert set(ids) == {event.id for event in first + second}
    assert ids[-len(second):] == [event.id for event in second]
    assert_gone([killed])


@pytest.mark.broker
async def test_a_reload_that_changes_a_worker_source_replaces_its_processes(
    tmp_path: Path, prefix: str, publisher: aiomqtt.Client
) -> None:
    path = write_bridge(tmp_path, mqtt_source(prefix, workers=1))
    async with BridgeRun(path) as run:
        status = run.runtime.sources["telemetry"].status
        await workers_up(status, 1)
        (old,) = workers_of(status)
        write_bridge(tmp_path, mqtt_source(prefix, workers=2, tags={"site": "north"}))
        changes = await run.runtime.reload()
        assert changes == ["source telemetry: restarted"]
        status = run.runtime.sources["telemetry"].status
        await workers_up(status, 2)
        assert_gone([old["pid"]])
        await publisher.publish(f"{prefix}/boiler/t", json.dumps({"t": 5}), qos=1)
        router = run.runtime.router
        await wait_until(lambda: "boiler.temp" in router.latest, WITHIN, "an event after reload")
        assert router.latest["boiler.temp"].tags == {"site": "north"}
        pids = [entry["pid"] for entry in workers_of(status)]
    assert_gone(pids)


def test_a_share_group_is_one_topic_level(tmp_path: Path) -> None:
    path = write_bridge(tmp_path, {**mqtt_source("plant", share_group="a/b")})
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    (issue,) = raised.value.issues
    assert issue.path == "sources[0].share_group"
    assert issue.line is not None


# --- the frames ------------------------------------------------------------------------------


def stream(*frames: WorkerFrame, tail: bytes = b"") -> asyncio.StreamReader:
    """A reader holding ``frames`` (and ``tail``), then the end of the stream."""
    reader = asyncio.StreamReader()
    for frame in frames:
        reader.feed_data(bytes(encode(frame)))
    reader.feed_data(tail)
    reader.feed_eof()
    return reader


async def test_every_frame_arrives_as_the_typed_frame_that_was_sent() -> None:
    event = make_event("plant", "boiler.t", 64.8, reason=None, quality=Quality.UNCERTAIN)
    carried = msgspec.structs.replace(event, body=event.to_json())
    readings = [Reading("plant", ("holding", 0, 2), [1, 2], 1.5, quality=Quality.GOOD)]
    row = OutboxRow(7, event.id, "plant", "boiler.t", "good", 1.0, 2.0, "plant.boiler%2Et",
                    10, event.to_json())
    directions: list[tuple[msgspec.msgpack.Decoder[Any], list[WorkerFrame]]] = [
        (SOURCE_REPORTS, [
            Events(3, [carried]), Events(0, []),
            Status(StatusSnapshot(state=ConnectionState.UP, since=1.0,
                                  counters={"readings": 2}, details={"a": [1]})),
            ReadDone(1, pickle.dumps(readings)), WriteDone(2),
            CallFailed(4, "boiler.setpoint", "refused", ErrorCategory.DEVICE)]),
        (SOURCE_ORDERS, [Stored(3), ReadPoint(1, "boiler.t"), WritePoint(2, "boiler.sp", 61.5),
                          WritePoint(5, "boiler.mode", "auto"), WritePoint(6, "b.on", True)]),
        (SINK_REQUESTS, [ReadRows(1, 0, 500), ConfirmRows(2, [7, 8]),
                          Status(StatusSnapshot(state=ConnectionState.UP, since=1.0),
                                 DeliveryFigures(12.5, 0.004, 3), {"window": 1000})]),
        (SINK_ANSWERS, [Rows(1, [row]), Confirmed(2, 2), Arrivals(9)]),
        (STARTS, [Start(b"spec")]),
    ]
    for decoder, sent in directions:
        received = [frame async for frame in read_frames(stream(*sent), decoder, "peer")]
        assert received == sent
        assert [type(frame) for frame in received] == [type(frame) for frame in sent]
    (events_frame, *_) = [frame async for frame in read_frames(stream(Events(3, [carried])),
                                                           SOURCE_REPORTS, "peer")]
    assert isinstance(events_frame, Events)
    (decoded,) = events_frame.events
    assert decoded == event
    assert decoded.body == carried.body == decoded.to_json()
    assert decoded.quality is Quality.UNCERTAIN
    (reading,) = pickle.loads(ReadDone(1, pickle.dumps(readings)).readings)
    assert reading.address == ("holding", 0, 2)


async def test_a_status_travels_typed_with_its_devices_and_errors() -> None:
    worker = EndpointStatus(name="plant", kind="source", protocol="modbus", endpoint="x")
    worker.child("boiler").down("timed out", ErrorCategory.DEVICE)
    worker.degraded("a device is down", ErrorCategory.DEVICE)
    worker.counters.add(READINGS, 5)
    (frame,) = [frame async for frame in read_frames(stream(Status(worker.snapshot())),
                                                     SOURCE_REPORTS, "peer")]
    assert isinstance(frame, Status)
    snapshot = frame.status
    assert snapshot.state is ConnectionState.DEGRADED
    assert snapshot.error_category is ErrorCategory.DEVICE
    assert snapshot.counters == {"readings": 5, "errors": 1}
    assert snapshot.children["boiler"].state is ConnectionState.DOWN
    assert snapshot.children["boiler"].last_error == "timed out"
    daemon = EndpointStatus(name="plant", kind="source", protocol="modbus", endpoint="x")
    daemon.mirror(snapshot)
    assert daemon.to_dict() == worker.to_dict()


async def test_a_status_whose_state_is_unknown_is_a_protocol_error() -> None:
    data = bytearray(encode(Status(StatusSnapshot(state=ConnectionState.UP, since=1.0))))
    data = data.replace(b"\xa2up", b"\xa2no")
    with pytest.raises(ConnectorError) as raised:
        await read_frame(stream(tail=bytes(data)), SOURCE_REPORTS, "worker process 0")
    assert raised.value.category is ErrorCategory.PROTOCOL
    assert "malformed frame" in raised.value.reason


async def test_a_frame_from_the_wrong_direction_is_a_protocol_error() -> None:
    with pytest.raises(ConnectorError) as raised:
        await read_frame(stream(Stored(1)), SOURCE_REPORTS, "worker process 0")
    assert raised.value.category is ErrorCategory.PROTOCOL
    assert "malformed frame" in raised.value.reason


async def test_frames_end_where_the_stream_ends_even_mid_frame() -> None:
    assert await read_frame(stream(), SOURCE_ORDERS, "daemon") is None
    truncated = bytes(encode(Stored(1)))[:-1]
    received = [frame async for frame in read_frames(stream(Stored(2), tail=truncated),
                                                 SOURCE_ORDERS, "daemon")]
    assert received == [Stored(2)]
