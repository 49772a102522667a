"""Live event streams: stored events fanned out to Server-Sent Events clients.

One ``EventHub`` per API listens to the router (only while a client is connected) and hands
every stored batch to each client's ``Subscription``, which keeps the events its filter
matches in a bounded buffer. An event is serialized once per batch, however many clients
take it.

A client that resumes (``Last-Event-ID``) is subscribed first, so live events are buffered
while the store's history after that id is replayed; then the buffer is sent. This relies on
the router calling its listeners after each batch is committed, one batch at a time, in store
order. An event stored before the subscription is replayed; one stored after it is buffered;
one committed before but fanned out after is found by both: the replay stops at the first
event already buffered, and live events the replay already sent are skipped. Those come
first (at most the batch the router was fanning out), so once a live event that was not
replayed arrives, no later one can have been.

A client that cannot keep up is dropped, never allowed to grow memory: when its buffer is
full the buffer is freed, the client gets an ``error`` message (``slow_consumer``, with the
last id it was sent, to resume from) and the stream ends. A client that reads nothing at all
blocks the socket; a send that does not finish within ``send_timeout`` ends the stream too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bridge.core.model import Event
from bridge.pipeline.router import Router
from bridge.pipeline.store import Store, StoreError, event_to_json

logger = logging.getLogger(__name__)

EndReason = Literal["slow_consumer", "stalled", "closing", "disconnected", "finished"]
"""Why a subscription ended: the client fell behind, read nothing for ``send_timeout``, the
server stops, the client went away, or the response ended for another reason (a store
error)."""

KEEP_ALIVE = b": keep-alive\n\n"
"""An SSE comment: keeps proxies and idle timeouts from closing a quiet stream."""


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """Limits of the event streams (not configurable in the file; tests tighten them)."""

    queue: int = 10_000
    """Events buffered per client before it counts as a slow consumer and is dropped."""
    keepalive: float = 15.0
    """Seconds of silence after which a keep-alive comment is sent."""
    send_timeout: float = 30.0
    """Seconds one write to a client may wait for the socket before the client is dropped."""
    replay_page: int = 1_000
    """History rows read per query while replaying after ``Last-Event-ID``."""


@dataclass(frozen=True, slots=True)
class TagFilter:
    """``key=value``, or ``key`` alone for any value."""

    key: str
    value: str | None

    def matches(self, tags: Mapping[str, str]) -> bool:
        """Whether ``tags`` carry this tag (with this value, when one is given)."""
        return self.key in tags and (self.value is None or tags[self.key] == self.value)


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
class Frame:
    """One SSE message of an event, ready to send."""

    event_id: str
    data: bytes


def event_frame(event_id: str, body: str) -> Frame:
    """The SSE message of an event from its documented JSON (compact: no line breaks)."""
    return Frame(event_id, f"id: {event_id}\nevent: event\ndata: {body}\n\n".encode())


def message(name: str, data: Mapping[str, Any]) -> bytes:
    """An SSE message without an id: ``warning`` or ``error``."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {name}\ndata: {body}\n\n".encode()


class Subscription:
    """One client's filter and bounded buffer of events not yet sent."""

    def __init__(self, hub: EventHub, event_filter: EventFilter, limit: int) -> None:
        self.filter = event_filter
        self.limit = limit
        self.ended: EndReason | None = None
        """Why the subscription ended; ``None`` while it is live."""
        self.on_end: Callable[[EndReason], None] | None = None
        """Called once when the subscription ends (the response cuts a blocked send short)."""
        self._hub = hub
        self._frames: deque[Frame] = deque()
        self._wakeup = asyncio.Event()

    def push(self, frame: Frame) -> bool:
        """Buffer a frame; on overflow drop the buffer, end as a slow consumer and return
        False."""
        if len(self._frames) >= self.limit:
            self._frames.clear()
            self.end("slow_consumer")
            return False
        self._frames.append(frame)
        self._wakeup.set()
        return True

    def take(self) -> list[Frame]:
        """Every buffered frame, oldest first; the buffer is left empty."""
        self._wakeup.clear()
        frames = list(self._frames)
        self._frames.clear()
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
    """Fans the router's stored batches out to every subscription."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._subscriptions: dict[Subscription, None] = {}  # insertion-ordered set
        self._remove_listener: Callable[[], None] | None = None
        self._streams = 0
        self._changed = asyncio.Event()
        self.closed = False
        self.counters: Counter[str] = Counter()
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
        self.counters["streams"] += 1
        self._notify()

    def stream_closed(self) -> None:
        """A stream response has finished."""
        self._streams -= 1
        self._notify()

    def subscribe(self, event_filter: EventFilter, limit: int) -> Subscription:
        """A new subscription receiving every batch stored from now on (ended already when
        the hub is closed)."""
        subscription = Subscription(self, event_filter, limit)
        if self.closed:
            subscription.end("closing")
            return subscription
        self._subscriptions[subscription] = None
        if self._remove_listener is None:
            self._remove_listener = self._router.add_listener(self._deliver)
        return subscription

    def discard(self, subscription: Subscription) -> None:
        """Stop delivering to ``subscription``; the router listener goes with the last one."""
        if subscription.ended is not None:
            self.counters[f"ended_{subscription.ended}"] += 1
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
        frames: list[Frame | None] = [None] * len(events)
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
                    frame = frames[index] = event_frame(event.id, event_to_json(event))
                if subscription.push(frame):
                    buffered += 1
        self.counters["events"] += buffered


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a resuming client left off: a stored event's id and its history position."""

    last_event_id: str
    seq: int


class _SendTimeoutError(Exception):
    """A write to the client did not finish in time (or was cut short at shutdown)."""


class EventStreamResponse(Response):
    """``text/event-stream`` of the events a filter matches, live, optionally after a replay.

    The handler validates the request and builds this response; the subscription is made
    when the response starts, so nothing is left subscribed if it never does.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        hub: EventHub,
        event_filter: EventFilter,
        settings: StreamSettings,
        *,
        store: Store,
        resume: Resume | None = None,
        warning: Mapping[str, Any] | None = None,
        client: str = "client",
    ) -> None:
        # Like StreamingResponse: no body, so no Content-Length.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.hub = hub
        self.filter = event_filter
        self.settings = settings
        self.store = store
        self.resume = resume
        self.warning = warning
        self.client = client
        self.last_sent: str | None = resume.last_event_id if resume is not None else None
        """The id of the last event sent: where the client should resume from."""
        self._guard: asyncio.Timeout | None = None
        self._closing = False
        self._replayed: set[str] = set()
        """Ids the replay sent that may still arrive live (see the module's docstring)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the client goes, falls behind, or the server stops."""
        subscription = self.hub.subscribe(self.filter, self.settings.queue)
        subscription.on_end = self._ended
        self.hub.stream_opened()
        watcher = asyncio.create_task(self._watch(receive, subscription),
                                      name=f"api.stream[{self.client}].disconnect")
        logger.debug("event stream to %s opened", self.client)
        try:
            await self._stream(send, subscription)
        except _SendTimeoutError:
            subscription.end("stalled")
            # The response stays incomplete: the server closes the connection (and says
            # so in its log) once this returns.
            logger.warning("event stream to %s dropped: %s", self.client,
                           "the server stops" if subscription.ended == "closing" else
                           f"it read nothing for {self.settings.send_timeout:g} s")
        finally:
            subscription.end("finished")
            watcher.cancel()
            await asyncio.wait({watcher})
            self.hub.stream_closed()
        logger.debug("event stream to %s ended: %s", self.client, subscription.ended)

    async def _stream(self, send: Send, subscription: Subscription) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        if self.warning is not None:
            await self._send(send, message("warning", self.warning))
        if self.resume is not None and not await self._replay(send, subscription,
                                                               self.resume):
            await self._finish(send)
            return
        while True:
            frames = self._unsent(subscription.take())
            if frames:
                await self._send(send, b"".join(frame.data for frame in frames))
                self.last_sent = frames[-1].event_id
                continue
            if subscription.ended is not None:
                break
            try:
                async with asyncio.timeout(self.settings.keepalive):
                    await subscription.wait()
            except TimeoutError:
                await self._send(send, KEEP_ALIVE)
        if subscription.ended == "disconnected":
            return
        if subscription.ended == "slow_consumer":
            logger.warning("event stream to %s dropped: it fell %d events behind", self.client,
                           self.settings.queue)
            await self._send(send, message("error", {
                "code": "slow_consumer",
                "message": f"the client fell more than {self.settings.queue} events behind; "
                "the stream is closed",
                "hint": "reconnect with Last-Event-ID (or ?last_event_id=) set to "
                "last_event_id to resume from the store's history; read faster or filter "
                "the stream",
                "last_event_id": self.last_sent,
            }))
        await self._finish(send)

    async def _replay(self, send: Send, subscription: Subscription, resume: Resume) -> bool:
        """Send the stored events after the resume point up to the first buffered one;
        False when the store failed (the client was told)."""
        after = resume.seq
        page = self.settings.replay_page
        # What the client has that may still arrive live; more than a subscription can buffer
        # would have overflowed it.
        sent: deque[str] = deque([resume.last_event_id], maxlen=self.settings.queue + 1)
        while subscription.ended is None:
            try:
                rows = self.store.history_after(after, limit=page)
            except (StoreError, sqlite3.Error) as exc:
                await self._send(send, message("error", {
                    "code": "store_unavailable",
                    "message": f"the store cannot be read to replay history: {exc}",
                    "hint": "check /health/ready and the daemon log, then reconnect",
                    "last_event_id": self.last_sent,
                }))
                return False
            buffered = subscription.buffered_ids()
            chunk: list[bytes] = []
            last: str | None = None
            reached_live = False
            for seq, event_id, point, body in rows:
                if event_id in buffered:
                    reached_live = True
                    break
                after = seq
                if self.filter.matches_stored(point, body):
                    chunk.append(event_frame(event_id, body).data)
                    sent.append(event_id)
                    last = event_id
            if chunk:
                await self._send(send, b"".join(chunk))
                self.last_sent = last
            if reached_live or len(rows) < page:
                break
            # A write the socket takes at once does not yield: a long replay must not hold
            # the event loop (sources, router) for all its pages.
            await asyncio.sleep(0)
        self._replayed = set(sent)
        return True

    def _unsent(self, frames: list[Frame]) -> list[Frame]:
        """``frames`` without the leading ones the replay sent already."""
        if not self._replayed or not frames:
            return frames
        skip = 0
        while skip < len(frames) and frames[skip].event_id in self._replayed:
            skip += 1
        if skip < len(frames):
            self._replayed = set()  # a live event the replay did not have: no more overlap
        return frames[skip:]

    async def _finish(self, send: Send) -> None:
        await self._send(send, b"", more=False)

    async def _send(self, send: Send, data: bytes, *, more: bool = True) -> None:
        """Write ``data``; raise ``_SendTimeoutError`` when the socket stays blocked too long
        (at once, when the server is stopping)."""
        try:
            async with asyncio.timeout(0 if self._closing else self.settings.send_timeout
                                       ) as guard:
                self._guard = guard
                try:
                    await send({"type": "http.response.body", "body": data, "more_body": more})
                finally:
                    self._guard = None
        except TimeoutError:
            raise _SendTimeoutError from None

    def _ended(self, reason: EndReason) -> None:
        # At shutdown a write blocked on a client that reads nothing is not waited for; a
        # write the socket takes at once still goes out (a zero timeout only cancels a wait).
        if reason == "closing":
            self._closing = True
            if self._guard is not None:
                self._guard.reschedule(asyncio.get_running_loop().time())

    @staticmethod
    async def _watch(receive: Receive, subscription: Subscription) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        subscription.end("disconnected")
