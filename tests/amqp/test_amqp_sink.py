"""The AMQP sink against the local RabbitMQ: what a consumer receives, the topology, the outbox
across restarts and outages, its bound under both policies, refusals and unroutable messages.

Each test names its own exchange and queues and deletes them afterwards. Events are handed to
the router directly; the runtime around it (store, outbox, supervised sink) is the real one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import free_port
from helpers.brokers import (
    AMQP_HOST,
    AMQP_PORT,
    SETTLE,
    BridgeRun,
    RabbitAdmin,
    TcpProxy,
    assert_no_tasks_left,
    unique,
    wait_until,
)
from helpers.sinks import SINK, CountingAck, bodies, feed, make_event, write_bridge_config

from bridge.core.model import Quality
from bridge.core.status import ConnectionState
from bridge.errors import ErrorCategory

pytestmark = pytest.mark.broker


async def test_consumers_receive_exactly_the_events_with_the_documented_shape(
    tmp_path: Path, rabbit: RabbitAdmin
) -> None:
    everything, plant, log = unique("fbtest.all."), unique("fbtest.plant."), unique("fbtest.log.")
    dead = unique("fbtest.dead.")
    config = write_bridge_config(tmp_path, rabbit, {"topology": {
        "exchanges": [{"name": dead, "type": "fanout"}],
        "queues": [
            {"name": everything, "message_ttl": "1h", "dead_letter_exchange": dead},
            {"name": plant, "type": "classic", "max_length": 1000,
             "bindings": [{"routing_key": "plant.*"}]},
            {"name": log, "type": "stream", "max_age": "1h"},
        ]}})
    events = [make_event("plant", "boiler.supply_temp", 60.0 + index) for index in range(5)]
    events += [make_event("plant", "pump", None, quality=Quality.BAD, reason="timeout"),
               make_event("lab", "a*b#c", 2.5, tags={})]
    async with BridgeRun(config) as bridge:
        status = bridge.sink(SINK).status
        await wait_until(lambda: status.state is ConnectionState.UP, what="the sink up")
        # A consumer binds a queue of its own too.
        own = rabbit.channel.queue_declare("", exclusive=True).method.queue
        exchange = bridge.sink(SINK).sink.config.exchange.name  # type: ignore[attr-defined]
        rabbit.channel.queue_bind(own, exchange, routing_key="lab.#")
        await feed(bridge, events)
        await bridge.delivered(SINK, len(events))
        entry = bridge.runtime.sink_inventory()[0]

    received = rabbit.drain(everything, len(events))
    assert rabbit.ready(everything) == 0
    assert [delivery.message_id for delivery in received] == [event.id for event in events]
    assert bodies(received) == [event.to_dict() for event in events]
    assert [delivery.routing_key for delivery in received] == (
        ["plant.boiler%2Esupply_temp"] * 5 + ["plant.pump", "lab.a%2Ab%23c"])
    first = received[0].properties
    assert first.content_type == "application/json"
    assert first.delivery_mode == 2
    assert first.timestamp == int(events[0].ts)
    assert first.app_id == "fieldbridge"
    assert first.headers == {"source": "plant", "point": "boiler.supply_temp",
                             "quality": "good"}
    assert received[5].properties.headers["quality"] == "bad"

    assert [delivery.message_id for delivery in rabbit.drain(plant, 6)] == [
        event.id for event in events[:6]]
    assert [delivery.message_id for delivery in rabbit.drain(own, 1)] == [events[6].id]
    streamed = rabbit.drain(log, len(events), arguments={"x-stream-offset": "first"})
    assert [delivery.message_id for delivery in streamed] == [event.id for event in events]

    assert rabbit.declared_as(everything, {"x-queue-type": "quorum", "x-message-ttl": 3600000,
                                           "x-dead-letter-exchange": dead})
    assert not rabbit.declared_as(everything, {"x-queue-type": "classic"})
    assert rabbit.declared_as(plant, {"x-queue-type": "classic", "x-max-length": 1000})
    assert rabbit.declared_as(log, {"x-queue-type": "stream", "x-max-age": "3600s"})

    assert entry["state"] == "up"
    assert entry["counters"]["published"] == entry["counters"]["confirmed"] == len(events)
    assert entry["outbox"]["events"] == 0
    assert entry["outbox"]["oldest_age_seconds"] is None
    assert entry["details"]["confirm_latency_ms"] > 0
    await assert_no_tasks_left()


async def test_outbox_waits_while_the_broker_is_away_and_is_replayed_in_order_after_a_restart(
    tmp_path: Path, rabbit: RabbitAdmin
) -> None:
    queue = unique("fbtest.all.")
    async with TcpProxy(AMQP_HOST, AMQP_PORT) as proxy:
        config = write_bridge_config(tmp_path, rabbit, {"port": proxy.port,
                                                        "topology": {"queues": [{"name": queue}]}})
        # The first connect declares the topology, then the broker "goes away".
        async with BridgeRun(config) as bridge:
            status = bridge.sink(SINK).status
            await wait_until(lambda: status.state is ConnectionState.UP, what="the sink up")
            proxy.pause()
            await wait_until(lambda: status.state is ConnectionState.DOWN, what="the sink down")
            events = [make_event("plant", f"p{index % 7}", index) for index in range(300)]
            before = time.time()
            await feed(bridge, events)
            await wait_until(lambda: bridge.depth(SINK) == 300, what="300 events waiting")
            # The depth counts rows as the writer inserts them, a moment before it commits.
            await wait_until(
                lambda: bridge.runtime.sink_inventory()[0]["outbox"]["oldest_age_seconds"]
                is not None, what="the oldest waiting event visible")
            entry = bridge.runtime.sink_inventory()[0]
            # The age of the oldest event stored since ``before``: no older than that.
            assert 0 <= entry["outbox"]["oldest_age_seconds"] <= time.time() - before + 0.001
        # Restarted on the same state directory, with the broker back.
        proxy.resume()
        async with BridgeRun(config) as bridge:
            assert bridge.depth(SINK) == 300
            await bridge.delivered(SINK, 300)
    received = rabbit.drain(queue, 300)
    assert [delivery.message_id for delivery in received] == [event.id for event in events]


@pytest.mark.parametrize("policy", ["block", "drop_oldest"])
async def test_full_outbox_follows_its_policy(
    tmp_path: Path, rabbit: RabbitAdmin, policy: str
) -> None:
    queue = unique("fbtest.all.")
    async with TcpProxy(AMQP_HOST, AMQP_PORT) as proxy:
        proxy.pause()
        config = write_bridge_config(
            tmp_path, rabbit, {"port": proxy.port, "topology": {"queues": [{"name": queue}]}},
            outbox={"max_events": 50, "policy": policy})
        async with BridgeRun(config) as bridge:
            router = bridge.runtime.router
            events = [make_event("plant", "p", index) for index in range(120)]
            acks = [CountingAck() for _ in range(12)]
            for index, ack in enumerate(acks):
                await router.submit(events[10 * index:10 * index + 10], [(ack, None)])
            if policy == "block":
                await wait_until(lambda: router.counters["outbox_full_waits"] >= 1,
                                 what="the router to block")
                assert bridge.depth(SINK) == 50
                assert router.pending == 70
                assert [ack.accepted for ack in acks] == [1] * 5 + [0] * 7
                assert bridge.runtime.store.history_count("p") == 50
            else:
                await wait_until(lambda: router.pending == 0, what="every event stored")
                assert bridge.depth(SINK) == 50
                assert bridge.runtime.sink_inventory()[0]["outbox"]["dropped"] == 70
                assert [ack.accepted for ack in acks] == [1] * 12
            proxy.resume()
            expected = events if policy == "block" else events[70:]
            await bridge.delivered(SINK, len(expected), within=SETTLE + 30)
            assert [ack.accepted for ack in acks] == [1] * 12
    received = rabbit.drain(queue, len(expected))
    assert [delivery.message_id for delivery in received] == [event.id for event in expected]
    assert rabbit.ready(queue) == 0


async def test_refused_messages_are_published_again_in_order(
    tmp_path: Path, rabbit: RabbitAdmin
) -> None:
    queue = unique("fbtest.small.")
    config = write_bridge_config(tmp_path, rabbit, {"retry": "50ms", "topology": {"queues": [
        {"name": queue, "type": "classic", "max_length": 5, "overflow": "reject-publish"}]}})
    events = [make_event("plant", "p", index) for index in range(20)]
    received = []
    async with BridgeRun(config) as bridge:
        status = bridge.sink(SINK).status
        await wait_until(lambda: status.state is ConnectionState.UP, what="the sink up")
        await feed(bridge, events)
        while len(received) < len(events):
            await wait_until(lambda: rabbit.ready(queue) == 5
                             or status.counters["confirmed"] == len(events),
                             what="a full queue or everything confirmed")
            received += rabbit.drain(queue, min(5, rabbit.ready(queue)))
        await bridge.delivered(SINK, len(events))
    assert [delivery.message_id for delivery in received] == [event.id for event in events]
    assert status.counters["nacked"] >= 15
    assert status.counters["republished"] == status.counters["nacked"]
    assert status.state is ConnectionState.UP


async def test_unroutable_events_are_confirmed_and_counted(
    tmp_path: Path, rabbit: RabbitAdmin
) -> None:
    config = write_bridge_config(tmp_path, rabbit, {"routing_key": "{point}"})
    async with BridgeRun(config) as bridge:
        await feed(bridge, [make_event("plant", f"p{index}", index) for index in range(3)])
        await bridge.delivered(SINK, 3)
        await wait_until(lambda: bridge.sink(SINK).status.counters["unroutable"] == 3,
                         what="three returned messages")
        entry = bridge.runtime.sink_inventory()[0]
    assert entry["details"]["last_unroutable"]["routing_key"] == "p2"


async def test_refused_credentials_are_an_auth_error_and_never_shown(
    tmp_path: Path, rabbit: RabbitAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_bridge_config(
        tmp_path, rabbit, {"url": f"amqp://guest:not-the-password@{AMQP_HOST}:{AMQP_PORT}/"})
    document = yaml.safe_load(config.read_text(encoding="utf-8"))
    for key in ("host", "port"):
        del document["sinks"][0][key]
    config.write_text(yaml.safe_dump(document), encoding="utf-8")
    async with BridgeRun(config) as bridge:
        status = bridge.sink(SINK).status
        await wait_until(lambda: status.counters["reconnects"] >= 1, what="a failure")
        entry = bridge.runtime.sink_inventory()[0]
    assert status.error_category is ErrorCategory.AUTH
    assert "not-the-password" not in json.dumps(entry)
    assert "not-the-password" not in caplog.text
    assert entry["endpoint"].startswith(f"amqp://guest@{AMQP_HOST}:{AMQP_PORT}/")


async def test_stopping_keeps_unconfirmed_events_for_the_next_start(
    tmp_path: Path, rabbit: RabbitAdmin
) -> None:
    queue = unique("fbtest.all.")
    config = write_bridge_config(tmp_path, rabbit, {"topology": {"queues": [{"name": queue}]}})
    events = [make_event("plant", "p", index) for index in range(2000)]
    async with BridgeRun(config) as bridge:
        await feed(bridge, events, batch=500)
    async with BridgeRun(config) as bridge:
        await bridge.delivered(SINK, 0)
    received = rabbit.drain(queue, rabbit.ready(queue))
    # Each event at least once, first copies in order: what a de-duplicating consumer keeps.
    first_seen = list(dict.fromkeys(delivery.message_id for delivery in received))
    assert first_seen == [event.id for event in events]


async def test_metrics_and_inventory_show_the_outbox_while_the_broker_is_away(
    tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "api": {"port": 0},
        "outbox": {"max_events": 10, "policy": "drop_oldest"},
        "sinks": [{"id": SINK, "protocol": "amqp", "host": "127.0.0.1", "port": free_port(),
                   "password": "s3cret-password"}],
    }), encoding="utf-8")
    async with BridgeRun(config, serve_api=True) as bridge:
        await feed(bridge, [make_event("plant", "p", index) for index in range(12)])
        await wait_until(lambda: bridge.runtime.router.pending == 0, what="events stored")
        base = f"http://127.0.0.1:{bridge.runtime.api_port}"
        async with httpx.AsyncClient(base_url=base, timeout=5.0) as client:
            text = (await client.get("/metrics")).text
            listed = await client.get("/v1/sinks")
            one = await client.get(f"/v1/sinks/{SINK}")
            missing = await client.get("/v1/sinks/nope")
    labels = f'{{protocol="amqp",sink="{SINK}"}}'
    assert f"fieldbridge_outbox_events{labels} 10" in text
    assert f"fieldbridge_outbox_dropped_total{labels} 2" in text
    assert f"fieldbridge_sink_up{labels} 0" in text
    assert "fieldbridge_outbox_oldest_age_seconds" in text
    assert listed.status_code == one.status_code == 200
    (entry,) = listed.json()["items"]
    assert entry["id"] == one.json()["id"] == SINK
    assert entry["kind"] == "sink"
    assert entry["enabled"] is True
    assert entry["state"] in ("connecting", "down")
    assert entry["outbox"] == {"events": 10, "bytes": entry["outbox"]["bytes"], "dropped": 2,
                               "oldest_age_seconds": entry["outbox"]["oldest_age_seconds"],
                               "max_events": 10, "max_bytes": 1 << 30, "policy": "drop_oldest"}
    assert entry["outbox"]["bytes"] > 0
    assert set(entry["details"]) >= {"publish_rate", "confirm_latency_ms", "in_flight"}
    assert "s3cret" not in listed.text
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


async def test_a_stopped_sink_fills_only_its_own_outbox_and_the_other_keeps_delivering(
    tmp_path: Path, rabbit: RabbitAdmin
) -> None:
    queue = unique("fbtest.working.")
    exchange = unique("fbtest.events.")
    rabbit.exchanges.append(exchange)
    rabbit.queues.append(queue)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "api": {"enabled": False},
        "outbox": {"max_events": 50, "policy": "block"},
        "sinks": [
            # Nothing listens on its port: it never delivers anything.
            {"id": "stopped", "protocol": "amqp", "host": AMQP_HOST, "port": free_port(),
             "timeout": 2, "points": ["a.*"]},
            {"id": SINK, "protocol": "amqp", "host": AMQP_HOST, "port": AMQP_PORT, "timeout": 5,
             "points": ["b.*"], "exchange": {"name": exchange},
             "topology": {"queues": [{"name": queue}]}},
        ],
    }, sort_keys=False), encoding="utf-8")
    stuck = [make_event("x", f"a.p{index % 5}", index) for index in range(200)]
    working = [make_event("y", f"b.p{index % 5}", index) for index in range(200)]
    async with BridgeRun(config) as bridge:
        router = bridge.runtime.router
        for start in range(0, 200, 20):
            await router.submit(stuck[start:start + 20])
            await router.submit(working[start:start + 20])
        await bridge.delivered(SINK, 200)
        await wait_until(lambda: bridge.depth("stopped") == 50, what="the stopped sink full")
        # The stopped sink's events wait in the router, in order, for room in its outbox.
        assert router.pending == 150
        assert router.counters["outbox_full_waits"] >= 1
        assert bridge.sink("stopped").status.state is ConnectionState.DOWN
    received = rabbit.drain(queue, 200)
    assert [delivery.message_id for delivery in received] == [event.id for event in working]
