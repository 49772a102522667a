"""Builders for live-stream tests: a bridge without sources fed through its router, and a reader
of Server-Sent Events over an httpx stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bridge.api.server import ApiServer
from bridge.core.model import Event, Quality, new_event_id
from bridge.runtime import Runtime

SETTLE = 10.0
"""Seconds any awaited condition may take before the test fails."""


def make_event(
    point: str,
    value: float | bool | str | None = 1.0,
    *,
    source: str = "plc1",
    quality: Quality = Quality.GOOD,
    tags: dict[str, str] | None = None,
) -> Event:
    """An event as a mapping would produce it."""
    now = time.time()
    return Event(id=new_event_id(), source=source, point=point, value=value, unit="u",
                 quality=quality, ts=now, received_at=now, protocol="modbus", bridge="edge-1",
                 tags=tags or {}, reason=None if quality is Quality.GOOD else "stale")


def points(count: int, prefix: str = "boiler.p") -> list[Event]:
    """``count`` good events of distinct points."""
    return [make_event(f"{prefix}{index}", float(index)) for index in range(count)]


class Bridge:
    """A runtime with its store open, its router running and its API served on a free port."""

    def __init__(self, runtime: Runtime, server: ApiServer, router: asyncio.Task[None]) -> None:
        self.runtime = runtime
        self.server = server
        self.router = router
        assert server.url is not None
        self.url = server.url

    @property
    def hub_clients(self) -> int:
        """Streams currently served."""
        return self.server.context.hub.clients

    async def wait_for_clients(self, count: int) -> None:
        """Until exactly ``count`` streams are subscribed."""
        async with asyncio.timeout(SETTLE):
            await self.server.context.hub.wait_for_clients(count)

    async def feed(self, events: Sequence[Event]) -> None:
        """Submit events through the router; return once they are stored and fanned out."""
        stored = asyncio.Event()
        last = events[-1].id

        def seen(batch: Sequence[Event]) -> None:
            if any(event.id == last for event in batch):
                stored.set()

        remove = self.runtime.router.add_listener(seen)
        try:
            await self.runtime.router.submit(events)
            async with asyncio.timeout(SETTLE):
                await stored.wait()
        finally:
            remove()

    async def stop(self) -> None:
        """Stop the server and the router; close the store."""
        await self.server.stop()
        self.router.cancel()
        await asyncio.gather(self.router, return_exceptions=True)
        self.runtime.store.close()


def write_config(tmp_path: Path, api: str = "") -> Path:
    """A configuration without sources; ``api`` is extra YAML under ``api:``."""
    path = tmp_path / "fieldbridge.yaml"
    path.write_text("bridge:\n  id: edge-1\n  state_dir: state\n"
                    f"api:\n  host: 127.0.0.1\n  port: 0\n{api}sources: []\n")
    return path


BridgeFactory = Callable[..., Awaitable[Bridge]]


@dataclass
class Message:
    """One SSE message (or comment)."""

    event: str | None = None
    id: str | None = None
    data: str = ""
    comment: str | None = None

    def json(self) -> dict[str, Any]:
        """The data as JSON."""
        value: dict[str, Any] = json.loads(self.data)
        return value


class SseReader:
    """Parses an ``httpx`` streaming response into messages."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.read()
        self.lines = response.aiter_lines()

    async def next(self) -> Message | None:
        """The next message or comment; ``None`` at the end of the stream."""
        message = Message()
        data: list[str] = []
        started = False
        async with asyncio.timeout(SETTLE):
            async for line in self.lines:
                if not line:
                    if started:
                        message.data = "\n".join(data)
                        return message
                    continue
                started = True
                if line.startswith(":"):
                    return Message(comment=line[1:].strip())
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                elif name == "event":
                    message.event = value
                elif name == "id":
                    message.id = value
            return None

    async def events(self, count: int) -> list[Message]:
        """The next ``count`` messages, comments skipped."""
        found: list[Message] = []
        while len(found) < count:
            message = await self.next()
            assert message is not None, f"the stream ended after {len(found)} of {count}"
            if message.comment is None:
                found.append(message)
        return found

    async def until(self, event_id: str) -> list[Message]:
        """Messages up to and including the event ``event_id``, comments skipped."""
        found: list[Message] = []
        while not found or found[-1].id != event_id:
            found.extend(await self.events(1))
        return found

    async def rest(self) -> list[Message]:
        """Every message until the stream ends, comments skipped."""
        found: list[Message] = []
        while (message := await self.next()) is not None:
            if message.comment is None:
                found.append(message)
        return found
