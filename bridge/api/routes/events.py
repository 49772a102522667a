"""``/v1/events/stream``: the live event stream (Server-Sent Events), filtered, resumable."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response

from bridge.api.auth import Principal
from bridge.api.context import Authorized, Context, TagQuery, store_problem, tag_filters
from bridge.api.event_hub import EventFilter
from bridge.api.models import (
    ERROR_RESPONSES,
    ErrorResponse,
    EventModel,
    StreamNotice,
    component,
    event_stream_content,
    inline,
)
from bridge.api.sse_response import EventStreamResponse, Resume
from bridge.errors import ApiError, StoreError

router = APIRouter(prefix="/v1", dependencies=[Authorized], responses=ERROR_RESPONSES,
                   tags=["events"])


# ``response_class=Response``: the 200 is documented as the stream it is, and the errors as
# the JSON they are (a streaming response class would document them as a stream).
@router.get("/events/stream", response_class=Response, status_code=200, responses={
    200: {"content": event_stream_content(event=component(EventModel),
                                          warning=inline(StreamNotice),
                                          error=inline(StreamNotice)),
          "description": "Server-Sent Events: `event: event` messages, each with `id:` the "
          "event id and `data:` the normalized event JSON; `event: warning` and "
          "`event: error` messages carry `{code, message, hint, last_event_id}`."},
    503: {"model": ErrorResponse, "description": "The server is stopping, or the store "
          "cannot be read to resume."}})
async def event_stream(
    request: Request,
    context: Context,
    principal: Annotated[Principal, Authorized],
    source: Annotated[str | None, Query(description="Only events of this source.")] = None,
    prefix: Annotated[str | None, Query(
        description="Only points whose id starts with this.")] = None,
    tag: TagQuery = None,
    quality: Annotated[list[Literal["good", "uncertain", "bad"]] | None, Query(
        description="Only these qualities; repeatable.")] = None,
    last_event_id: Annotated[str | None, Query(
        max_length=200, description="Resume after this event id (the `Last-Event-ID` "
        "header, which EventSource sends on reconnect, wins when both are given).")] = None,
    last_event_id_header: Annotated[str | None, Header(
        alias="Last-Event-ID", max_length=200,
        description="Resume after this event id.")] = None,
) -> Response:
    """A live stream of the events the bridge stores (Server-Sent Events), filtered.

    Each event arrives once it is stored, as `id: <event id>`, `event: event` and
    `data: <event JSON>`. With `Last-Event-ID` (or `last_event_id`) the stream first replays
    the stored history after that event, with the same filters, then continues live without
    a gap or a duplicate; if that event is no longer in the history, a `warning` message
    (`unknown_last_event_id`) says so and the stream starts live. A comment line is sent
    after 15 s of silence. A client that falls 10,000 events behind gets an `error`
    message (`slow_consumer`, with the `last_event_id` to resume from) and the stream ends.
    The stream ends when the server stops; clients reconnect with `Last-Event-ID`.
    """
    if context.closing.is_set():
        raise ApiError(503, "shutting_down", "the API is stopping",
                       "reconnect once the bridge is back (with Last-Event-ID)")
    event_filter = EventFilter(source=source, prefix=prefix, tags=tag_filters(tag or ()),
                               qualities=frozenset(quality or ()))
    resume_id = last_event_id_header or last_event_id
    resume = None
    warning = None
    if resume_id:
        try:
            position = context.runtime.history_position(resume_id)
        except StoreError as exc:
            raise store_problem(exc) from exc
        if position is None:
            warning = {
                "code": "unknown_last_event_id",
                "message": f"event '{resume_id}' is not in the history (pruned, or not "
                "stored by this bridge); events stored since then cannot be replayed, the "
                "stream starts with live events",
                "hint": "GET /v1/points/{id}/history?since=... has what is still stored",
                "last_event_id": resume_id,
            }
        else:
            resume = Resume(resume_id, position)
    peer = f"{request.client.host}:{request.client.port}" if request.client else "client"
    return EventStreamResponse(context.hub, event_filter, context.streams,
                               runtime=context.runtime, resume=resume, warning=warning,
                               client=f"{peer} (key {principal.name})")
