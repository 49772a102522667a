"""Live event streams: stored events fanned out to Server-Sent Events clients.

One ``EventHub`` per API subscribes to the runtime's stored batches (only while a client is
connected) and hands each to every client's ``Subscription``, which keeps the events its
filter matches in a bounded buffer. An event is serialized once per batch, however many
clients take it. ``bridge.api.sse_response`` writes a subscription to the client.

A client that resumes (``Last-Event-ID``) is subscribed first, so live events are buffered
while the store's history after that id is replayed; then the buffer is sent. This relies on
the router calling its listeners after each batch is committed, one batch at a time, in store
order. An event stored before the subscription is replayed; one stored after it is buffered;
one committed before but fanned out after is found by both: the replay stops at the first
event already buffered, and live events the replay already sent are skipped. Those come
first (at most the batch the router was fanning out), so once a live event that was not
replayed arrives, no later one can have been.

A client that cannot keep up is dropped, never allowed to grow memory: when its buffer holds
``queue`` events or ``max_bytes`` of frames, the buffer is freed, the client gets an ``error``
message (``slow_consumer``, with the last id it was sent, to resume from) and the stream ends;
a client whose socket is blocked at that moment is disconnected at once. A client that reads
nothing at all blocks the socket; a send that does not finish within ``send_timeout`` ends the
stream too. Frames are shared: clients buffer the same ``SseMessage`` objects, and a client's
frames are written in chunks of at most ``CHUNK_BYTES`` (a large frame alone, not copied), so
no client holds a copy of its whole backlog.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bridge.core.counters import (
    ENDED_CLOSING,
    ENDED_DISCONNECTED,
    ENDED_FINISHED,
    ENDED_SLOW_CONSUMER,
    ENDED_STALLED,
    EVENTS,
    STREAMS,
    CounterSpec,
    Counts,
)
from bridge.core.model import Event
from bridge.facade import ApiFacade, TagFilter

EndReason = Literal["slow_consumer", "stalled", "closing", "disconnected", "finished"]
"""Why a subscription ended: the client fell behind, read nothing for ``send_timeout``, the
server stops, the client went away, or the response ended for another reason (a store
error)."""

ENDED: dict[EndReason, CounterSpec] = {
    "slow_consumer": ENDED_SLOW_CONSUMER, "stalled": ENDED_STALLED, "closing": ENDED_CLOSING,
    "disconnected": ENDED_DISCONNECTED, "finished": ENDED_FINISHED}
"""The counter of the subscriptions that ended, by reason."""

KEEP_ALIVE = b": keep-alive\n\n"
"""An SSE comment: keeps proxies and idle timeouts from closing a quiet stream."""

MAX_STREAM_BYTES = 4 * 1024 * 1024
"""The default of ``api.stream_max_bytes``: bytes of frames one client may fall behind."""

CHUNK_BYTES = 64 * 1024
"""Frames are joined into one write up to this size; a larger frame is written alone."""


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """Limits of the event streams (not configurable in the file; tests tighten them)."""

    queue: int = 10_000
    """Events buffered per client before it counts as a slow consumer and is dropped."""
    max_bytes: int = MAX_STREAM_BYTES
    """Bytes of frames buffered per client before it counts as a slow consumer and is
    dropped (``api.stream_max_bytes``)."""
    keepalive: float = 15.0
    """Seconds of silence after which a keep-alive comment is sent."""
    send_timeout: float = 30.0
    """Seconds one write to a client may wait for the socket before the client is dropped."""
    replay_page: int = 1_000
    """History rows read per query while replaying after ``Last-Event-ID``."""
    status_check: float = 0.25
    """Seconds between two looks at the states for ``/v1/status/stream``: a change of state
    is sent within this."""
    status_refresh: float = 2.0
    """Seconds between two status messages while only counters change."""


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a client wants; every given condition must hold."""

    source: str | None = None
    prefix: str | None = None
    """Point ids starting with this."""
    tags: tuple[TagFilter, ...] = ()
    qualities: frozenset[str] = frozenset()
    """Quality values (``good``, ``uncertain``, ``bad``); empty: any."""

    def matches(self, event: Event) -> bool:
        """Whether a live event passes the filter."""
        if self.prefix is not None and not event.point.startswith(self.prefix):
            return False
        if self.source is not None and event.source != self.source:
            return False
        if self.qualities and event.quality.value not in self.qualities:
            return False
        return all(tag.matches(event.tags) for tag in self.tags)

    def matches_stored(self, point: str, body: str) -> bool:
        """Whether a stored event (its point column and JSON body) passes the filter; the
        body is parsed only when a condition needs it."""
        if self.prefix is not None and not point.startswith(self.prefix):
            return False
        if self.source is None and not self.qualities and not self.tags:
            return True
        data: dict[str, Any] = json.loads(body)
        if self.source is not None and data.get("source") != self.source:
            return False
        if self.qualities and data.get("quality") not in self.qualities:
            return False
        tags = data.get("tags") or {}
        return all(tag.matches(tags) for tag in self.tags)


@dataclass(frozen=True, slots=True)
class SseMessage:
    """One SSE message of an event, ready to send."""

    event_id: str
    data: bytes


def event_frame(event_id: str, body: str) -> SseMessage:
    """The SSE message of an event from its documented JSON (compact: no line breaks)."""
    return SseMessage(event_id, f"id: {event_id}\nevent: event\ndata: {body}\n\n".encode())


def message(name: str, data: Mapping[str, Any]) -> bytes:
    """An SSE message without an id: ``warning`` or ``error``."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {name}\ndata: {body}\n\n".encode()


class Subscription:
    """One client's filter and bounded buffer of events not yet sent."""

    def __init__(self, hub: EventHub, event_filter: EventFilter, limit: int,
                 max_bytes: int) -> None:
        self.filter = event_filter
        self.limit = limit
        self.max_bytes = max_bytes
        self.pending_bytes = 0
        """Bytes of the buffered frames (shared with other clients, counted for each)."""
        self.overflow: str | None = None
        """What the client fell behind by, once it did (``5 events``, ``4 MiB``)."""
        self.ended: EndReason | None = None
        """Why the subscription ended; ``None`` while it is live."""
        self.on_end: Callable[[EndReason], None] | None = None
        """Called once when the subscription ends (the response cuts a blocked send short)."""
        self._hub = hub
        self._frames: deque[SseMessage] = deque()
        self._wakeup = asyncio.Event()

    def push(self, frame: SseMessage) -> bool:
        """Buffer a frame; on overflow drop the buffer, end as a slow consumer and return
        False."""
        if len(self._frames) >= self.limit:
            self.overflow = f"{self.limit} events"
        elif self.pending_bytes + len(frame.data) > self.max_bytes:
            self.overflow = f"{self.max_bytes:,} bytes"
        else:
            self._frames.append(frame)
            self.pending_bytes += len(frame.data)
            self._wakeup.set()
            return True
        self._frames.clear()
        self.pending_bytes = 0
        self.end("slow_consumer")
        return False

    def take(self) -> list[SseMessage]:
        """Every buffered frame, oldest first; the buffer is left empty."""
        self._wakeup.clear()
        frames = list(self._frames)
        self._frames.clear()
        self.pending_bytes = 0
        return frames

    async def wait(self) -> None:
        """Until a frame is buffered or the subscription ends (returns at once if either
        happened since the last ``take``)."""
        await self._wakeup.wait()

    def buffered_ids(self) -> set[str]:
        """The ids of the buffered events."""
        return {frame.event_id for frame in self._frames}

    def end(self, reason: EndReason) -> None:
        """Stop receiving events; the first reason given wins."""
        if self.ended is not None:
            return
        self.ended = reason
        self._hub.discard(self)
        self._wakeup.set()
        if self.on_end is not None:
            self.on_end(reason)


class EventHub:
    """Fans the runtime's stored batches out to every subscription."""

    def __init__(self, runtime: ApiFacade) -> None:
        self._runtime = runtime
        self._subscriptions: dict[Subscription, None] = {}  # insertion-ordered set
        self._remove_listener: Callable[[], None] | None = None
        self._streams = 0
        self._changed = asyncio.Event()
        self.closed = False
        self.counters = Counts()
        """``streams`` opened, ``events`` buffered, and ``ended_<reason>`` per end reason."""

    @property
    def clients(self) -> int:
        """Event stream responses running (a dropped client counts until its connection
        is closed)."""
        return self._streams

    @property
    def subscriptions(self) -> int:
        """Subscriptions receiving events."""
        return len(self._subscriptions)

    def stream_opened(self) -> None:
        """A stream response starts."""
        self._streams += 1
        self.counters.add(STREAMS)
        self._notify()

    def stream_closed(self) -> None:
        """A stream response has finished."""
        self._streams -= 1
        self._notify()

    def subscribe(self, event_filter: EventFilter, limit: int,
                  max_bytes: int = MAX_STREAM_BYTES) -> Subscription:
        """A new subscription receiving every batch stored from now on (ended already when
        the hub is closed); it holds at most ``limit`` events and ``max_bytes`` of frames."""
        subscription = Subscription(self, event_filter, limit, max_bytes)
        if self.closed:
            subscription.end("closing")
            return subscription
        self._subscriptions[subscription] = None
        if self._remove_listener is None:
            self._remove_listener = self._runtime.subscribe(self._deliver)
        return subscription

    def discard(self, subscription: Subscription) -> None:
        """Stop delivering to ``subscription``; the hub unsubscribes with the last one."""
        if subscription.ended is not None:
            self.counters.add(ENDED[subscription.ended])
        if subscription not in self._subscriptions:
            return
        del self._subscriptions[subscription]
        if not self._subscriptions and self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None

    def close(self) -> None:
        """End every subscription (the server stops) and refuse new ones."""
        self.closed = True
        for subscription in list(self._subscriptions):
            subscription.end("closing")

    async def wait_for_clients(self, count: int) -> None:
        """Until exactly ``count`` stream responses are running."""
        while self._streams != count:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _deliver(self, events: Sequence[Event]) -> None:
        frames: list[SseMessage | None] = [None] * len(events)
        buffered = 0
        for subscription in list(self._subscriptions):
            matches = subscription.filter.matches
            for index, event in enumerate(events):
                if subscription.ended is not None:
                    break
                if not matches(event):
                    continue
                frame = frames[index]
                if frame is None:
                    frame = frames[index] = event_frame(event.id, event.to_json())
                if subscription.push(frame):
                    buffered += 1
        self.counters.add(EVENTS, buffered)


def chunks(frames: Sequence[SseMessage]) -> list[bytes]:
    """The frames' bytes as writes of about ``CHUNK_BYTES``: small frames joined, a large one
    alone and not copied."""
    writes: list[bytes] = []
    pending: list[bytes] = []
    size = 0
    for frame in frames:
        data = frame.data
        if len(data) >= CHUNK_BYTES:
            if pending:
                writes.append(b"".join(pending))
                pending, size = [], 0
            writes.append(data)
            continue
        pending.append(data)
        size += len(data)
        if size >= CHUNK_BYTES:
            writes.append(b"".join(pending))
            pending, size = [], 0
    if pending:
        writes.append(pending[0] if len(pending) == 1 else b"".join(pending))
    return writes
