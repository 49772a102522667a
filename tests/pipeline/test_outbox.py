"""The outbox in the store, its bound and policies, and the router in front of it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
from helpers.brokers import wait_until

from bridge.core.model import Event, Quality, new_event_id
from bridge.core.sink import EventSelector, OutboxRoute
from bridge.pipeline.admission import AdmissionGate, Batch
from bridge.pipeline.delivery import SinkOutbox
from bridge.pipeline.outbox import Admission, Outbox, OutboxLimits
from bridge.pipeline.router import Router
from bridge.pipeline.store import Replay, Retention, Store

SINK = "rabbit"


def make_event(point: str, value: float, source: str = "src") -> Event:
    """A good event."""
    now = time.time()
    return Event(id=new_event_id(), source=source, point=point, value=value, unit="u",
                 quality=Quality.GOOD, ts=now, received_at=now, protocol="modbus",
                 bridge="edge", tags={})


def route(sink: str = SINK, selector: Callable[[Event], bool] | None = None) -> OutboxRoute:
    """A route whose address is ``source/point``."""
    return OutboxRoute(sink, selector or EventSelector(),
                       lambda event: f"{event.source}/{event.point}")


def open_store(path: Path, limits: OutboxLimits, routes: Sequence[OutboxRoute]) -> Store:
    """An open store with an outbox."""
    store = Store(path, Retention(max_age=3600, max_rows=1000), Outbox(limits, routes))
    store.open()
    return store


def outbox_of(store: Store) -> Outbox:
    """The store's outbox."""
    assert store.outbox is not None
    return store.outbox


def rows(store: Store, sink: str = SINK) -> list[tuple[int, str, str, str, int, str]]:
    """``(seq, id, point, address, size, body)`` of every event waiting for ``sink``, read
    back from the file."""
    return [(row.seq, row.id, row.point, row.address, row.size, row.body)
            for row in store.outbox_rows(sink)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "fb.db", OutboxLimits(max_events=5, max_bytes=1 << 20),
                        [route()])
    yield opened
    opened.close()


async def test_events_enter_the_outbox_with_their_history(store: Store) -> None:
    events = [make_event("a.p", value) for value in range(3)]
    assert await store.write(events) == 3
    stored = rows(store)
    assert [row[1] for row in stored] == [event.id for event in events]
    assert [row[3] for row in stored] == ["src/a.p"] * 3
    assert [row[5] for row in stored] == [event.to_json() for event in events]
    assert [row[4] for row in stored] == [len(event.to_json().encode()) for event in events]
    depth = outbox_of(store).depths[SINK]
    assert (depth.events, depth.bytes) == (3, sum(row[4] for row in stored))
    assert store.history_count("a.p") == 3
    assert store.outbox_oldest(SINK) == pytest.approx(time.time(), abs=5)


async def test_each_sink_gets_the_events_its_filter_selects(tmp_path: Path) -> None:
    routes = [route("all"), route("boilers", EventSelector(points=["boiler.*"])),
              route("plant2", EventSelector(sources=["plant2"]))]
    store = open_store(tmp_path / "fb.db", OutboxLimits(100, 1 << 20), routes)
    try:
        await store.write([make_event("boiler.t", 1), make_event("pump.on", 2),
                           make_event("boiler.p", 3, source="plant2")])
        assert [row[2] for row in rows(store, "all")] == ["boiler.t", "pump.on", "boiler.p"]
        assert [row[2] for row in rows(store, "boilers")] == ["boiler.t", "boiler.p"]
        assert [row[2] for row in rows(store, "plant2")] == ["boiler.p"]
    finally:
        store.close()


async def test_block_stores_only_what_fits_until_a_sink_confirms(store: Store) -> None:
    events = [make_event("a.p", value) for value in range(8)]
    assert await store.write(events) == 5
    assert store.history_count("a.p") == 5  # history waits with the outbox: one transaction
    assert await store.write(events[5:]) == 0
    sink = SinkOutbox(store, SINK)
    first = await sink.read(0, 2)
    assert [row.id for row in first] == [event.id for event in events[:2]]
    assert await sink.confirm([row.seq for row in first]) == 2
    assert await store.write(events[5:]) == 2
    assert [row[1] for row in rows(store)] == [event.id for event in events[2:7]]


async def test_block_bound_in_bytes_lets_one_oversized_event_through(tmp_path: Path) -> None:
    size = len(make_event("a.p", 1.0).to_json().encode())
    store = open_store(tmp_path / "fb.db", OutboxLimits(100, 3 * size), [route()])
    try:
        assert await store.write([make_event("a.p", 1.0) for _ in range(5)]) == 3
    finally:
        store.close()
    tiny = open_store(tmp_path / "tiny.db", OutboxLimits(100, 10), [route()])
    try:
        # An empty outbox always takes one event, or it could never move again.
        assert await tiny.write([make_event("a.p", 1.0), make_event("a.p", 2.0)]) == 1
    finally:
        tiny.close()


async def test_drop_oldest_keeps_the_newest_and_counts_the_rest(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fb.db", OutboxLimits(5, 1 << 20, drop_oldest=True),
                       [route()])
    try:
        events = [make_event("a.p", value) for value in range(8)]
        assert await store.write(events[:4]) == 4
        assert await store.write(events[4:]) == 4
        assert [row[1] for row in rows(store)] == [event.id for event in events[3:]]
        depth = outbox_of(store).depths[SINK]
        assert (depth.events, depth.dropped) == (5, 3)
        assert depth.bytes == sum(row[4] for row in rows(store))
        assert store.history_count("a.p") == 8  # history keeps them all
    finally:
        store.close()


async def test_drop_oldest_drops_from_the_batch_itself_when_it_alone_overflows(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path / "fb.db", OutboxLimits(5, 1 << 20, drop_oldest=True),
                       [route()])
    try:
        await store.write([make_event("a.p", 0)])
        sink = SinkOutbox(store, SINK)
        assert len(await sink.read(0, 10)) == 1  # the sink follows the feed from here
        events = [make_event("a.p", value) for value in range(1, 9)]
        assert await store.write(events) == 8
        kept = [event.id for event in events[3:]]
        assert [row[1] for row in rows(store)] == kept
        depth = outbox_of(store).depths[SINK]
        assert (depth.events, depth.dropped) == (5, 4)
        assert depth.bytes == sum(row[4] for row in rows(store))
        assert [row.id for row in sink.take(1, 10) or []] == kept
    finally:
        store.close()


async def test_selectors_and_addresses_run_on_the_event_loop_not_in_the_transaction(
    tmp_path: Path,
) -> None:
    threads: list[str] = []

    def selects(event: Event) -> bool:
        threads.append(threading.current_thread().name)
        return True

    def address(event: Event) -> str:
        threads.append(threading.current_thread().name)
        return event.point

    store = open_store(tmp_path / "fb.db", OutboxLimits(3, 1 << 20),
                       [OutboxRoute(SINK, selects, address)])
    try:
        sink = SinkOutbox(store, SINK)
        assert await sink.read(0, 10) == []  # the sink follows the feed from here
        threads.clear()
        assert await store.write([make_event("a.p", value) for value in range(5)]) == 3
        loop = threading.current_thread().name
        assert threads
        assert set(threads) == {loop}
        assert [row.address for row in sink.take(0, 10) or []] == ["a.p"] * 3
    finally:
        store.close()


async def test_confirming_a_dropped_row_keeps_the_depth_exact(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fb.db", OutboxLimits(2, 1 << 20, drop_oldest=True),
                       [route()])
    try:
        await store.write([make_event("a.p", 1)])
        sink = SinkOutbox(store, SINK)
        (in_flight,) = await sink.read(0, 10)
        await store.write([make_event("a.p", 2), make_event("a.p", 3)])  # drops value 1
        assert await sink.confirm([in_flight.seq]) == 0
        depth = outbox_of(store).depths[SINK]
        assert (depth.events, depth.dropped) == (2, 1)
        assert depth.bytes == sum(row[4] for row in rows(store))
    finally:
        store.close()


async def test_outbox_survives_a_restart_and_never_reuses_a_seq(tmp_path: Path) -> None:
    path = tmp_path / "fb.db"
    limits = OutboxLimits(100, 1 << 20)
    store = open_store(path, limits, [route()])
    await store.write([make_event("a.p", value) for value in range(3)])
    store.close()

    store = open_store(path, limits, [route()])
    try:
        assert outbox_of(store).depths[SINK].events == 3
        sink = SinkOutbox(store, SINK)
        waiting = await sink.read(0, 10)
        assert [row.seq for row in waiting] == [1, 2, 3]
        await sink.confirm([row.seq for row in waiting])
    finally:
        store.close()

    store = open_store(path, limits, [route()])
    try:
        await store.write([make_event("a.p", 9)])
        # A sink's cursor only moves forward: an emptied table must not start over at 1.
        assert [row[0] for row in rows(store)] == [4]
    finally:
        store.close()


async def test_rows_of_an_unconfigured_sink_are_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "fb.db"
    store = open_store(path, OutboxLimits(100, 1 << 20), [route("old")])
    kept = make_event("a.p", 1)
    await store.write([kept])
    store.close()
    store = open_store(path, OutboxLimits(100, 1 << 20), [route()])
    try:
        assert "holds 1 events for sink old" in caplog.text
        store.replay = Replay(max_bytes=0, max_age=0)  # nothing kept for event streams
        await store.write([make_event("a.p", value) for value in range(2, 5)])
        await store.prune()
    finally:
        store.close()
    store = open_store(path, OutboxLimits(100, 1 << 20), [route("old")])
    try:
        assert rows(store, "old")[0][1] == kept.id
    finally:
        store.close()


class OutboxAck:
    """Records, when accepted, whether its events were in the outbox already."""

    def __init__(self, store: Store, events: Sequence[Event]) -> None:
        self.store = store
        self.ids = {event.id for event in events}
        self.accepted_with_rows: bool | None = None

    async def accept(self) -> None:
        stored = {row[1] for row in rows(self.store)}
        self.accepted_with_rows = self.ids <= stored

    async def reject(self, reason: str) -> None:
        raise AssertionError(f"unexpected reject: {reason}")


@pytest.fixture
async def router(store: Store) -> AsyncIterator[Router]:
    routed = Router(store, max_pending=100)
    task = asyncio.create_task(routed.run(), name="router")
    yield routed
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_upstream_ack_waits_for_the_outbox_and_blocks_while_it_is_full(
    router: Router, store: Store
) -> None:
    batches = [[make_event("a.p", 2 * index), make_event("a.p", 2 * index + 1)]
               for index in range(4)]
    acks = [OutboxAck(store, batch) for batch in batches]
    for batch, ack in zip(batches, acks, strict=True):
        await router.submit(batch, [(ack, None)])
    # Room for 5 of 8: two batches stored and acknowledged, the third half stored and held.
    await wait_until(lambda: router.counters["outbox_full_waits"] == 1,
                     what="the router to block")
    assert [ack.accepted_with_rows for ack in acks] == [True, True, None, None]
    assert router.pending == 3
    assert [event.value for event in store.history("a.p", newest_first=False)] == [0, 1, 2, 3, 4]

    sink = SinkOutbox(store, SINK)
    await sink.confirm([row.seq for row in await sink.read(0, 3)])
    await wait_until(lambda: acks[3].accepted_with_rows is not None,
                     what="the last acknowledgement")
    assert [ack.accepted_with_rows for ack in acks] == [True] * 4
    assert [event.value for event in store.history("a.p", newest_first=False)] == list(range(8))
    assert router.pending == 0


async def test_the_gate_holds_a_full_sinks_points_in_order_until_a_sink_made_room(
    tmp_path: Path,
) -> None:
    routes = [route("a", EventSelector(points=["a.*"])), route("b", EventSelector(points=["b.*"]))]
    store = open_store(tmp_path / "fb.db", OutboxLimits(5, 1 << 20), routes)
    woken: list[int] = []
    gate = AdmissionGate(store.outbox, max_held=2, wake=lambda: woken.append(gate.generation))
    try:
        first = Batch([*(make_event("a.p", value) for value in range(6)),
                       make_event("b.p", 0)], [])
        admission = gate.admit(first.events, closing=False)
        assert (admission.taken, admission.held) == ([0, 1, 2, 3, 4, 6], [5])
        assert admission.addresses == [("src/a.p",)] * 5 + [("src/b.p",)]
        await store.commit(admission)
        stored, _ = gate.hold_back([first], admission, gate.generation)
        assert [event.value for event in stored] == [0, 1, 2, 3, 4, 0]
        assert (gate.held_events, gate.source_has_room("src")) == (1, True)
        # A later event of a held point waits behind it, whatever the room of its sink.
        later = gate.admit([make_event("a.p", 6), make_event("b.p", 1)], closing=False)
        assert (later.taken, later.held) == ([1], [0])
        assert not gate.retry_due(closing=False)
        assert gate.retry_due(closing=True)
        outbox_of(store).made_room()
        assert woken == [1]
        assert gate.retry_due(closing=False)
        assert [list(batch.events) for batch in gate.release()] == [[first.events[5]]]
        assert not gate.holding
        # With nothing held back, room made wakes nobody (an idle router stays asleep).
        outbox_of(store).made_room()
        assert woken == [1]
    finally:
        store.close()


async def test_room_made_while_the_batch_that_is_held_commits_still_retries_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = SinkOutbox(store, SINK)
    commit = store.commit
    confirmed: list[int] = []

    async def confirming_meanwhile(admission: Admission) -> None:
        await commit(admission)
        if not confirmed:  # the sink confirms before the router saw what it held back
            confirmed.extend(row.seq for row in await sink.read(0, 5))
            await sink.confirm(confirmed)

    monkeypatch.setattr(store, "commit", confirming_meanwhile)
    routed = Router(store)
    runner = asyncio.create_task(routed.run())
    try:
        await routed.submit([make_event("a.p", value) for value in range(7)])
        await wait_until(lambda: store.history_count("a.p") == 7 and routed.pending == 0,
                         what="the held events to be stored")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert (len(confirmed), routed.counters["outbox_full_waits"]) == (5, 1)


async def test_router_stores_past_the_bound_when_it_stops(store: Store) -> None:
    routed = Router(store)
    runner = asyncio.create_task(routed.run())
    await routed.submit([make_event("a.p", value) for value in range(7)])
    await wait_until(lambda: routed.counters["outbox_full_waits"] == 1,
                     what="the router to block")
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert store.history_count("a.p") == 7
    assert outbox_of(store).depths[SINK].events == 7


async def test_a_sink_that_caught_up_takes_new_rows_from_memory(store: Store) -> None:
    sink = SinkOutbox(store, SINK)
    assert sink.take(0, 10) is None  # nothing read yet: the feed cannot tell
    events = [make_event("a.p", value) for value in range(3)]
    await store.write(events[:1])
    (first,) = await sink.read(0, 10)  # short: caught up, the feed follows from here
    await store.write(events[1:])
    taken = sink.take(first.seq, 10)
    assert taken is not None
    assert [row.id for row in taken] == [event.id for event in events[1:]]
    assert [(row.seq, row.id, row.address, row.size, row.body) for row in taken] == [
        (seq, event_id, address, size, body)
        for seq, event_id, _, address, size, body in rows(store)[1:]]
    assert sink.take(taken[-1].seq, 10) == []
    # A new connection starts from the oldest row: only the table knows what came before.
    assert sink.take(0, 10) is None
    assert [row.id for row in await sink.read(0, 10)] == [event.id for event in events]


async def test_a_full_read_does_not_let_the_feed_skip_rows(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fb.db", OutboxLimits(100, 1 << 20), [route()])
    try:
        sink = SinkOutbox(store, SINK)
        events = [make_event("a.p", value) for value in range(6)]
        await store.write(events[:4])
        page = await sink.read(0, 2)  # not the end of the table: no feed yet
        assert sink.take(page[-1].seq, 10) is None
        rest = await sink.read(page[-1].seq, 10)
        await store.write(events[4:])
        taken = sink.take(rest[-1].seq, 10)
        assert taken is not None
        assert [row.id for row in [*page, *rest, *taken]] == [event.id for event in events]
    finally:
        store.close()


async def test_the_feed_falls_back_to_the_table_after_it_overflowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bridge.pipeline.outbox.FEED_ROWS", 3)
    store = open_store(tmp_path / "fb.db", OutboxLimits(100, 1 << 20), [route()])
    try:
        sink = SinkOutbox(store, SINK)
        assert await sink.read(0, 10) == []
        events = [make_event("a.p", value) for value in range(5)]
        await store.write(events[:2])
        await store.write(events[2:])  # 5 rows waiting: more than the feed holds
        assert sink.take(0, 10) is None
        assert [row.id for row in await sink.read(0, 10)] == [event.id for event in events]
    finally:
        store.close()


async def test_rows_dropped_by_drop_oldest_leave_the_feed_too(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fb.db", OutboxLimits(3, 1 << 20, drop_oldest=True),
                       [route()])
    try:
        sink = SinkOutbox(store, SINK)
        assert await sink.read(0, 10) == []
        events = [make_event("a.p", value) for value in range(5)]
        await store.write(events[:2])
        await store.write(events[2:])  # drops the two oldest
        taken = sink.take(0, 10)
        assert taken is not None
        assert [row.id for row in taken] == [row[1] for row in rows(store)]
        assert [row.id for row in taken] == [event.id for event in events[2:]]
    finally:
        store.close()
