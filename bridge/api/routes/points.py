"""``/v1/points``: latest values, one point, its history, live reads and write-back.

Handlers are cheap on purpose: latest values come from memory, history is one indexed query
on the store's reader connection, and nothing runs in a thread pool. Live reads and writes
wait for the device, through the running source's connection.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic_core
from fastapi import APIRouter, Query
from fastapi.responses import Response

from bridge.api.auth import Principal
from bridge.api.context import (
    MAX_PAGE,
    ApiContext,
    Authorized,
    Context,
    PointId,
    TagQuery,
    TimeQuery,
    store_problem,
    tag_filters,
    time_parameter,
)
from bridge.api.handlers import JsonBody
from bridge.api.models import (
    DEVICE_ERRORS,
    ERROR_RESPONSES,
    NOT_FOUND,
    ErrorResponse,
    EventModel,
    History,
    PointPage,
    PointValue,
    WriteRequest,
    WriteResult,
)
from bridge.core.model import isoformat
from bridge.errors import (
    ApiError,
    DecodeError,
    DeviceError,
    ErrorCategory,
    NotWritableError,
    ReadError,
    StoreError,
    WriteError,
    excerpt,
    shorten,
)
from bridge.facade import PointQuery, PointState

router = APIRouter(prefix="/v1", dependencies=[Authorized], responses=ERROR_RESPONSES,
                   tags=["points"])


@router.get("/points", response_model=PointPage)
async def list_points(
    context: Context,
    source: Annotated[str | None, Query(description="Only points of this source.")] = None,
    device: Annotated[str | None, Query(description="Only points of this device.")] = None,
    tag: TagQuery = None,
    prefix: Annotated[str | None, Query(description="Only ids starting with this.")] = None,
    quality: Annotated[list[Literal["good", "uncertain", "bad", "none"]] | None, Query(
        description="Only these qualities (`none`: no data yet); repeatable.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JsonBody:
    """Latest value and metadata of every point, sorted by id.

    Configured points without data yet have `value` and `quality` null. Points that have a
    stored value but are no longer configured are listed with `configured: false`.
    """
    query = PointQuery(source=source, device=device, prefix=prefix,
                       tags=tag_filters(tag or ()), qualities=frozenset(quality or ()))
    page = context.runtime.query_points(query, offset=offset, limit=limit)
    return JsonBody({"total": page.total, "offset": offset, "limit": limit,
                     "items": [_point_value(point) for point in page.items]})


@router.get("/points/{point_id}", response_model=PointValue, responses=NOT_FOUND)
async def get_point(context: Context, point_id: PointId) -> JsonBody:
    """Latest value and metadata of one point."""
    return JsonBody(_point_value(_known_point(context, point_id)))


@router.get("/points/{point_id}/history", response_model=History,
            responses={**NOT_FOUND, 503: {"model": ErrorResponse,
                                          "description": "The store cannot be read."}})
async def point_history(
    context: Context,
    point_id: PointId,
    since: TimeQuery = None,
    until: TimeQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1000,
    order: Annotated[Literal["asc", "desc"], Query(
        description="`desc`: newest first (the default); `asc`: oldest first.")] = "desc",
) -> Response:
    """Stored events of one point between two times, in the order they were stored.

    `limit` applies from the end `order` starts at: the newest events for `desc`, the oldest
    for `asc`. History is bounded by the store's retention (`store.history_max_age`,
    `store.history_max_rows`).
    """
    _known_point(context, point_id)
    now = time.time()
    start = time_parameter("since", since, now)
    end = time_parameter("until", until, now)
    if start is not None and end is not None and start > end:
        raise ApiError(422, "invalid_request", "query.since is after query.until",
                       "swap them, or leave one out",
                       details=[{"location": "query.since", "message": "after until"}])
    try:
        bodies = context.runtime.history(point_id, since=start, until=end, limit=limit + 1,
                                         newest_first=order == "desc")
    except StoreError as exc:
        raise store_problem(exc) from exc
    items = bodies[:limit]
    # The store keeps each event as its documented JSON: join the bodies, don't re-encode.
    head = pydantic_core.to_json({"point": point_id, "order": order, "count": len(items),
                                  "has_more": len(bodies) > limit})
    return Response(head[:-1] + b',"items":[' + ",".join(items).encode() + b"]}",
                    media_type="application/json")


@router.get("/points/{point_id}/live", response_model=EventModel,
            responses={**NOT_FOUND, **DEVICE_ERRORS})
async def read_live(context: Context, point_id: PointId) -> JsonBody:
    """Read one point from the device now, between polls (a live read-through).

    The reading is mapped as a polled one is (decoding, enum or scale, unit, tags, quality)
    and returned as a normalized event with a fresh id. It is **not** stored, streamed or
    published, and it leaves the point's report-by-exception state alone: reading live has
    no side effects. A device that answers with an exception gives a `bad` event with the
    reason, as a poll does; a source that is not connected gives 503. Supported by Modbus
    and OPC-UA sources; 422 (`rejected`) for others.
    """
    with _counted(context, "read"):
        source = _device_source(context, point_id)
        try:
            events = await context.runtime.read_live(point_id)
        except ReadError as exc:
            raise _device_problem(exc, f"cannot read '{point_id}' from the device",
                                  source) from exc
        except DecodeError as exc:
            raise ApiError(502, "protocol_error",
                           f"cannot map the live reading of '{point_id}': {exc.reason}",
                           "the device answered something the mapping cannot read; check "
                           "the point's configuration") from exc
        if not events:
            raise ApiError(502, "protocol_error", f"the device gave no value for '{point_id}'",
                           "check the point's address against the device")
    return JsonBody(events[-1].to_dict())


@router.put("/points/{point_id}", response_model=WriteResult,
            responses={**NOT_FOUND, **DEVICE_ERRORS})
async def write_point(
    context: Context,
    point_id: PointId,
    write: WriteRequest,
    principal: Annotated[Principal, Authorized],
) -> JsonBody:
    """Write a value to a writable point on its device (write-back); needs the `write` scope.

    The value is an engineering value as the API reports it (scale and offset are undone, an
    enum label becomes its code) and is written through the source's running connection.
    200 once the device confirmed it; the next poll (or a live read) shows its effect. Every
    attempt that reaches a device is logged at INFO by the `bridge.audit` logger with the
    name of the key that made it.
    """
    # A value is quoted as an excerpt with its length: a 20 MB string must not come back
    # twice in the response.
    quoted = excerpt(write.value)
    with _counted(context, "write"):
        source = _device_source(context, point_id)
        try:
            await context.runtime.write(point_id, write.value, who=f"key {principal.name}")
        except NotWritableError as exc:
            raise ApiError(409, "not_writable", f"point '{point_id}' is not writable",
                           "only points configured with `writable: true` accept writes"
                           ) from exc
        except WriteError as exc:
            raise _device_problem(exc, f"cannot write {quoted} to '{point_id}'", source,
                                  shorten(exc.reason)) from exc
    return JsonBody({"point": point_id, "source": source, "value": write.value,
                     "written_at": isoformat(time.time())})


# --- helpers ----------------------------------------------------------------------------------


def _point_value(state: PointState) -> dict[str, Any]:
    """A point as ``PointValue`` describes it."""
    point, event = state.config, state.latest
    entry: dict[str, Any] = {
        "id": state.id,
        "configured": point is not None,
        "value": None, "quality": None, "reason": None, "ts": None, "received_at": None,
        "event_id": None,
    }
    if point is not None:
        spec = point.spec
        entry.update(source=point.source, device=point.device, description=spec.description,
                     unit=spec.unit, writable=spec.writable, tags=point.tags)
    elif event is not None:
        entry.update(source=event.source, device=None, description=None, unit=event.unit,
                     writable=False, tags=dict(event.tags))
    if event is not None:
        entry.update(value=event.value, quality=event.quality, reason=event.reason,
                     ts=isoformat(event.ts), received_at=isoformat(event.received_at),
                     event_id=event.id)
        if entry["unit"] is None:
            entry["unit"] = event.unit
    return entry


def _known_point(context: ApiContext, point_id: str) -> PointState:
    state = context.runtime.point(point_id)
    if state is None:
        raise ApiError(404, "not_found", f"no point '{point_id}'",
                       "GET /v1/points lists the points this bridge serves")
    return state


def _device_source(context: ApiContext, point_id: str) -> str:
    """The source of a configured point whose source runs, for a live read or a write."""
    point = context.runtime.points().get(point_id)
    if point is None:
        stored = context.runtime.point(point_id) is not None
        raise ApiError(
            404, "not_found",
            f"point '{point_id}' is no longer configured" if stored else
            f"no point '{point_id}'",
            "only configured points are read from or written to a device; GET /v1/points "
            "lists them")
    if not context.runtime.source_enabled(point.source):
        raise ApiError(409, "source_disabled",
                       f"source '{point.source}' of point '{point_id}' is disabled",
                       f"enable source '{point.source}' in the configuration")
    return point.source


@dataclass(frozen=True, slots=True)
class _DeviceProblem:
    status: int
    code: str
    hint: str


_DEVICE_PROBLEMS = {
    ErrorCategory.CONFIG: _DeviceProblem(
        422, "rejected", "the value, or the point's configuration, does not fit: see the "
        "message"),
    ErrorCategory.DEVICE: _DeviceProblem(
        502, "device_error", "the device refused the request; check the value against what "
        "the device accepts"),
    ErrorCategory.TRANSIENT: _DeviceProblem(
        503, "device_unavailable", "the source is not connected or the device did not "
        "answer; retry later (GET /v1/sources/{source} shows its state)"),
    ErrorCategory.AUTH: _DeviceProblem(
        502, "device_denied", "the endpoint refused the bridge's credentials for this; check "
        "the rights of the source's user"),
    ErrorCategory.PROTOCOL: _DeviceProblem(
        502, "protocol_error", "the device answered something that is not valid; the daemon "
        "log and GET /v1/sources/{source} say more"),
}


def _device_problem(exc: DeviceError, doing: str, source: str,
                    reason: str | None = None) -> ApiError:
    problem = _DEVICE_PROBLEMS[exc.category]
    return ApiError(problem.status, problem.code, f"{doing}: {reason or shorten(exc.reason)}",
                    problem.hint.replace("{source}", source),
                    headers={"Retry-After": "5"} if problem.status == 503 else None)


@contextlib.contextmanager
def _counted(context: ApiContext, operation: Literal["read", "write"]) -> Iterator[None]:
    """Count a live read or a write by its result, for the metrics."""
    try:
        yield
    except ApiError as exc:
        context.device_requests[operation, exc.code] += 1
        raise
    context.device_requests[operation, "ok"] += 1
