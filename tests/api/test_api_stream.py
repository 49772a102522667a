"""The live event stream (``GET /v1/events/stream``) against a real server on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from helpers.sse import SETTLE, Bridge, BridgeFactory, SseReader, make_event, points, write_config

from bridge.api.app import create_app
from bridge.api.event_hub import CHUNK_BYTES, StreamSettings, chunks, event_frame
from bridge.api.server import ApiServer
from bridge.core.model import Event, Quality, new_event_id
from bridge.pipeline.outbox import Admission
from bridge.pipeline.store import Retention, Store
from bridge.registry import load_config
from bridge.runtime import Runtime

READ_KEY = "read-key-0123456789abcdef"


# --- a bridge without sources, fed through its router -------------------------------------------


@pytest.fixture
async def start_bridge(tmp_path: Path) -> AsyncIterator[BridgeFactory]:
    """Start a bridge with the given stream settings (and extra ``api:`` YAML)."""
    started: list[Bridge] = []

    async def start(settings: StreamSettings | None = None, api: str = "") -> Bridge:
        runtime = Runtime(load_config(write_config(tmp_path, api)))
        runtime.store.open()
        router = asyncio.create_task(runtime.router.run(), name="router")
        server = ApiServer(runtime.facade(), streams=settings)
        await server.start()
        bridge = Bridge(runtime, server, router)
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        await bridge.stop()


@pytest.fixture
async def bridge(start_bridge: BridgeFactory) -> Bridge:
    """A bridge with the default stream settings."""
    return await start_bridge()


# --- reading Server-Sent Events -----------------------------------------------------------------


STREAM = "/v1/events/stream"


def client(bridge: Bridge) -> httpx.AsyncClient:
    """An HTTP client for the bridge, with a read timeout for quiet streams."""
    return httpx.AsyncClient(base_url=bridge.url, timeout=httpx.Timeout(SETTLE))


# --- tests --------------------------------------------------------------------------------------


async def test_stream_sends_each_stored_event_as_it_is_stored(bridge: Bridge) -> None:
    events = points(3)
    async with client(bridge) as http, http.stream("GET", STREAM) as response:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert bridge.hub_clients == 1
        reader = SseReader(response)
        await bridge.feed(events[:2])
        await bridge.feed(events[2:])
        received = await reader.events(3)
    assert [message.id for message in received] == [event.id for event in events]
    assert {message.event for message in received} == {"event"}
    assert [message.json() for message in received] == [event.to_dict() for event in events]
    assert received[0].data == events[0].to_json()
    await bridge.wait_for_clients(0)


FILTER_EVENTS = [
    make_event("boiler.supply_temp", 61.5, tags={"area": "north", "kind": "temperature"}),
    make_event("boiler.alarm", None, quality=Quality.BAD, tags={"area": "north",
                                                                "kind": "alarm"}),
    make_event("meter.energy", 12.0, source="meter-bus", quality=Quality.UNCERTAIN,
               tags={"area": "south"}),
    make_event("boiler.return_temp", 44.0, tags={"area": "north", "kind": "temperature"}),
]


@pytest.mark.parametrize(("query", "expected", "last"), [
    ("source=meter-bus", ["meter.energy"],
     make_event("meter.x", source="meter-bus")),
    ("prefix=boiler.", ["boiler.supply_temp", "boiler.alarm", "boiler.return_temp"],
     make_event("boiler.x")),
    ("tag=kind=temperature", ["boiler.supply_temp", "boiler.return_temp"],
     make_event("x", tags={"kind": "temperature"})),
    ("tag=area=north&tag=kind=alarm", ["boiler.alarm"],
     make_event("x", tags={"area": "north", "kind": "alarm"})),
    ("tag=kind", ["boiler.supply_temp", "boiler.alarm", "boiler.return_temp"],
     make_event("x", tags={"kind": "any"})),
    ("quality=bad&quality=uncertain", ["boiler.alarm", "meter.energy"],
     make_event("x", quality=Quality.BAD)),
    ("source=plc1&quality=good&prefix=boiler.r", ["boiler.return_temp"],
     make_event("boiler.rx")),
])
async def test_stream_filters(bridge: Bridge, query: str, expected: list[str],
                              last: Event) -> None:
    async with client(bridge) as http, http.stream("GET", f"{STREAM}?{query}") as response:
        reader = SseReader(response)
        await bridge.feed(FILTER_EVENTS)
        # An event the filter matches, fed last: everything before it has been filtered.
        await bridge.feed([last])
        received = await reader.until(last.id)
    assert [message.json()["point"] for message in received[:-1]] == expected


@pytest.mark.parametrize("query", ["tag==x", "quality=none", "last_event_id=" + "x" * 201])
async def test_stream_rejects_bad_parameters(bridge: Bridge, query: str) -> None:
    async with client(bridge) as http:
        response = await http.get(f"{STREAM}?{query}")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


async def test_resume_replays_what_was_stored_after_the_last_event_id(bridge: Bridge) -> None:
    events = points(5)
    await bridge.feed(events[:3])
    await bridge.feed(events[3:])
    later = make_event("boiler.later")
    headers = {"Last-Event-ID": events[1].id}
    async with client(bridge) as http, http.stream("GET", STREAM, headers=headers) as response:
        reader = SseReader(response)
        replayed = await reader.events(3)
        await bridge.feed([later])
        live = await reader.events(1)
    assert [message.id for message in replayed] == [event.id for event in events[2:]]
    assert [message.json() for message in replayed] == [event.to_dict() for event in events[2:]]
    assert [message.id for message in live] == [later.id]


async def test_resume_by_query_and_the_header_wins(bridge: Bridge) -> None:
    events = points(4)
    await bridge.feed(events)
    last = make_event("boiler.last")
    async with client(bridge) as http:
        async with http.stream("GET", f"{STREAM}?last_event_id={events[0].id}") as response:
            reader = SseReader(response)
            assert [message.id for message in await reader.events(3)] == [
                event.id for event in events[1:]]
        # EventSource sends the header on reconnect; the query is the one it started with.
        async with http.stream("GET", f"{STREAM}?last_event_id={events[0].id}",
                               headers={"Last-Event-ID": events[2].id}) as response:
            reader = SseReader(response)
            await bridge.feed([last])
            received = await reader.until(last.id)
    assert [message.id for message in received] == [events[3].id, last.id]


async def test_resume_applies_the_filters_to_the_replay(bridge: Bridge) -> None:
    await bridge.feed([first := make_event("other.start")])
    await bridge.feed(FILTER_EVENTS)
    last = make_event("boiler.last", tags={"kind": "temperature"})
    async with client(bridge) as http, http.stream(
        "GET", f"{STREAM}?tag=kind=temperature&last_event_id={first.id}"
    ) as response:
        reader = SseReader(response)
        await bridge.feed([last])
        received = await reader.until(last.id)
    assert [message.json()["point"] for message in received] == [
        "boiler.supply_temp", "boiler.return_temp", "boiler.last"]


async def test_resume_while_events_are_stored_has_no_gap_and_no_duplicate(
    start_bridge: BridgeFactory,
) -> None:
    # Small replay pages, so the replay interleaves with the router storing and fanning out.
    bridge = await start_bridge(StreamSettings(replay_page=7))
    first = make_event("boiler.first")
    await bridge.feed([first])
    await bridge.feed(points(50, "boiler.before."))

    async def produce() -> None:
        for batch in range(60):
            await bridge.runtime.router.submit(points(5, f"boiler.during{batch}."))
            await asyncio.sleep(0)  # let the stream's writer interleave

    last = make_event("boiler.last")
    async with client(bridge) as http, http.stream(
        "GET", STREAM, headers={"Last-Event-ID": first.id}
    ) as response:
        producer = asyncio.create_task(produce(), name="test.produce")
        reader = SseReader(response)
        await producer
        await bridge.feed([last])
        received = await reader.until(last.id)
    store = bridge.runtime.store
    start = store.history_seq(first.id)
    assert start is not None
    stored = [event_id for _, event_id, _, _ in store.history_after(start, limit=10_000)]
    ids = [message.id for message in received]
    assert len(ids) == len(set(ids)), "duplicates"
    assert ids == stored
    assert len(ids) == 50 + 300 + 1


async def test_an_event_committed_before_the_replay_but_fanned_out_after_it_comes_once(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = bridge.runtime.store
    first, late, last = make_event("boiler.first"), make_event("boiler.late"), make_event("x")
    await bridge.feed([first])
    committed, release = asyncio.Event(), asyncio.Event()
    commit = store.commit

    async def store_then_wait(admission: Admission) -> None:
        await commit(admission)
        if admission.events[0].id == late.id:
            # Stored, but the router has not handed the batch to its listeners yet.
            committed.set()
            await release.wait()

    monkeypatch.setattr(store, "commit", store_then_wait)
    await bridge.runtime.router.submit([late])
    async with asyncio.timeout(SETTLE):
        await committed.wait()
    async with client(bridge) as http, http.stream(
        "GET", STREAM, headers={"Last-Event-ID": first.id}
    ) as response:
        reader = SseReader(response)
        assert [message.id for message in await reader.events(1)] == [late.id]  # replayed
        release.set()  # now the router fans it out to the stream too
        await bridge.feed([last])
        assert [message.id for message in await reader.until(last.id)] == [last.id]


async def test_an_unknown_last_event_id_is_a_warning_then_live_events(bridge: Bridge) -> None:
    await bridge.feed(points(2))
    unknown = new_event_id()
    live = make_event("boiler.live")
    async with client(bridge) as http, http.stream(
        "GET", STREAM, headers={"Last-Event-ID": unknown}
    ) as response:
        reader = SseReader(response)
        warning = (await reader.events(1))[0]
        await bridge.feed([live])
        received = await reader.events(1)
    assert warning.event == "warning"
    assert warning.id is None
    body = warning.json()
    assert body["code"] == "unknown_last_event_id"
    assert body["last_event_id"] == unknown
    assert unknown in body["message"]
    assert body["hint"]
    assert [message.id for message in received] == [live.id]


async def test_keep_alive_comments_on_a_quiet_stream(start_bridge: BridgeFactory) -> None:
    bridge = await start_bridge(StreamSettings(keepalive=0.05))
    async with client(bridge) as http, http.stream("GET", STREAM) as response:
        reader = SseReader(response)
        comments = [await reader.next(), await reader.next()]
    assert [message.comment if message else None for message in comments] == [
        "keep-alive", "keep-alive"]


async def test_a_slow_consumer_is_dropped_with_a_reason_and_can_resume(
    start_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await start_bridge(StreamSettings(queue=5))
    head = points(2, "boiler.head.")
    burst = points(20, "boiler.burst.")
    async with client(bridge) as http:
        async with http.stream("GET", STREAM) as response:
            reader = SseReader(response)
            await bridge.feed(head)
            assert [message.id for message in await reader.events(2)] == [
                event.id for event in head]
            # One stored batch larger than the client's queue: it cannot keep up.
            with caplog.at_level(logging.WARNING, logger="bridge.api.event_hub"):
                await bridge.feed(burst)
                rest = await reader.rest()
        assert [message.event for message in rest] == ["error"]
        error = rest[0].json()
        assert error["code"] == "slow_consumer"
        assert error["last_event_id"] == head[-1].id
        assert "Last-Event-ID" in error["hint"]
        assert "fell 5 events behind" in caplog.text
        await bridge.wait_for_clients(0)
        assert bridge.server.context.hub.counters["ended_slow_consumer"] == 1
        exposition = (await http.get("/metrics")).text
        assert 'fieldbridge_api_streams_ended_total{reason="slow_consumer"} 1' in exposition
        assert "fieldbridge_api_stream_clients 0" in exposition
        assert "fieldbridge_api_streams_total 1" in exposition
        # It resumes from the store: nothing is lost. (The queue bound covers the replay
        # too, so the client reads while the burst is replayed, not all at once.)
        async with http.stream("GET", STREAM,
                               headers={"Last-Event-ID": error["last_event_id"]}) as response:
            replayed = await SseReader(response).events(20)
    assert [message.id for message in replayed] == [event.id for event in burst]


async def stalled_client(
    bridge: Bridge, streams: int = 1
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream client that sends its request and then reads nothing; ``streams``: how many
    streams are served once it is."""
    address = ("127.0.0.1", bridge.server.port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(f"GET {STREAM} HTTP/1.1\r\nHost: bridge\r\n\r\n".encode())
    await writer.drain()
    await bridge.wait_for_clients(streams)
    return reader, writer


async def test_a_client_that_reads_nothing_is_dropped(
    start_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await start_bridge(StreamSettings(queue=2_000, send_timeout=0.2))
    reader, writer = await stalled_client(bridge)
    try:
        fed = 0
        hub = bridge.server.context.hub
        with caplog.at_level(logging.WARNING, logger="bridge.api.event_hub"):
            async with asyncio.timeout(SETTLE * 3):
                # Until the socket's buffers are full and the stream stops taking events:
                # its queue overflowed, or a write waited longer than send_timeout.
                while hub.subscriptions:
                    await bridge.feed(points(200, f"boiler.b{fed}."))
                    fed += 1
            await bridge.wait_for_clients(0)
        # A queue that overflows while a write is blocked drops the client at once.
        assert ("read nothing for 0.2 s" in caplog.text
                or "fell 2000 events behind" in caplog.text), caplog.text
        assert hub.counters["ended_stalled"] + hub.counters["ended_slow_consumer"] == 1
        # The server dropped the connection without ending the response: it is reset (or,
        # had the reset not arrived yet, what the client reads ends without the last chunk).
        async with asyncio.timeout(SETTLE):
            try:
                received = await reader.read()
            except ConnectionResetError:
                received = None
        if received is not None:
            assert received.startswith(b"HTTP/1.1 200 OK\r\n")
            assert not received.endswith(b"0\r\n\r\n")
        assert fed > 1
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_server_stop_ends_streams_promptly(bridge: Bridge) -> None:
    event = make_event("boiler.one")
    async with client(bridge) as http, http.stream("GET", STREAM) as first, http.stream(
        "GET", f"{STREAM}?prefix=boiler."
    ) as second:
        readers = [SseReader(first), SseReader(second)]
        await bridge.feed([event])
        for reader in readers:
            assert [message.id for message in await reader.events(1)] == [event.id]
        started = time.monotonic()
        await bridge.server.stop()
        elapsed = time.monotonic() - started
        # The streams end cleanly (the last chunk arrives): no error on the client.
        assert [await reader.rest() for reader in readers] == [[], []]
    # Below uvicorn's graceful timeout (1 s): the streams were not waited for.
    assert elapsed < 1.0
    assert bridge.hub_clients == 0


EVENT_BYTES = len(make_event("boiler.s0.0").to_json())
BLOCKING_BYTES = 6 * 2**20


async def test_server_stop_does_not_wait_for_a_client_that_reads_nothing(
    start_bridge: BridgeFactory,
) -> None:
    bridge = await start_bridge(StreamSettings(queue=1_000_000))
    _, writer = await stalled_client(bridge)
    try:
        # More than the socket buffers of both ends can hold (Linux caps a TCP send buffer
        # at 4 MiB by default): the server's writes are blocked now.
        for batch in range(BLOCKING_BYTES // (1_000 * EVENT_BYTES) + 1):
            await bridge.feed(points(1_000, f"boiler.s{batch}."))
        started = time.monotonic()
        await bridge.server.stop()
        assert time.monotonic() - started < 1.0
        assert bridge.hub_clients == 0
    finally:
        writer.close()
        await writer.wait_closed()


async def test_streams_need_the_read_scope(start_bridge: BridgeFactory) -> None:
    digest = hashlib.sha256(READ_KEY.encode()).hexdigest()
    bridge = await start_bridge(api=f"  keys:\n    - {{name: viewer, sha256: {digest}, "
                                "scopes: [read]}\n")
    event = make_event("boiler.one")
    async with client(bridge) as http:
        refused = await http.get(STREAM)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthenticated"
        async with http.stream("GET", STREAM, headers={"X-API-Key": READ_KEY}) as response:
            reader = SseReader(response)
            await bridge.feed([event])
            assert [message.id for message in await reader.events(1)] == [event.id]


async def test_no_new_stream_once_the_api_is_closing(tmp_path: Path) -> None:
    runtime = Runtime(load_config(write_config(tmp_path)))
    app = create_app(runtime.facade())
    app.state.fieldbridge.close()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bridge.test") as http:
        response = await http.get(STREAM)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutting_down"


# --- the store queries behind resuming ----------------------------------------------------------


async def test_store_finds_an_event_by_id_and_reads_history_after_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "fb.db", Retention(max_age=3600, max_rows=100))
    store.open()
    try:
        events = points(4)
        await store.write(events)
        seqs = [store.history_seq(event.id) for event in events]
        assert all(seq is not None for seq in seqs)
        assert seqs == sorted(seqs)
        assert store.history_seq(new_event_id()) is None
        first = seqs[0]
        assert first is not None
        rows = store.history_after(first, limit=2)
        assert [(event_id, point) for _, event_id, point, _ in rows] == [
            (events[1].id, events[1].point), (events[2].id, events[2].point)]
        assert [json.loads(body) for _, _, _, body in rows] == [
            events[1].to_dict(), events[2].to_dict()]
        later = points(2)
        await store.write(later)  # a second batch of the event log
        assert store.history_seq(later[1].id) == seqs[-1] + 2
        assert [row[1] for row in store.history_after(seqs[-1], limit=10)] == [
            event.id for event in later]
    finally:
        store.close()


def established_server_connections(port: int) -> int:
    """The server's TCP connections on ``port`` that are still open, from ``/proc/net/tcp``."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] != "0A":  # 0A: the listening socket itself
            count += 1
    return count


async def test_a_dropped_client_is_disconnected_on_the_wire_and_logged_once(
    start_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = await start_bridge(StreamSettings(queue=1_000_000, send_timeout=0.2))
    assert bridge.server.port is not None
    clients = [await stalled_client(bridge, count) for count in (1, 2, 3)]
    try:
        hub = bridge.server.context.hub
        with caplog.at_level(logging.WARNING):
            fed = 0
            async with asyncio.timeout(SETTLE * 3):
                while hub.subscriptions:
                    await bridge.feed(points(200, f"boiler.d{fed}."))
                    fed += 1
            await bridge.wait_for_clients(0)
        # Before, the sockets stayed open with megabytes queued for clients that never read,
        # and each drop logged an ERROR from uvicorn.
        assert established_server_connections(bridge.server.port) == 0
        drops = [record for record in caplog.records if "dropped" in record.getMessage()]
        assert len(drops) == 3
        assert all(record.levelno == logging.WARNING for record in drops)
        assert all("127.0.0.1:" in record.getMessage() for record in drops)
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    finally:
        for _, writer in clients:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_a_client_past_its_byte_bound_is_dropped_at_once(
    start_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Large values to a client that reads nothing: it is dropped as soon as 256 KiB wait
    for it (``api.stream_max_bytes``), long before ``send_timeout`` (30 s here). Before, it
    held every frame until the timeout: 256 such clients took the daemon to 1.96 GB."""
    bridge = await start_bridge(api="  stream_max_bytes: 256KiB\n")
    assert bridge.server.context.streams.max_bytes == 256 * 1024
    assert bridge.server.context.streams.send_timeout == 30.0
    _, writer = await stalled_client(bridge)
    try:
        hub = bridge.server.context.hub
        fed = 0
        with caplog.at_level(logging.WARNING, logger="bridge.api.sse_response"):
            async with asyncio.timeout(SETTLE):
                while hub.subscriptions:
                    await bridge.feed([make_event(f"boiler.big{fed}", "x" * 60_000)])
                    fed += 1
                await bridge.wait_for_clients(0)
        # The kernel's buffers take some megabytes first; then 256 KiB more at most.
        assert fed * 60_000 < 16 * 2**20
        assert hub.counters["ended_slow_consumer"] == 1
        assert "fell 262,144 bytes behind" in caplog.text
        async with client(bridge) as http:
            exposition = (await http.get("/metrics")).text
        assert 'fieldbridge_api_streams_ended_total{reason="slow_consumer"} 1' in exposition
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def test_frames_are_written_in_bounded_chunks_without_copying_a_large_one() -> None:
    small = [event_frame(f"s{index}", "x" * 1_000) for index in range(200)]
    large = event_frame("large", "y" * 200_000)
    writes = chunks([*small[:100], large, *small[100:]])
    assert b"".join(writes) == b"".join(frame.data for frame in [*small[:100], large,
                                                                  *small[100:]])
    assert any(write is large.data for write in writes)  # written as it is, not copied
    assert all(len(write) < CHUNK_BYTES + 2_000 for write in writes if write is not large.data)
