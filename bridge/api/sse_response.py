"""The Server-Sent Events response of an event stream.

``EventStreamResponse`` subscribes to the ``EventHub`` when it starts, replays the stored
history after ``Last-Event-ID`` first when asked (see ``bridge.api.event_hub`` for how the replay
and the live events meet without a gap or a duplicate), then writes what the subscription
buffers until the client goes, falls behind, stalls, or the server stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bridge.api.connections import ABORT
from bridge.api.event_hub import (
    KEEP_ALIVE,
    EndReason,
    EventFilter,
    EventHub,
    SseMessage,
    StreamSettings,
    Subscription,
    chunks,
    event_frame,
    message,
)
from bridge.errors import StoreError
from bridge.facade import ApiFacade

logger = logging.getLogger(__name__)


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
        runtime: ApiFacade,
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
        self.runtime = runtime
        self.resume = resume
        self.warning = warning
        self.client = client
        self.last_sent: str | None = resume.last_event_id if resume is not None else None
        """The id of the last event sent: where the client should resume from."""
        self._guard: asyncio.Timeout | None = None
        self._closing = False
        self._dropped = False
        """Whether the drop was logged already (a slow consumer, then a stalled write)."""
        self._replayed: set[str] = set()
        """Ids the replay sent that may still arrive live (see the module's docstring)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the client goes, falls behind, or the server stops."""
        subscription = self.hub.subscribe(self.filter, self.settings.queue,
                                          self.settings.max_bytes)
        subscription.on_end = self._ended
        self.hub.stream_opened()
        logger.debug("event stream to %s opened", self.client)
        try:
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(self._watch(receive, subscription),
                                            name=f"api.stream[{self.client}].disconnect")
                try:
                    await self._stream(send, subscription)
                except _SendTimeoutError:
                    subscription.end("stalled")
                    if not self._dropped:
                        logger.warning("event stream to %s dropped: %s", self.client,
                                       _why(subscription, self.settings))
                    # The response cannot be completed: drop the connection now, with what
                    # the kernel still buffers for it, rather than wait to flush to a
                    # client that reads nothing.
                    abort = scope.get("extensions", {}).get(ABORT)
                    if abort is not None:
                        abort()
                        await watcher  # the server has seen the connection go
                finally:
                    subscription.end("finished")
                    watcher.cancel()
        finally:
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
                for data in chunks(frames):
                    await self._send(send, data)
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
            self._dropped = True
            logger.warning("event stream to %s dropped: %s", self.client,
                           _why(subscription, self.settings))
            await self._send(send, message("error", {
                "code": "slow_consumer",
                "message": f"the client fell more than {subscription.overflow} behind; "
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
                rows = self.runtime.history_after(after, limit=page)
            except StoreError as exc:
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

    def _unsent(self, frames: list[SseMessage]) -> list[SseMessage]:
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
        # At shutdown, or once a client fell too far behind, a write blocked on a client
        # that reads nothing is not waited for; a write the socket takes at once still goes
        # out (a zero timeout only cancels a wait).
        if reason in ("closing", "slow_consumer"):
            self._closing = True
            if self._guard is not None:
                self._guard.reschedule(asyncio.get_running_loop().time())

    @staticmethod
    async def _watch(receive: Receive, subscription: Subscription) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        subscription.end("disconnected")


def _why(subscription: Subscription, settings: StreamSettings) -> str:
    """Why a stream was dropped, for the log."""
    if subscription.ended == "closing":
        return "the server stops"
    if subscription.ended == "slow_consumer":
        return f"it fell {subscription.overflow} behind"
    return f"it read nothing for {settings.send_timeout:g} s"
