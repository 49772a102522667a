"""``/v1/status/stream`` and ``/v1/whoami``: what a dashboard (the console) watches besides
the events.

The status stream sends the inventory of sources and sinks (as ``/v1/sources`` and
``/v1/sinks`` give it) as Server-Sent Events: once when it opens, within
``StreamSettings.status_check`` of any change of state or error, and at most every
``StreamSettings.status_refresh`` while only counters move. The API reads the runtime's facade to
see the changes: the runtime and the pipeline know nothing of the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Hashable, Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from bridge.api.auth import Principal
from bridge.api.context import ApiContext, Authorized, Context, Identified
from bridge.api.event_hub import KEEP_ALIVE, StreamSettings, message
from bridge.api.handlers import JsonBody
from bridge.api.models import (
    ERROR_RESPONSES,
    ErrorResponse,
    SinkModel,
    SourceModel,
    component,
    event_stream_content,
)
from bridge.errors import ApiError

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)


class Whoami(BaseModel):
    """The key a request presented: its name and scopes (never the key itself)."""

    name: str = Field(description="The key's name in `api.keys`; `anonymous` without keys.")
    scopes: list[str] = Field(description="`read`, `write` and/or `admin`.")
    keys_required: bool = Field(description="Whether this API asks for keys at all.")
    bridge: str = Field(description="The bridge instance id (`bridge.id`).")


@router.get("/whoami", response_model=Whoami, tags=["auth"])
async def whoami(context: Context, principal: Annotated[Principal, Identified]) -> JsonBody:
    """The name and scopes of the presented key; 401 for no key or an unknown one.

    Any known key may ask, whatever its scopes: a client learns what it may do before it
    tries (the console shows the write form only to a key with `write`).
    """
    return JsonBody({"name": principal.name, "scopes": sorted(principal.scopes),
                     "keys_required": context.keys.enabled,
                     "bridge": context.runtime.bridge_id})


@router.get("/status/stream", response_class=Response, status_code=200, tags=["sources"],
            dependencies=[Authorized], responses={
                200: {"content": event_stream_content(status={
                          "type": "object", "required": ["sources", "sinks"],
                          "properties": {
                              "sources": {"type": "array", "items": component(SourceModel)},
                              "sinks": {"type": "array", "items": component(SinkModel)}}}),
                      "description": "Server-Sent Events: `event: status` messages whose "
                      "`data:` is `{\"sources\": [...], \"sinks\": [...]}`, each entry as "
                      "`/v1/sources` and `/v1/sinks` give it."},
                503: {"model": ErrorResponse, "description": "The server is stopping."}})
async def status_stream(request: Request, context: Context) -> Response:
    """The state of every source, device and sink, live (Server-Sent Events).

    A `status` message with every source (with its devices) and every sink is sent when the
    stream opens, within a quarter of a second after any of them changes state or records an
    error, and every two seconds while only their counters change. A comment line is sent
    after 15 s of silence. The stream ends when the server stops; reconnect then.
    """
    if context.closing.is_set():
        raise ApiError(503, "shutting_down", "the API is stopping",
                       "reconnect once the bridge is back")
    peer = f"{request.client.host}:{request.client.port}" if request.client else "client"
    return StatusStreamResponse(context, context.streams, client=peer)


def _fingerprint(entries: Iterable[dict[str, Any]]) -> tuple[Hashable, ...]:
    """What makes a state change worth sending at once: states and errors, not counters."""
    parts: list[Hashable] = []
    for entry in entries:
        parts.append((entry.get("id"), entry.get("state"), entry.get("since"),
                      entry.get("last_error_at"), entry.get("error_category")))
        devices = entry.get("devices")
        if devices:
            parts.append(_fingerprint(devices))
    return tuple(parts)


class StatusStreamResponse(Response):
    """``text/event-stream`` of the inventory, sent as it changes, until the client goes or
    the server stops."""

    media_type = "text/event-stream"

    def __init__(self, context: ApiContext, settings: StreamSettings, *, client: str) -> None:
        # Like StreamingResponse: no body, so no Content-Length.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.context = context
        self.settings = settings
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the client goes or the server stops."""
        gone = asyncio.Event()
        logger.debug("status stream to %s opened", self.client)
        async with asyncio.TaskGroup() as group:
            watcher = group.create_task(self._watch(receive, gone),
                                        name=f"api.status[{self.client}].disconnect")
            try:
                await self._stream(send, gone)
            except TimeoutError:
                logger.warning("status stream to %s dropped: it read nothing for %g s",
                               self.client, self.settings.send_timeout)
            finally:
                watcher.cancel()
        logger.debug("status stream to %s ended", self.client)

    async def _stream(self, send: Send, gone: asyncio.Event) -> None:
        settings = self.settings
        runtime = self.context.runtime
        closing = self.context.closing
        loop = asyncio.get_running_loop()
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        sent_state: tuple[Hashable, ...] | None = None
        sent_body = b""
        sent_at = refreshed_at = 0.0
        while not gone.is_set() and not closing.is_set():
            sources, sinks = runtime.sources(), runtime.sinks()
            state = (_fingerprint(sources), _fingerprint(sinks))
            now = loop.time()
            data: bytes | None = None
            if state != sent_state or now - refreshed_at >= settings.status_refresh:
                refreshed_at = now
                candidate = message("status", {"sources": sources, "sinks": sinks})
                if state != sent_state or candidate != sent_body:
                    data = sent_body = candidate
                    sent_state = state
            if data is None and now - sent_at >= settings.keepalive:
                data = KEEP_ALIVE
            if data is not None:
                async with asyncio.timeout(settings.send_timeout):
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                sent_at = now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.status_check):
                    await closing.wait()
        if not gone.is_set():
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _watch(receive: Receive, gone: asyncio.Event) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
