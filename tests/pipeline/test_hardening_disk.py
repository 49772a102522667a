"""A full disk is a state, not a crash (issue "Hardening", measured item 4).

With the state directory on a 20 MB tmpfs under QoS 1 load, SQLite's "database or disk is
full" went unhandled: the daemon exited, and started again on the still-full disk it logged
"ready" and exited within 2 s. Now a batch the disk cannot take is not stored at all (in the
file or in memory), the router tries it again with backoff while the sources wait, nothing is
acknowledged upstream meanwhile, and the store resumes by itself.

The store-level tests make SQLite hit the wall with ``PRAGMA max_page_count`` (it answers
SQLITE_FULL exactly as a full disk does); the daemon-level tests in
``test_hardening_disk_daemon.py`` use a real tmpfs.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.brokers import wait_until
from helpers.store import CountingAck, make_event

from bridge.core.model import Event
from bridge.core.sink import OutboxRoute
from bridge.errors import StoreFullError
from bridge.pipeline.outbox import Outbox, OutboxLimits
from bridge.pipeline.router import Router
from bridge.pipeline.store import Retention, Store, disk_problem


def _route(sink: str) -> OutboxRoute:
    return OutboxRoute(sink, lambda event: True, lambda event: event.point)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    outbox = Outbox(OutboxLimits(1_000_000, 1 << 30, False), [_route("out")])
    opened = Store(tmp_path / "fb.db", Retention(max_age=3600, max_rows=100_000), outbox,
                   min_free=0)
    opened.open()
    yield opened
    opened.close()


async def _limit_pages(store: Store, extra: int) -> None:
    """Let the database grow by ``extra`` pages at most, as a disk with that much room."""
    def limit(writer: sqlite3.Connection) -> None:
        (pages,) = writer.execute("PRAGMA page_count").fetchone()
        writer.execute(f"PRAGMA max_page_count = {pages + extra}")

    await store.run_on_writer(limit)


async def _unlimit(store: Store) -> None:
    await store.run_on_writer(
        lambda writer: writer.execute("PRAGMA max_page_count = 1073741823"))


def _many(point: str, count: int) -> list[Event]:
    return [make_event(point, float(index)) for index in range(count)]


async def _fill(store: Store) -> list[Event]:
    """Write batches until the limited database refuses one, then smaller ones until it
    refuses a single event; return the first refused batch."""
    refused: list[Event] = []
    value = 0.0
    for size in (200, 20, 1):
        for _ in range(1000):
            value += 1
            batch = [make_event(f"fill.p{index % 7}", value) for index in range(size)]
            try:
                await store.write(batch)
            except StoreFullError:
                refused = refused or batch
                break
        else:
            raise AssertionError("the database never filled up")
    return refused


def test_sqlite_full_and_enospc_are_disk_problems() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert disk_problem(full) == "disk full"
    assert disk_problem(OSError(28, "No space left on device")) == "disk full"
    other = sqlite3.OperationalError("no such table: x")
    other.sqlite_errorcode = sqlite3.SQLITE_ERROR  # type: ignore[attr-defined]
    assert disk_problem(other) is None
    assert disk_problem(ValueError("x")) is None


async def test_a_batch_the_disk_cannot_take_is_not_stored_at_all(store: Store) -> None:
    await store.write([make_event("a.p", 1.0)])
    await _limit_pages(store, 40)
    refused = await _fill(store)
    assert store.problem == "disk full"
    written = store.written
    stored = {event.id for event in store.history("fill.p0", limit=100_000)}
    assert not stored & {event.id for event in refused}
    outbox_ids = {row.id for row in store.outbox_rows("out")}
    assert not outbox_ids & {event.id for event in refused}

    # Space returns: the same batch is stored once, in order, and the outbox has it.
    await _unlimit(store)
    assert await store.write(refused) == len(refused)
    assert store.problem is None
    assert store.written == written + len(refused)
    history = [event.id for event in store.history("fill.p0", limit=100_000,
                                                   newest_first=False)]
    refused_p0 = [event.id for event in refused if event.point == "fill.p0"]
    assert history[-len(refused_p0):] == refused_p0
    assert len(history) == len(set(history))
    outbox = [row.id for row in store.outbox_rows("out")]
    assert outbox[-len(refused):] == [event.id for event in refused]
    assert len(outbox) == len(set(outbox))


async def test_the_min_free_reserve_pauses_before_sqlite_hits_the_wall(tmp_path: Path) -> None:
    store = Store(tmp_path / "fb.db", Retention(max_age=3600, max_rows=100),
                  min_free=1 << 62)
    store.open()
    try:
        with pytest.raises(StoreFullError, match=r"GiB free for .*, below store.min_free \("):
            await store.write([make_event("a.p", 1.0)])
        assert store.problem is not None
        assert store.problem.startswith("disk full: ")
        assert store.history("a.p") == []
        store.min_free = 0
        assert await store.write([make_event("a.p", 2.0)]) == 1
        assert store.problem is None
    finally:
        store.close()


async def test_the_router_waits_for_space_and_acknowledges_only_what_is_stored(
    store: Store
) -> None:
    router = Router(store, max_pending=50)
    task = asyncio.create_task(router.run(), name="router")
    try:
        await store.write([make_event("a.p", 0.0)])
        await _limit_pages(store, 40)
        await _fill(store)
        acks = [CountingAck(store) for _ in range(3)]
        for index, ack in enumerate(acks):
            await router.submit([make_event("b.p", float(index))], [(ack, None)])
        await wait_until(lambda: router.counters["store_full_waits"] == 1)
        # Sources fill the pending bound and wait there (backpressure) ...
        await router.submit(_many("c.p", 60))
        blocked = asyncio.create_task(router.submit([make_event("c.p", 60.0)]), name="blocked")
        await wait_until(lambda: router.counters["backpressure_waits"] == 1)
        assert not blocked.done()
        # ... and nothing is acknowledged upstream while the store cannot write.
        assert [ack.accepted for ack in acks] == [0, 0, 0]
        assert store.history("b.p") == []

        await _unlimit(store)
        await asyncio.wait_for(blocked, 10)
        await wait_until(lambda: router.pending == 0, within=10)
        assert [ack.accepted for ack in acks] == [1, 1, 1]
        assert [event.value for event in store.history("b.p", newest_first=False)] == [
            0.0, 1.0, 2.0]
        assert len(store.history("c.p", limit=1000)) == 61
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_shutdown_with_a_full_disk_gives_up_unacknowledged_instead_of_hanging(
    store: Store
) -> None:
    router = Router(store, max_pending=50)
    task = asyncio.create_task(router.run(), name="router")
    await store.write([make_event("a.p", 0.0)])
    await _limit_pages(store, 40)
    await _fill(store)
    ack = CountingAck(store)
    await router.submit([make_event("b.p", 1.0)], [(ack, None)])
    await wait_until(lambda: router.counters["store_full_waits"] == 1)
    task.cancel()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
    assert ack.accepted == 0
    assert router.counters["not_stored"] == 1
    assert router.pending == 0


async def test_history_max_bytes_prunes_the_oldest_of_any_point(tmp_path: Path) -> None:
    store = Store(tmp_path / "fb.db",
                  Retention(max_age=3600, max_rows=1_000_000, max_bytes=200_000), min_free=0)
    store.open()
    try:
        for round_ in range(20):
            await store.write([make_event(f"p{index % 4}", float(round_ * 1000 + index))
                               for index in range(400)])
        await store.prune()
        kept = {point: store.history(point, limit=1_000_000, newest_first=False)
                for point in ("p0", "p1", "p2", "p3")}
        size = sum(len(event.to_json()) for events in kept.values() for event in events)
        assert 150_000 < size <= 200_000
        # The newest events of every point are kept, the oldest are gone.
        for events in kept.values():
            assert events[-1].value >= 19_000
            assert events[0].value >= 1_000
        assert store.history_count("p0") == len(kept["p0"])
    finally:
        store.close()
    # Reopened, the store sizes its history again and keeps the bound.
    reopened = Store(tmp_path / "fb.db",
                     Retention(max_age=3600, max_rows=1_000_000, max_bytes=100_000), min_free=0)
    reopened.open()
    try:
        await reopened.prune()
        size = sum(len(event.to_json()) for point in ("p0", "p1", "p2", "p3")
                   for event in reopened.history(point, limit=1_000_000))
        assert 50_000 < size <= 100_000
    finally:
        reopened.close()
