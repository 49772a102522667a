"""The MQTT source against the local Mosquitto: every test uses its own topic prefix."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from helpers import free_port
from helpers.brokers import (
    MQTT_HOST,
    MQTT_PORT,
    SETTLE,
    SourceRun,
    TcpProxy,
    assert_no_tasks_left,
    require_broker,
    unique,
    wait_until,
    write_config,
)

from bridge.core.model import Event, Quality
from bridge.core.status import ConnectionState
from bridge.errors import ErrorCategory
from bridge.registry import load_config
from bridge.runtime import Runtime

pytestmark = pytest.mark.broker


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test uses."""
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    return unique("fbtest/")


@pytest.fixture
async def publisher(prefix: str) -> AsyncIterator[aiomqtt.Client]:
    """A separate client that publishes test messages."""
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-pub-")) as client:
        yield client


async def forget_session(client_id: str) -> None:
    """Remove a persistent session the test created from the broker."""
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=client_id, clean_session=True):
        pass


def mqtt_source(points: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """A source configuration for the local broker."""
    return {"id": unique("mqtt-"), "protocol": "mqtt", "host": MQTT_HOST, "port": MQTT_PORT,
            "clean_session": True, "points": points, **options}


async def test_json_points_topic_segments_and_payload_time(
    tmp_path: Path, prefix: str, publisher: aiomqtt.Client
) -> None:
    source = mqtt_source([
        {"name": "{site}.{device}.temperature", "topic": f"{prefix}/{{site}}/{{device}}/tele",
         "path": "values.t", "unit": "degC", "tags": {"device": "{device}"}},
        {"name": "{site}.{device}.humidity", "topic": f"{prefix}/{{site}}/{{device}}/tele",
         "path": "values.h"},
    ], timestamp={"path": "ts", "format": "epoch_ms"}, prefix="p.")
    async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
        await run.up()
        await publisher.publish(f"{prefix}/north/boiler-1/tele", json.dumps(
            {"ts": 1718006400250, "values": {"t": 21.5, "h": 40}}), qos=1)
        first, second = await run.router.wait_events(2)
    assert (first.point, first.value, first.unit) == ("p.north.boiler-1.temperature", 21.5,
                                                      "degC")
    assert (second.point, second.value) == ("p.north.boiler-1.humidity", 40)
    assert first.tags == {"device": "boiler-1"}
    assert first.ts == pytest.approx(1718006400.25)
    assert first.quality is Quality.GOOD
    assert run.status.counters["readings"] == 1
    assert run.status.counters["events"] == 2


async def test_number_text_and_binary_payloads(
    tmp_path: Path, prefix: str, publisher: aiomqtt.Client
) -> None:
    source = mqtt_source([
        {"name": "{line}.speed", "topic": f"{prefix}/{{line}}/speed", "format": "number"},
        {"name": "{line}.state", "topic": f"{prefix}/{{line}}/state", "format": "text"},
        {"name": "{line}.pressure", "topic": f"{prefix}/{{line}}/pressure", "format": "binary",
         "type": "float32", "order": "CDAB"},
    ], qos=0)
    raw = struct.pack(">f", -3.25)
    async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
        await run.up()
        await publisher.publish(f"{prefix}/l1/speed", "42.5")
        await publisher.publish(f"{prefix}/l1/state", "RUNNING")
        await publisher.publish(f"{prefix}/l1/pressure", raw[2:] + raw[:2])
        events = await run.router.wait_events(3)
    assert sorted((event.point, event.value) for event in events) == [
        ("l1.pressure", -3.25), ("l1.speed", 42.5), ("l1.state", "RUNNING")]


async def test_malformed_payload_is_counted_and_the_subscription_goes_on(
    tmp_path: Path, prefix: str, publisher: aiomqtt.Client
) -> None:
    topic = f"{prefix}/dev/tele"
    source = mqtt_source([{"name": "v", "topic": topic, "path": "v"}])
    async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
        await run.up()
        await publisher.publish(topic, "{broken", qos=1)
        await publisher.publish(topic, b"", qos=1)
        await publisher.publish(topic, '{"v": 7}', qos=1)
        (event,) = await run.router.wait_events(1)
        await run.router.wait_for(lambda: run.status.counters["rejected"] == 2,
                                  what="two rejections")
    assert event.value == 7
    rejection = run.status.details["last_rejection"]
    assert rejection["address"] == topic
    assert f"topic {topic}: " in rejection["reason"]
    assert run.status.state is ConnectionState.UP
    # Rejected QoS 1 messages are acknowledged too: MQTT cannot dead-letter.
    assert run.router.accepted == 1


async def test_qos1_message_is_acknowledged_only_after_the_store(
    tmp_path: Path, prefix: str, publisher: aiomqtt.Client
) -> None:
    client_id = unique("fbtest-session-")
    topic = f"{prefix}/held"
    source = mqtt_source([{"name": "held", "topic": topic, "path": "v"}],
                         clean_session=False, client_id=client_id)
    path = write_config(tmp_path / "config.yaml", source)
    try:
        async with SourceRun(path, hold_acks=True) as held:
            await held.up()
            await publisher.publish(topic, '{"v": 1}', qos=1)
            await held.router.wait_events(1)
            assert len(held.router.held) == 1
        # Never stored, never acknowledged: the broker delivers it again on reconnect.
        async with SourceRun(path) as again:
            (redelivered,) = await again.router.wait_events(1)
            assert redelivered.value == 1
            assert again.router.accepted == 1
        async with SourceRun(path) as third:
            await third.up()
            await publisher.publish(topic, '{"v": 2}', qos=1)
            (event,) = await third.router.wait_events(1)
            assert event.value == 2  # the acknowledged message did not come back
    finally:
        await forget_session(client_id)


async def test_qos2_with_mqtt5_persistent_session(
    tmp_path: Path, prefix: str, publisher: aiomqtt.Client
) -> None:
    client_id = unique("fbtest-v5-")
    topic = f"{prefix}/v5"
    source = mqtt_source([{"name": "v5", "topic": topic, "format": "number"}],
                         mqtt_version=5, clean_session=False, client_id=client_id, qos=2)
    try:
        async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
            await run.up()
            await publisher.publish(topic, "12", qos=2)
            (event,) = await run.router.wait_events(1)
            assert event.value == 12
            assert run.router.accepted == 1
    finally:
        await forget_session(client_id)


async def test_reconnect_resubscribes_after_the_connection_is_cut(
    tmp_path: Path, prefix: str
) -> None:
    topic = f"{prefix}/flow"
    async with (
        aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-pub-")) as publisher,
        TcpProxy(MQTT_HOST, MQTT_PORT) as proxy,
    ):
        source = mqtt_source([{"name": "flow", "topic": topic, "format": "number"}],
                             port=proxy.port, keepalive=5)
        async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
            await run.up()
            await publisher.publish(topic, "1", qos=1)
            await run.router.wait_events(1)
            proxy.cut()
            await wait_until(lambda: run.status.counters["reconnects"] >= 1, what="reconnect")
            assert run.status.error_category is ErrorCategory.TRANSIENT
            assert run.status.last_error is not None
            await run.up()
            await publisher.publish(topic, "2", qos=1)
            await run.router.wait_for(lambda: [e.value for e in run.events][-1:] == [2],
                                      what="a message after the reconnect")
        assert proxy.connections >= 2
    await assert_no_tasks_left()


async def test_unreachable_broker_is_reported_down(tmp_path: Path) -> None:
    source = mqtt_source([{"name": "x", "topic": "x", "format": "text"}], port=free_port(),
                         timeout=2)
    async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
        await wait_until(lambda: run.status.counters["reconnects"] >= 1, what="a failure")
        assert run.status.error_category is ErrorCategory.TRANSIENT
        assert run.status.to_dict()["state"] in ("down", "connecting")
    await assert_no_tasks_left()


async def test_runtime_stores_events_before_acknowledging(
    tmp_path: Path, prefix: str, publisher: aiomqtt.Client
) -> None:
    client_id = unique("fbtest-e2e-")
    topic = f"{prefix}/e2e/{{device}}"
    source = mqtt_source([{"name": "e2e.{device}", "topic": topic, "path": "v"}],
                         clean_session=False, client_id=client_id)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"bridge": {"id": "e2e", "state_dir": str(tmp_path / "state")},
                                "api": {"enabled": False}, "sources": [source]}))
    runtime = Runtime(load_config(path))
    stored: list[Event] = []
    arrived = asyncio.Event()

    def listener(events: Any) -> None:
        stored.extend(events)
        arrived.set()

    runtime.router.add_listener(listener)
    task = asyncio.create_task(runtime.run(), name="runtime")
    try:
        (running,) = runtime.sources.values()
        await wait_until(lambda: running.status.state is ConnectionState.UP, what="source up")
        await publisher.publish(f"{prefix}/e2e/dev-1", '{"v": 5}', qos=1)
        async with asyncio.timeout(SETTLE):
            await arrived.wait()
        assert [(event.point, event.value) for event in stored] == [("e2e.dev-1", 5)]
        assert runtime.store.latest()["e2e.dev-1"].value == 5
    finally:
        runtime.stop()
        await task
        await forget_session(client_id)
