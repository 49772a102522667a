"""A store written by the previous layout (history with a rowid and three indexes, one outbox
row per event and sink) opens, migrates, and its outbox drains.

``fixtures/store-layout1.db`` was written by release 62b9f60's own store code
(``fixtures/make_store_layout1.py``): twelve events of three points, the ``latest`` table never
written (the daemon was killed), eight events waiting for sink ``rabbit`` (four were confirmed)
and four for sink ``boilers``.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from helpers.brokers import AMQP_HOST, AMQP_PORT, BridgeRun, RabbitAdmin, unique

from bridge.core.sink import EventSelector, OutboxRoute
from bridge.pipeline.delivery import SinkOutbox
from bridge.pipeline.outbox import Outbox, OutboxLimits
from bridge.pipeline.store import SCHEMA_VERSION, Retention, Store

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store-layout1.db"
IDS = [f"0190c000-0000-7000-8000-{index:012d}" for index in range(12)]
POINTS = ("boiler.t", "pump.on", "tank.level")


def routes() -> list[OutboxRoute]:
    """The two sinks the old store was written for, with the same addresses."""
    return [OutboxRoute("rabbit", EventSelector(), lambda event: f"{event.source}.{event.point}"),
            OutboxRoute("boilers", EventSelector(points=["boiler.*"]), lambda event: event.point)]


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "fieldbridge.db"
    path.parent.mkdir()
    shutil.copy(FIXTURE, path)
    return path


async def test_an_old_store_migrates_with_its_history_last_values_and_outbox(
    old_store: Path
) -> None:
    outbox = Outbox(OutboxLimits(1000, 1 << 20), routes())
    store = Store(old_store, Retention(max_age=86400, max_rows=100), outbox)
    store.open()
    try:
        for index, point in enumerate(POINTS):
            assert [event.id for event in store.history(point, newest_first=False)] == IDS[index::3]
        latest = store.latest()
        assert {point: event.value for point, event in latest.items()} == {
            "boiler.t": 9.0, "pump.on": 10.0, "tank.level": 11.0}
        waiting = store.outbox_rows("rabbit")
        assert [row.id for row in waiting] == IDS[4:]
        assert [row.address for row in waiting] == [f"plant.{POINTS[index % 3]}"
                                                    for index in range(4, 12)]
        assert [row.id for row in store.outbox_rows("boilers")] == IDS[0::3]
        assert (outbox.depths["rabbit"].events, outbox.depths["boilers"].events) == (8, 4)
        assert outbox.depths["rabbit"].bytes == sum(row.size for row in waiting)

        sink = SinkOutbox(store, "rabbit")
        rows = await sink.read(0, 100)
        assert await sink.confirm([row.seq for row in rows]) == 8
        assert outbox.depths["rabbit"].events == 0
        # New events continue after every migrated seq.
        await store.write(store.history("pump.on", limit=1))
        assert (await sink.read(rows[-1].seq, 10))[0].seq > rows[-1].seq
    finally:
        store.close()
    with sqlite3.connect(old_store) as reader:
        assert reader.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        tables = {name for (name,) in reader.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
        assert "outbox" not in tables
        assert "history_id" not in tables


@pytest.mark.broker
async def test_the_daemon_drains_an_old_stores_outbox_to_rabbitmq(
    tmp_path: Path, old_store: Path, rabbit: RabbitAdmin
) -> None:
    queue = unique("fbtest.migrated.")
    exchange = unique("fbtest.events.")
    rabbit.queues.append(queue)
    rabbit.exchanges.append(exchange)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "bridge": {"id": "edge", "state_dir": str(old_store.parent)},
        "store": {"path": str(old_store)},
        "api": {"enabled": False},
        "sinks": [{"id": "rabbit", "protocol": "amqp", "host": AMQP_HOST, "port": AMQP_PORT,
                   "timeout": 5, "exchange": {"name": exchange},
                   "topology": {"queues": [{"name": queue}]}}],
    }, sort_keys=False), encoding="utf-8")
    async with BridgeRun(config) as bridge:
        assert bridge.depth("rabbit") == 8
        await bridge.delivered("rabbit", 8)
    received = rabbit.drain(queue, 8)
    assert [delivery.message_id for delivery in received] == IDS[4:]
