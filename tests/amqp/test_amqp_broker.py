"""The AMQP source against the local RabbitMQ: every test declares its own queue and cleans up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.brokers import (
    AMQP_HOST,
    AMQP_PORT,
    RabbitAdmin,
    SourceRun,
    TcpProxy,
    assert_no_tasks_left,
    unique,
    wait_until,
    write_config,
)

from bridge.core.model import Quality
from bridge.core.status import ConnectionState
from bridge.errors import ErrorCategory

pytestmark = pytest.mark.broker


@pytest.fixture
def topic() -> str:
    """A routing-key prefix no other test uses."""
    return unique("fbtest.")


def amqp_source(rabbit: RabbitAdmin, topic: str, points: list[dict[str, Any]],
                **options: Any) -> dict[str, Any]:
    """A source consuming a fresh queue bound to ``amq.topic`` for ``topic.#``."""
    queue = unique("fbtest-")
    rabbit.queues.append(queue)
    return {"id": unique("amqp-"), "protocol": "amqp", "host": AMQP_HOST, "port": AMQP_PORT,
            "queue": {"name": queue, "declare": True, "durable": False,
                      "bindings": [{"exchange": "amq.topic", "routing_key": f"{topic}.#"}]},
            "timeout": 5, "points": points, **options}


async def test_routing_key_and_headers_name_points_and_messages_are_acked(
    tmp_path: Path, rabbit: RabbitAdmin, topic: str
) -> None:
    source = amqp_source(rabbit, topic, [
        {"name": "{site}.{headers.line}.temperature", "routing_key": f"{topic}.{{site}}",
         "path": "t", "tags": {"line": "{headers.line}", "site": "{site}"}},
        {"name": "{site}.{headers.line}.pressure", "routing_key": f"{topic}.{{site}}",
         "path": "p"},
    ])
    queue = source["queue"]["name"]
    async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
        await run.up()
        rabbit.publish(f"{topic}.north", json.dumps({"t": 21.5, "p": 1.25}),
                       headers={"line": "l7"}, timestamp=1718006400)
        first, second = await run.router.wait_events(2)
    assert (first.point, first.value) == ("north.l7.temperature", 21.5)
    assert (second.point, second.value) == ("north.l7.pressure", 1.25)
    assert first.tags == {"line": "l7", "site": "north"}
    assert first.ts == 1718006400.0
    assert first.protocol == "amqp"
    assert run.router.accepted == 1
    # Closed consumer: anything unacknowledged would be back in the queue now.
    assert rabbit.ready(queue) == 0


async def test_unmappable_message_is_dead_lettered(
    tmp_path: Path, rabbit: RabbitAdmin, topic: str
) -> None:
    exchange, dead_queue = unique("fbtest-dlx-"), unique("fbtest-dlq-")
    rabbit.exchanges.append(exchange)
    rabbit.queues.append(dead_queue)
    source = amqp_source(rabbit, topic, [{"name": "v", "routing_key": f"{topic}.ok",
                                          "path": "v"}],
                         dead_letter={"exchange": exchange, "queue": dead_queue})
    async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
        await run.up()
        rabbit.publish(f"{topic}.ok", "{not json")
        rabbit.publish(f"{topic}.unknown", '{"v": 1}')
        rabbit.publish(f"{topic}.ok", '{"v": 2}')
        (event,) = await run.router.wait_events(1)
        await run.router.wait_for(lambda: run.status.counters["rejected"] == 2,
                                  what="two rejections")
        await wait_until(lambda: rabbit.ready(dead_queue) == 2, what="two dead letters")
    assert event.value == 2
    assert run.status.details["last_rejection"]["address"] == f"{topic}.unknown"
    assert "no configured point matches" in run.status.details["last_rejection"]["reason"]
    dead = rabbit.get(dead_queue)
    assert dead is not None
    properties, body = dead
    assert body == b"{not json"
    assert properties.headers["x-death"][0]["reason"] == "rejected"
    assert rabbit.ready(source["queue"]["name"]) == 0


async def test_without_dead_letter_exchange_unmappable_is_acked_and_counted(
    tmp_path: Path, rabbit: RabbitAdmin, topic: str
) -> None:
    source = amqp_source(rabbit, topic, [{"name": "bin", "routing_key": f"{topic}.bin",
                                          "format": "binary", "type": "float32"}])
    async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
        await run.up()
        rabbit.publish(f"{topic}.bin", b"\x00\x01\x02")
        await run.router.wait_for(lambda: run.status.counters["rejected"] == 1,
                                  what="a rejection")
    rejection = run.status.details["last_rejection"]
    assert rejection["address"] == f"{topic}.bin"
    assert "binary payload of 3 bytes: float32 needs 4 bytes" in rejection["reason"]
    assert run.events == []
    assert rabbit.ready(source["queue"]["name"]) == 0


async def test_prefetch_limits_unacknowledged_deliveries(
    tmp_path: Path, rabbit: RabbitAdmin, topic: str
) -> None:
    source = amqp_source(rabbit, topic, [{"name": "n.{index}", "routing_key": f"{topic}.n",
                                          "each": "[@]", "path": "n"}], prefetch=3)
    queue = source["queue"]["name"]
    async with SourceRun(write_config(tmp_path / "config.yaml", source),
                         hold_acks=True) as run:
        await run.up()
        for number in range(10):
            rabbit.publish(f"{topic}.n", json.dumps({"n": number}))
        await run.router.wait_events(3)
        await wait_until(lambda: rabbit.ready(queue) == 7, what="7 messages left ready")
        assert len(run.events) == 3
        run.router.hold_acks = False
        await run.router.release()
        events = await run.router.wait_events(10)
    assert [event.value for event in events] == list(range(10))
    assert rabbit.ready(queue) == 0


async def test_reconnect_restores_the_consumer_and_redelivers_unacked(
    tmp_path: Path, rabbit: RabbitAdmin, topic: str
) -> None:
    async with TcpProxy(AMQP_HOST, AMQP_PORT) as proxy:
        source = amqp_source(rabbit, topic, [{"name": "v", "routing_key": f"{topic}.v",
                                              "format": "number"}], port=proxy.port)
        async with SourceRun(write_config(tmp_path / "config.yaml", source),
                             hold_acks=True) as run:
            await run.up()
            rabbit.publish(f"{topic}.v", "1")
            await run.router.wait_events(1)
            proxy.cut()
            await wait_until(lambda: run.status.counters["reconnects"] >= 1, what="reconnect")
            assert run.status.error_category is ErrorCategory.TRANSIENT
            await run.up()
            (_, redelivered) = await run.router.wait_events(2)
            assert redelivered.value == 1
            run.router.hold_acks = False
            await run.router.release()
            rabbit.publish(f"{topic}.v", "2")
            await run.router.wait_events(3)
        assert [event.value for event in run.events] == [1, 1, 2]
        assert run.router.accepted >= 2
    assert rabbit.ready(source["queue"]["name"]) == 0
    await assert_no_tasks_left()


async def test_missing_queue_is_a_config_error(tmp_path: Path, rabbit: RabbitAdmin) -> None:
    source = {"id": "amqp-missing", "protocol": "amqp", "host": AMQP_HOST, "port": AMQP_PORT,
              "queue": {"name": unique("fbtest-absent-")}, "timeout": 5,
              "points": [{"name": "v", "format": "text"}]}
    async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
        await wait_until(lambda: run.status.counters["reconnects"] >= 1, what="a failure")
    assert run.status.error_category is ErrorCategory.CONFIG
    assert "404" in (run.status.last_error or "")
    assert "checking queue" in (run.status.last_error or "")


async def test_bad_credentials_are_an_auth_error(tmp_path: Path, rabbit: RabbitAdmin) -> None:
    source = {"id": "amqp-auth", "protocol": "amqp", "host": AMQP_HOST, "port": AMQP_PORT,
              "username": "guest", "password": "not-the-password", "timeout": 5,
              "queue": {"name": "never-used"}, "points": [{"name": "v", "format": "text"}]}
    async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
        await wait_until(lambda: run.status.counters["reconnects"] >= 1, what="a failure")
    assert run.status.error_category is ErrorCategory.AUTH
    assert "not-the-password" not in (run.status.last_error or "")
    assert run.status.state is not ConnectionState.UP


async def test_bad_value_in_good_message_is_a_bad_event(
    tmp_path: Path, rabbit: RabbitAdmin, topic: str
) -> None:
    source = amqp_source(rabbit, topic, [{"name": "v", "routing_key": f"{topic}.v",
                                          "path": "v"}])
    async with SourceRun(write_config(tmp_path / "config.yaml", source)) as run:
        await run.up()
        rabbit.publish(f"{topic}.v", '{"other": 1}')
        (event,) = await run.router.wait_events(1)
    assert event.quality is Quality.BAD
    assert run.status.counters["bad_values"] == 1
    assert run.router.accepted == 1
