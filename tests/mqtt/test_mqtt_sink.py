"""The MQTT sink against the local Mosquitto: what a subscriber receives at each QoS and
protocol version, topics and their escaping, retained events, filters, the client id, the
outbox across an outage and a cut connection, and a sink in a worker process.

Each test publishes under a topic prefix of its own. Events are handed to the router directly;
the runtime around it (store, outbox, supervised sink) is the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import pytest_asyncio
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
from helpers.sinks import feed, make_event
from helpers.workers import WITHIN, assert_gone, sink_worker_up
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from bridge.core.model import Event
from bridge.core.sink import OutboxRow
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ConnectorError
from protocols import mqtt as mqtt_connector
from protocols.mqtt import MqttSink, MqttSinkConfig
from protocols.mqtt.sink import OutgoingMessage, _Connection

pytestmark = pytest.mark.broker

SINK = "north"


class Subscriber:
    """A client of the test's own that records every message under a topic filter."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[aiomqtt.Message] = []
        self._changed = asyncio.Event()

    async def receive(self) -> None:
        """Record messages until cancelled (run as a task)."""
        async for message in self.client.messages:
            self.messages.append(message)
            self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], what: str,
                       within: float = SETTLE, detail: Callable[[], str] | None = None) -> None:
        """Wait until ``predicate()`` holds after some message; fail after ``within`` s, saying
        what ``detail()`` says of the state then."""
        await wait_on(self._changed, predicate, within,
                      lambda: f"{what}; {len(self.messages)} messages"
                      + (f"; {detail()}" if detail is not None else ""))

    async def count(self, count: int, within: float = SETTLE) -> list[aiomqtt.Message]:
        """The first ``count`` messages, once they are there."""
        await self.wait_for(lambda: len(self.messages) >= count, f"{count} messages", within)
        return self.messages[:count]

    def ids(self) -> list[str]:
        """The event ids of the messages so far."""
        return [json.loads(message.payload)["id"] for message in self.messages]  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def subscribed(topic_filter: str, qos: int = 1) -> AsyncIterator[Subscriber]:
    """A subscriber to ``topic_filter`` on the broker itself (never through a proxy)."""
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-sub-"),
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(topic_filter, qos=qos)
        subscriber = Subscriber(client)
        task = asyncio.create_task(subscriber.receive(), name="test.subscriber")
        try:
            yield subscriber
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test uses."""
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    return unique("fbtest-sink/")


@pytest_asyncio.fixture
async def no_tasks_left() -> AsyncIterator[None]:
    """Fail a test that leaves tasks behind once its bridge has stopped."""
    yield
    await assert_no_tasks_left()


def write_bridge_config(tmp_path: Path, sink: dict[str, Any], **top: Any) -> Path:
    """A configuration with one MQTT sink on the local broker (and no sources unless given).

    The client id is the test's own: test runs sharing the broker would otherwise take the
    connection from each other (the default id is the same for every run).
    """
    return write_sink_config(tmp_path, {"id": SINK, "protocol": "mqtt", "host": MQTT_HOST,
                                        "port": MQTT_PORT, "timeout": 5,
                                        "client_id": unique("fbtest-sink-"), **sink}, **top)


def events_of(points: Sequence[str], count: int, source: str = "plant") -> list[Event]:
    """``count`` events spread over ``points`` in turn."""
    return [make_event(source, points[index % len(points)], float(index))
            for index in range(count)]


@pytest.mark.usefixtures("no_tasks_left")
@pytest.mark.parametrize("version", ["3.1.1", "5"])
@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_a_subscriber_receives_every_event_in_order_on_its_topic(
    tmp_path: Path, prefix: str, qos: int, version: str
) -> None:
    config = write_bridge_config(tmp_path, {"qos": qos, "mqtt_version": version,
                                            "topic": prefix + "/{source}/{point}"})
    # Point ids with the characters a topic level cannot hold as they are.
    points = ["boiler.supply_temp", "line/2", "a+b#c", "100%"]
    events = events_of(points, 400)
    async with subscribed(prefix + "/#", qos) as subscriber, BridgeRun(config) as bridge:
        await feed(bridge, events)
        await bridge.delivered(SINK, len(events))
        received = await subscriber.count(len(events))
        entry = bridge.runtime.sink_entry(SINK)
    assert subscriber.ids() == [event.id for event in events]
    assert [json.loads(message.payload) for message in received] == [  # type: ignore[arg-type]
        event.to_dict() for event in events]
    assert [message.topic.value for message in received[:4]] == [
        f"{prefix}/plant/boiler.supply_temp", f"{prefix}/plant/line%2F2",
        f"{prefix}/plant/a%2Bb%23c", f"{prefix}/plant/100%25"]
    assert not any(message.retain for message in received)
    if version == "5":
        properties = received[0].properties
        assert properties is not None
        assert properties.ContentType == "application/json"
        assert properties.PayloadFormatIndicator == 1
    assert entry["state"] == "up"
    assert entry["counters"]["published"] == entry["counters"]["confirmed"] == len(events)
    # At QoS 1 and 2 no more unacknowledged than the broker takes: Mosquitto says 20 under
    # MQTT 5, and drops 3.1.1 QoS 2 messages beyond its 20 without telling.
    assert entry["details"]["window"] == (1000 if qos == 0 or (qos == 1 and version == "3.1.1")
                                          else 20)


@pytest.mark.usefixtures("no_tasks_left")
async def test_retained_events_reach_a_late_subscriber(tmp_path: Path, prefix: str) -> None:
    config = write_bridge_config(tmp_path, {"retain": True, "topic": prefix + "/{point}"})
    events = events_of(["a", "b"], 6)
    try:
        async with BridgeRun(config) as bridge:
            await feed(bridge, events)
            await bridge.delivered(SINK, len(events))
        async with subscribed(prefix + "/#") as late:
            received = await late.count(2)
        assert {message.topic.value: json.loads(message.payload)["id"]  # type: ignore[arg-type]
                for message in received} == {f"{prefix}/a": events[4].id,
                                             f"{prefix}/b": events[5].id}
        assert all(message.retain for message in received)
    finally:
        async with aiomqtt.Client(MQTT_HOST, MQTT_PORT) as cleaner:
            for point in ("a", "b"):
                await cleaner.publish(f"{prefix}/{point}", b"", qos=1, retain=True)


@pytest.mark.usefixtures("no_tasks_left")
async def test_filters_and_tags_choose_events_and_topics(tmp_path: Path, prefix: str) -> None:
    plant = {"id": "plant", "protocol": "mqtt", "host": MQTT_HOST, "enabled": False,
             "points": [{"name": "t", "topic": "t", "format": "number"}]}
    config = write_bridge_config(tmp_path, {
        "points": ["boiler.*"], "sources": ["plant"],
        "topic": prefix + "/{tags.site}/{quality}/{point}/{unit}"}, sources=[plant])
    taken = [make_event("plant", "boiler.t", 1.0, tags={"site": "north/1"}),
             make_event("plant", "boiler.p", 2.0, unit=None, tags={})]
    others = [make_event("plant", "pump.t", 3.0), make_event("lab", "boiler.t", 4.0)]
    async with subscribed(prefix + "/#") as subscriber, BridgeRun(config) as bridge:
        await feed(bridge, [taken[0], *others, taken[1]])
        await bridge.delivered(SINK, len(taken))
        received = await subscriber.count(len(taken))
        entry = bridge.runtime.sink_entry(SINK)
    assert [message.topic.value for message in received] == [
        f"{prefix}/north%2F1/good/boiler.t/degC", f"{prefix}//good/boiler.p/"]
    assert subscriber.ids() == [event.id for event in taken]
    assert entry["counters"]["published"] == len(taken)


@pytest.mark.usefixtures("no_tasks_left")
async def test_the_default_client_id_is_stable_and_a_taken_over_sink_comes_back(
    tmp_path: Path, prefix: str
) -> None:
    sink_id = unique("sink")  # the default id names the sink: this test's own
    config = write_bridge_config(tmp_path, {"id": sink_id, "client_id": None,
                                            "topic": prefix + "/{point}"})
    client_id = f"fieldbridge-edge-sink-{sink_id}"
    events = events_of(["p"], 50)
    async with subscribed(prefix + "/#") as subscriber:
        async with BridgeRun(config) as bridge:
            assert bridge.sink(sink_id).sink.details()["client_id"] == client_id
        # Started again, the sink connects with the same id: the broker ends the older of
        # two connections with one id, here the sink's.
        async with BridgeRun(config) as bridge:
            status = bridge.sink(sink_id).status
            await wait_until(lambda: status.state is ConnectionState.UP, what="the sink up")
            async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=client_id):
                await wait_until(lambda: status.counters["reconnects"] >= 1,
                                 what="the sink taken over")
            await feed(bridge, events)
            await bridge.delivered(sink_id, len(events))
            await subscriber.count(len(events))
    assert subscriber.ids() == [event.id for event in events]


@pytest.mark.usefixtures("no_tasks_left")
async def test_the_outbox_waits_for_the_broker_and_drains_in_order_per_point(
    tmp_path: Path, prefix: str
) -> None:
    async with TcpProxy(MQTT_HOST, MQTT_PORT) as proxy:
        proxy.pause()
        config = write_bridge_config(tmp_path, {"port": proxy.port,
                                                "topic": prefix + "/{point}"})
        events = events_of([f"p{index}" for index in range(7)], 700)
        async with subscribed(prefix + "/#") as subscriber, BridgeRun(config) as bridge:
            status = bridge.sink(SINK).status
            await feed(bridge, events)
            await wait_until(lambda: bridge.depth(SINK) == len(events), what="events waiting")
            assert status.state is not ConnectionState.UP
            proxy.resume()
            await bridge.delivered(SINK, len(events))
            await subscriber.count(len(events))
    assert subscriber.ids() == [event.id for event in events]


@pytest.mark.usefixtures("no_tasks_left")
async def test_a_cut_connection_loses_nothing_at_qos_1(tmp_path: Path, prefix: str) -> None:
    events = events_of([f"p{index}" for index in range(5)], 900)
    async with TcpProxy(MQTT_HOST, MQTT_PORT) as proxy:
        config = write_bridge_config(tmp_path, {"port": proxy.port, "qos": 1,
                                                "topic": prefix + "/{point}"})
        async with subscribed(prefix + "/#") as subscriber, BridgeRun(config) as bridge:
            status = bridge.sink(SINK).status
            await wait_until(lambda: status.state is ConnectionState.UP, what="the sink up")
            for start in range(0, len(events), 100):
                await feed(bridge, events[start:start + 100])
                if start == 300:
                    # Cut while publishes are in flight: some were sent, not yet acknowledged.
                    await wait_until(lambda: status.counters["confirmed"] >= 150,
                                     what="publishing under way")
                    proxy.cut()
            await wait_until(lambda: status.counters["reconnects"] >= 1, what="the cut seen")
            await bridge.delivered(SINK, len(events))
            expected = {event.id for event in events}

            def missing() -> str:
                received = set(subscriber.ids())
                lost = [index for index, event in enumerate(events) if event.id not in received]
                counters = {spec.name: value for spec, value in status.counters.items()}
                return f"missing events at indexes {lost[:50]} ({len(lost)}); sink {counters}"

            await subscriber.wait_for(lambda: expected <= set(subscriber.ids()),
                                      "every event at least once", detail=missing)
    assert proxy.connections >= 2
    ids = subscriber.ids()
    assert set(ids) == expected  # duplicates allowed, loss not
    # The first copies of each point's events arrive in order.
    first_seen = list(dict.fromkeys(ids))
    for point in {event.point for event in events}:
        assert [each for each in first_seen if each in {
            event.id for event in events if event.point == point}] == [
            event.id for event in events if event.point == point]


@pytest.mark.usefixtures("no_tasks_left")
async def test_a_sink_worker_publishes_the_outbox(tmp_path: Path, prefix: str) -> None:
    config = write_bridge_config(tmp_path, {"workers": 1, "topic": prefix + "/{point}"})
    events = events_of([f"boiler.t{index}" for index in range(3)], 300)
    async with subscribed(prefix + "/#") as subscriber, BridgeRun(config) as bridge:
        pid = await sink_worker_up(bridge, SINK)
        await feed(bridge, events)
        await bridge.delivered(SINK, len(events), within=WITHIN)
        await subscriber.count(len(events))
        entry = bridge.runtime.sink_entry(SINK)
    assert subscriber.ids() == [event.id for event in events]
    assert entry["details"]["worker_pid"] == pid != os.getpid()
    assert pid is not None
    assert_gone([pid])


class EdgeSink(MqttSink):
    """A subclass as another format would write one: a will, a birth on every connect, a
    command topic, many rows in one message, and a death before a clean disconnect."""

    def __init__(self, config: MqttSinkConfig, *, bridge_id: str) -> None:
        super().__init__(config, bridge_id=bridge_id)
        self.base = config.topic.partition("/{")[0]
        self.commands: list[bytes] = []

    def will(self) -> aiomqtt.Will:
        return aiomqtt.Will(f"{self.base}/state", b"lost", qos=1)

    def subscriptions(self) -> Sequence[tuple[str, int]]:
        return [(f"{self.base}/command", 1)]

    async def on_connected(self) -> None:
        await self.client.publish(f"{self.base}/state", b"born", qos=1)

    def messages(self, rows: Sequence[OutboxRow]) -> list[OutgoingMessage]:
        payload = json.dumps([json.loads(row.body)["id"] for row in rows]).encode()
        return [OutgoingMessage(f"{self.base}/batch", payload, 1,
                                seqs=tuple(row.seq for row in rows))]

    async def on_command(self, message: aiomqtt.Message) -> None:
        assert isinstance(message.payload, bytes)
        self.commands.append(message.payload)

    async def on_closing(self) -> None:
        self.send(OutgoingMessage(f"{self.base}/state", b"stopping", 0))
        await self.client.publish(f"{self.base}/state", b"dead", qos=1)


@pytest.mark.usefixtures("no_tasks_left")
async def test_a_subclass_has_its_will_birth_commands_batches_and_death(
    tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mqtt_connector, "MqttSink", EdgeSink)
    events = events_of(["a", "b"], 40)

    def states() -> list[bytes]:
        return [message.payload for message in subscriber.messages  # type: ignore[misc]
                if message.topic.value == f"{prefix}/state"]

    def batched() -> list[str]:
        return [each for message in subscriber.messages if message.topic.value == f"{prefix}/batch"
                for each in json.loads(message.payload)]  # type: ignore[arg-type]

    async with TcpProxy(MQTT_HOST, MQTT_PORT) as proxy:
        config = write_bridge_config(tmp_path, {"port": proxy.port, "topic": prefix + "/{point}"})
        async with subscribed(prefix + "/#") as subscriber:
            async with BridgeRun(config) as bridge:
                sink = bridge.sink(SINK).sink
                assert isinstance(sink, EdgeSink)
                await subscriber.wait_for(lambda: states() == [b"born"], "the birth")
                await feed(bridge, events[:20])
                await bridge.delivered(SINK, 20)
                # The broker publishes the will when the connection breaks; a birth follows.
                proxy.cut()
                await subscriber.wait_for(lambda: states() == [b"born", b"lost", b"born"],
                                          "the will, then a new birth")
                await feed(bridge, events[20:])
                await bridge.delivered(SINK, len(events))
                async with aiomqtt.Client(MQTT_HOST, MQTT_PORT) as commander:
                    await commander.publish(f"{prefix}/command", b"go", qos=1)
                    await wait_until(lambda: sink.commands == [b"go"], what="the command")
            await subscriber.wait_for(lambda: states()[-2:] == [b"stopping", b"dead"],
                                      "the death before the disconnect")
    assert b"lost" not in states()[3:]  # a clean disconnect suppresses the will
    assert set(batched()) == {event.id for event in events}
    # Rows went out several to a message, each row confirmed with its message.
    batches = [message for message in subscriber.messages
               if message.topic.value == f"{prefix}/batch"]
    assert len(batches) < len(events)


class CountingContext:
    """Records what a connection reports to the delivery engine (a ``SinkContext``)."""

    bridge = None

    def __init__(self) -> None:
        self.status = EndpointStatus(name=SINK, kind="sink", protocol="mqtt", endpoint="e")
        self.confirmed_seqs: list[int] = []
        self.refused_seqs: list[int] = []

    def confirmed(self, seqs: Sequence[int]) -> None:
        self.confirmed_seqs.extend(seqs)

    def refused(self, seqs: Sequence[int]) -> None:
        self.refused_seqs.extend(seqs)

    def failed(self, error: ConnectorError) -> None:
        raise AssertionError(f"unexpected failure: {error}")


def test_a_puback_with_a_failure_reason_code_is_a_refusal() -> None:
    context = CountingContext()
    connection = _Connection(context)
    connection.pending.update({1: (10,), 2: (11, 12), 3: (13,)})
    connection.published(1, ReasonCode(PacketTypes.PUBACK, identifier=0))
    connection.published(2, ReasonCode(PacketTypes.PUBACK, identifier=0x87))  # not authorized
    connection.published(7, ReasonCode(PacketTypes.PUBACK, identifier=0))  # not the sink's
    connection.published(3, ReasonCode(PacketTypes.PUBACK, identifier=0x10))  # no subscribers
    assert (context.confirmed_seqs, context.refused_seqs) == ([10, 13], [11, 12])
    assert connection.pending == {}
