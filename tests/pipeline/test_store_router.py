"""The SQLite store and the router in front of it."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers.store import CountingAck, make_event

from bridge.config.models import StoreSection
from bridge.pipeline.outbox import Admission
from bridge.pipeline.router import Router
from bridge.pipeline.store import Replay, Retention, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "state" / "fb.db", Retention(max_age=3600, max_rows=5))
    opened.open()
    yield opened
    opened.close()


@pytest.fixture
async def router(store: Store) -> AsyncIterator[Router]:
    routed = Router(store, max_pending=10)
    task = asyncio.create_task(routed.run(), name="router")
    yield routed
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def settled(router: Router) -> None:
    """Wait until the router stored everything handed to it."""
    stored = asyncio.Event()
    remove = router.add_listener(lambda events: stored.set() if router.pending == 0 else None)
    try:
        if router.pending:
            await asyncio.wait_for(stored.wait(), 5)
    finally:
        remove()


async def test_events_are_stored_with_history_and_latest(router: Router, store: Store) -> None:
    for value in range(3):
        await router.submit([make_event("a.p", value, ts=1000.0 + value)])
    await settled(router)
    assert router.latest["a.p"].value == 2
    restored = store.latest()
    assert restored["a.p"].value == 2
    assert restored["a.p"].tags == {"k": "v"}
    history = store.history("a.p")
    assert [event.value for event in history] == [2, 1, 0]
    oldest_first = store.history("a.p", newest_first=False, since=1001.0)
    assert [event.value for event in oldest_first] == [1, 2]


async def test_ack_settles_only_after_the_events_are_stored(router: Router, store: Store) -> None:
    ack = CountingAck(store)
    await router.submit([make_event("a.p", 1), make_event("a.q", 2)], [(ack, None)])
    await settled(router)
    assert ack.accepted == 1
    assert ack.written_when_accepted == 2


async def test_backpressure_bounds_pending_events(store: Store) -> None:
    routed = Router(store, max_pending=10)
    # No run() yet: nothing drains, so the second submit must wait for room.
    await routed.submit([make_event("a.p", value) for value in range(10)])
    blocked = asyncio.create_task(routed.submit([make_event("a.p", 99)]))
    await asyncio.sleep(0)
    assert not blocked.done()
    assert routed.counters["backpressure_waits"] == 1
    runner = asyncio.create_task(routed.run())
    await asyncio.wait_for(blocked, 5)
    await settled(routed)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert routed.latest["a.p"].value == 99
    assert store.written == 11


async def test_router_stores_what_is_left_when_cancelled(store: Store) -> None:
    routed = Router(store)
    runner = asyncio.create_task(routed.run())
    await asyncio.sleep(0)  # let the router start waiting
    await routed.submit([make_event("a.p", 5)])
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert store.latest()["a.p"].value == 5


async def test_router_cancelled_while_storing_finishes_that_batch(store: Store) -> None:
    routed = Router(store)
    runner = asyncio.create_task(routed.run())
    await asyncio.sleep(0)  # let the router start waiting
    await routed.submit([make_event("a.p", value) for value in range(3)])
    for _ in range(2):  # the router wakes up; the batch goes to the writer thread
        await asyncio.sleep(0)
    assert store.written == 0
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert store.history_count("a.p") == 3
    assert routed.pending == 0


def two_hours_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's clock jumps two hours ahead."""
    later = time.time() + 7200
    monkeypatch.setattr("bridge.pipeline.store.writer.time.time", lambda: later)


async def test_retention_by_count_and_age(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    await store.write([make_event("old.p", 1)])
    await store.prune()
    two_hours_later(monkeypatch)
    await store.write([make_event("a.p", value, ts=now + value) for value in range(12)])
    await store.prune()
    assert store.history_count("a.p") == 5
    assert [event.value for event in store.history("a.p")] == [11, 10, 9, 8, 7]
    assert store.history_count("old.p") == 0
    assert store.latest()["old.p"].value == 1  # the last value outlives its history


async def test_restart_restores_latest(tmp_path: Path) -> None:
    path = tmp_path / "fb.db"
    first = Store(path, Retention(max_age=3600, max_rows=100))
    first.open()
    await first.write([make_event("a.p", 42)])
    first.close()
    second = Store(path, Retention(max_age=3600, max_rows=100))
    second.open()
    try:
        routed = Router(second)
        routed.restore()
        assert routed.latest["a.p"].value == 42
    finally:
        second.close()


async def test_last_values_survive_a_crash_between_updates_of_the_latest_table(
    tmp_path: Path
) -> None:
    path = tmp_path / "fb.db"
    first = Store(path, Retention(max_age=3600, max_rows=100))
    first.open()
    try:
        await first.write([make_event("a.p", 1), make_event("b.p", 1)])  # latest updated
        await first.write([make_event("a.p", 2)])  # too soon: only in history
        await first.write([make_event("c.p", 3)])
        with sqlite3.connect(path) as reader:
            assert dict(reader.execute("SELECT point, json_extract(body, '$.value') "
                                       "FROM latest")) == {"a.p": 1, "b.p": 1}
        assert {point: event.value for point, event in first.latest().items()} == {
            "a.p": 2, "b.p": 1, "c.p": 3}
        # Opened again without the first one closing (as after kill -9): same last values.
        second = Store(path, Retention(max_age=3600, max_rows=100))
        second.open()
        try:
            routed = Router(second)
            routed.restore()
            assert {point: event.value for point, event in routed.latest.items()} == {
                "a.p": 2, "b.p": 1, "c.p": 3}
        finally:
            second.close()
    finally:
        first.close()
    with sqlite3.connect(path) as reader:  # closing brought the table up to date
        assert dict(reader.execute("SELECT point, json_extract(body, '$.value') "
                                   "FROM latest")) == {"a.p": 2, "b.p": 1, "c.p": 3}


async def test_the_event_log_keeps_last_values_not_yet_in_the_latest_table(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Store, "LATEST_EVERY", 1e12)
    monkeypatch.setattr(Store, "PRUNE_EVERY", 1e12)
    store.replay = Replay(max_bytes=0, max_age=0)  # nothing kept for event streams
    await store.write([make_event("old.p", 7)])
    for value in range(5):
        await store.write([make_event("a.p", value)])
    assert store.latest()["old.p"].value == 7
    await store.prune()  # writes the latest table: now the log may go
    await store.write([make_event("a.p", 5)])
    with sqlite3.connect(store.path) as reader:
        assert reader.execute("SELECT MIN(seq) FROM batches").fetchone() > (1,)
    assert store.latest()["old.p"].value == 7


async def test_a_store_from_before_the_latest_mark_opens_with_its_last_values(
    tmp_path: Path
) -> None:
    path = tmp_path / "fb.db"
    first = Store(path, Retention(max_age=3600, max_rows=100))
    first.open()
    await first.write([make_event("a.p", 1)])
    first.close()
    with sqlite3.connect(path) as older:
        older.execute("DROP TABLE latest_mark")
    second = Store(path, Retention(max_age=3600, max_rows=100))
    second.open()
    try:
        assert second.latest()["a.p"].value == 1
        await second.write([make_event("a.p", 2)])
        assert second.latest()["a.p"].value == 2
    finally:
        second.close()


def test_unwritable_store_is_a_clear_error(tmp_path: Path) -> None:
    from bridge.errors import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("")
    broken = Store(blocker / "sub" / "fb.db", Retention(max_age=1, max_rows=1))
    with pytest.raises(StoreError, match="cannot open store"):
        broken.open()


async def test_a_commit_interval_gathers_batches_into_one_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    commit = store.commit

    async def counting(admission: Admission) -> None:
        writes.append(len(admission.events))
        await commit(admission)

    monkeypatch.setattr(store, "commit", counting)
    routed = Router(store, commit_interval=0.2)
    stored = asyncio.Event()
    routed.add_listener(lambda events: stored.set())
    task = asyncio.create_task(routed.run(), name="router")
    try:
        await routed.submit([make_event("a", 0.0)])
        await stored.wait()  # the first after a quiet spell is committed at once
        stored.clear()
        for value in range(1, 5):
            await routed.submit([make_event("a", float(value))])
        while routed.counters["events"] < 5:
            await stored.wait()
            stored.clear()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert writes == [1, 4]
    assert [event.value for event in store.history("a", newest_first=False)][-4:] == [
        1.0, 2.0, 3.0, 4.0]


async def test_a_batch_goes_to_the_writer_as_soon_as_it_is_free(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: no timer between commits; what arrives during one commit is the next."""
    writes: list[list[object]] = []
    entered = asyncio.Event()
    release = asyncio.Event()

    async def gated(admission: Admission) -> None:
        # A writer that takes no time once released: only the router's own waits remain.
        writes.append([event.value for event in admission.events])
        entered.set()
        await release.wait()

    monkeypatch.setattr(store, "commit", gated)
    # Built as the daemon builds it, with the configuration's defaults.
    routed = Router(store, commit_interval=StoreSection().commit_interval)
    task = asyncio.create_task(routed.run(), name="router")
    try:
        await routed.submit([make_event("a", 0.0)])
        await entered.wait()
        for value in (1.0, 2.0, 3.0):  # arrive while the first commit is in flight
            await routed.submit([make_event("a", value)])
        entered.clear()
        release.set()
        await entered.wait()
        entered.clear()
        # Straight after a commit: handed to the writer within a few turns of the loop, with
        # no timer to wait for.
        await routed.submit([make_event("a", 4.0)])
        for _ in range(10):
            if entered.is_set():
                break
            await asyncio.sleep(0)
        assert entered.is_set()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert writes == [[0.0], [1.0, 2.0, 3.0], [4.0]]


# --- history in chunks ------------------------------------------------------------------------


def crash_on_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """``close`` drops the connection as a killed process would: nothing is flushed."""
    monkeypatch.setattr(Store, "_close_writer", lambda self: self._writer.close())


async def test_history_reads_join_rows_and_events_still_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bridge.pipeline.store.history.CHUNK_EVENTS", 4)
    monkeypatch.setattr(Store, "LATEST_EVERY", 1e12)
    monkeypatch.setattr(Store, "PRUNE_EVERY", 1e12)
    store = Store(tmp_path / "fb.db", Retention(max_age=3600, max_rows=100))
    store.open()
    try:
        now = time.time()
        for value in range(10):  # two full chunks written, two events in memory
            await store.write([make_event("a.p", value, ts=now + value),
                               make_event("b.p", -value, ts=now + value)])
        with sqlite3.connect(store.path) as reader:
            assert reader.execute("SELECT point, count FROM history ORDER BY id").fetchall() == [
                ("a.p", 4), ("b.p", 4), ("a.p", 4), ("b.p", 4)]
        assert store.history_count("a.p") == 10
        assert [event.value for event in store.history("a.p")] == list(range(9, -1, -1))
        assert [event.value for event in store.history("a.p", newest_first=False, limit=5)] == [
            0, 1, 2, 3, 4]
        assert [event.value for event in store.history("a.p", limit=3)] == [9, 8, 7]
        assert [event.value for event in store.history(
            "a.p", since=now + 3, until=now + 8.5)] == [8, 7, 6, 5, 4, 3]
        await store.prune()  # writes what was in memory
        assert [event.value for event in store.history("b.p", newest_first=False)] == [
            -value for value in range(10)]
    finally:
        store.close()


async def test_history_in_memory_comes_back_from_the_event_log_after_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bridge.pipeline.store.history.CHUNK_EVENTS", 3)
    monkeypatch.setattr(Store, "LATEST_EVERY", 1e12)
    monkeypatch.setattr(Store, "PRUNE_EVERY", 1e12)
    path = tmp_path / "fb.db"
    first = Store(path, Retention(max_age=3600, max_rows=100))
    first.open()
    for value in range(7):  # two chunks of a.p written early, one event only in the log
        await first.write([make_event("a.p", value)])
    await first.write([make_event("b.p", 1)])
    crash_on_close(monkeypatch)
    first.close()
    monkeypatch.undo()
    second = Store(path, Retention(max_age=3600, max_rows=100))
    second.open()
    try:
        assert [event.value for event in second.history("a.p", newest_first=False)] == list(
            range(7))
        assert second.history_count("a.p") == 7
        assert [event.value for event in second.history("b.p")] == [1]
        await second.prune()
        second.close()
        second.open()
        assert second.history_count("a.p") == 7
    finally:
        second.close()


async def test_retention_by_count_trims_inside_a_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bridge.pipeline.store.history.CHUNK_EVENTS", 4)
    store = Store(tmp_path / "fb.db", Retention(max_age=3600, max_rows=6))
    store.open()
    try:
        for value in range(11):
            await store.write([make_event("a.p", value)])
        await store.prune()
        assert [event.value for event in store.history("a.p", newest_first=False)] == list(
            range(5, 11))
        assert store.history_count("a.p") == 6
    finally:
        store.close()
