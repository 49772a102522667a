"""The REST API: latest values, history, live reads, write-back, the event stream, inventory,
health and metrics.

FastAPI serves it on uvicorn inside the daemon's event loop. Handlers are cheap on purpose:
latest values come from memory, history is one indexed query on the store's reader
connection, and nothing runs in a thread pool. Live reads and writes wait for the device,
through the running source's connection (``Source.read``/``Source.write``); the event stream
is ``bridge.api.stream``.

The API listens on loopback (``127.0.0.1:8780``) unless ``api.host`` says otherwise. With no
``api.keys`` configured it needs no authentication, so expose it beyond loopback only with keys
(and ``api.tls``). Health endpoints, ``/docs`` and ``/openapi.json`` are always open.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, cast, get_args

import pydantic_core
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.config import JsonDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from bridge import __version__
from bridge.api import metrics
from bridge.api.auth import AuthError, AuthFailure, KeyRing, Principal, Scope
from bridge.api.stream import (
    EndReason,
    EventFilter,
    EventHub,
    EventStreamResponse,
    Resume,
    StreamSettings,
    TagFilter,
)
from bridge.config.models import ResolvedPoint, parse_duration
from bridge.core.model import Event, Quality, Reading, isoformat, parse_timestamp
from bridge.errors import BridgeError, DecodeError, ErrorCategory, WriteError
from bridge.pipeline.source import BuildContext
from bridge.pipeline.store import StoreError
from bridge.registry import protocols
from bridge.runtime import RunningSource, Runtime

logger = logging.getLogger(__name__)
audit = logging.getLogger("bridge.audit")
"""Who changed what on a device: every write-back, at INFO, with the key's name."""

MAX_PAGE = 10_000
"""The most points or history rows one request returns."""


class ApiServerError(BridgeError):
    """The API cannot serve: its address cannot be bound or its certificate not loaded."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(f"API cannot listen on {_address(host, port)}: {reason}")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- response models ------------------------------------------------------------------------

ISO_TIME: JsonDict = {"format": "date-time", "examples": ["2025-01-31T12:00:00.000Z"]}

JsonValue = bool | int | float | str | None


class ErrorBody(BaseModel):
    """What went wrong and what to do about it."""

    code: str = Field(description="Stable machine-readable code, e.g. `not_found`.")
    message: str = Field(description="What went wrong, for a person.")
    hint: str | None = Field(default=None, description="What to do about it.")
    details: list[dict[str, Any]] | None = Field(
        default=None, description="Per-field problems of an invalid request.")


class ErrorResponse(BaseModel):
    """Every error response has this shape."""

    error: ErrorBody


class PointValue(BaseModel):
    """A point's metadata and latest value."""

    id: str = Field(description="Point id.")
    source: str = Field(description="Source id.")
    device: str | None = Field(description="Device id, when the point belongs to a device.")
    description: str | None = None
    unit: str | None = None
    writable: bool = Field(description="Whether the point accepts write-back.")
    configured: bool = Field(
        description="False for a point that has a stored value but is no longer configured.")
    tags: dict[str, str] = Field(default_factory=dict)
    value: JsonValue = Field(description="Latest value; null when there is no data yet.")
    quality: Quality | None = Field(description="Quality of the latest value; null: no data.")
    reason: str | None = Field(default=None, description="Why the quality is not good.")
    ts: str | None = Field(description="Source (or bridge) time of the latest value.",
                           json_schema_extra=ISO_TIME)
    received_at: str | None = Field(description="When the bridge received it.",
                                    json_schema_extra=ISO_TIME)
    event_id: str | None = Field(description="Id of the event that carried the latest value.")


class PointPage(BaseModel):
    """One page of points, sorted by id."""

    total: int = Field(description="Points matching the filters, on all pages.")
    offset: int
    limit: int
    items: list[PointValue]


class EventModel(BaseModel):
    """The normalized event (see the event JSON Schema)."""

    id: str = Field(description="Unique, stable across re-delivery; sorts by creation time.")
    source: str
    point: str
    value: JsonValue
    unit: str | None
    quality: Quality
    reason: str | None = None
    ts: str = Field(json_schema_extra=ISO_TIME)
    received_at: str = Field(json_schema_extra=ISO_TIME)
    protocol: str
    tags: dict[str, str] = Field(default_factory=dict)
    bridge: str


class History(BaseModel):
    """Stored events of one point."""

    point: str
    order: Literal["asc", "desc"]
    count: int = Field(description="Events in `items`.")
    has_more: bool = Field(description="More events match than `limit` allowed.")
    items: list[EventModel]


class EndpointModel(BaseModel):
    """A source or device: connection state, last error and counters."""

    model_config = ConfigDict(extra="allow")

    id: str
    kind: Literal["source", "device"]
    protocol: str
    endpoint: str = Field(description="Where it connects; secrets redacted.")
    state: Literal["connecting", "up", "degraded", "down", "disabled"]
    since: str | None = Field(description="When it entered this state.",
                              json_schema_extra=ISO_TIME)
    last_success: str | None = Field(json_schema_extra=ISO_TIME)
    last_error: str | None
    error_category: Literal["transient", "auth", "config", "protocol", "device"] | None
    last_error_at: str | None = Field(json_schema_extra=ISO_TIME)
    counters: dict[str, int]
    details: dict[str, Any] | None = None
    points: int = Field(description="Configured points served through it.")
    devices: list[EndpointModel] | None = None


class SourceModel(EndpointModel):
    """A configured source, with its devices."""

    enabled: bool


class SourceList(BaseModel):
    """Every configured source."""

    items: list[SourceModel]


class OutboxModel(BaseModel):
    """What waits in a sink's outbox for the broker's confirmation."""

    events: int
    bytes: int
    dropped: int = Field(description="Dropped unconfirmed from the full outbox (policy "
                         "drop_oldest) since the start.")
    oldest_age_seconds: float | None = Field(description="Age of the oldest waiting event.")
    max_events: int
    max_bytes: int
    policy: Literal["block", "drop_oldest"]


class SinkModel(BaseModel):
    """A configured sink: connection state, last error, counters, outbox and delivery figures
    (``details``: publish_rate, confirm_latency_ms, in_flight)."""

    model_config = ConfigDict(extra="allow")

    id: str
    kind: Literal["sink"]
    protocol: str
    endpoint: str = Field(description="Where it connects; secrets redacted.")
    enabled: bool
    state: Literal["connecting", "up", "degraded", "down", "disabled"]
    since: str | None = Field(json_schema_extra=ISO_TIME)
    last_success: str | None = Field(json_schema_extra=ISO_TIME)
    last_error: str | None
    error_category: Literal["transient", "auth", "config", "protocol", "device"] | None
    last_error_at: str | None = Field(json_schema_extra=ISO_TIME)
    counters: dict[str, int]
    details: dict[str, Any]
    outbox: OutboxModel | None = Field(default=None, description="Unset for a disabled sink.")


class SinkList(BaseModel):
    """Every configured sink."""

    items: list[SinkModel]


class Liveness(BaseModel):
    """The process is alive and its event loop turns."""

    status: Literal["alive"]
    version: str
    uptime_seconds: float


class Readiness(BaseModel):
    """Whether the bridge serves, and the state of each source."""

    status: Literal["ready", "not_ready"]
    reasons: list[str] = Field(description="Why it is not ready; empty when it is.")
    sources: dict[str, str] = Field(description="State of every source, by id.")
    summary: dict[str, int] = Field(description="How many sources are in each state.")
    error: ErrorBody | None = Field(default=None, description="Set when not ready.")


WriteValue = bool | int | float | str


class WriteRequest(BaseModel):
    """A value to write to a writable point."""

    model_config = ConfigDict(extra="forbid")

    value: WriteValue = Field(description=(
        "The engineering value, as the API reports it: a number in the point's unit (scale "
        "and offset are undone), a boolean, or one of the point's enum labels."),
        examples=[55.0, True, "auto"])

    @field_validator("value")
    @classmethod
    def _finite(cls, value: WriteValue) -> WriteValue:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value


class WriteResult(BaseModel):
    """A write the device accepted."""

    point: str
    source: str
    value: WriteValue = Field(description="The value written.")
    written_at: str = Field(description="When the device confirmed it.",
                            json_schema_extra=ISO_TIME)


class JsonBody(Response):
    """JSON built by the handler itself and serialized in Rust.

    The handlers build their bodies from data that is already validated; running them through
    the response model again would double the cost of a large page, on the event loop. The
    models are still declared on each route, for the OpenAPI, and the tests hold the bodies to
    them.
    """

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """The body as compact UTF-8 JSON."""
        return pydantic_core.to_json(content)


# --- errors ---------------------------------------------------------------------------------


class ApiError(Exception):
    """An error response: status, code, message and hint."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        hint: str | None = None,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = ErrorBody(code=code, message=message, hint=hint, details=details)
        self.headers = dict(headers or {})
        super().__init__(message)


def _error_response(
    status: int, body: ErrorBody, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=body).model_dump(mode="json", exclude_none=True),
                        status_code=status, headers=headers)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    problem = cast(ApiError, exc)
    return _error_response(problem.status, problem.body, problem.headers)


_HTTP_CODES = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
    413: "too_large", 415: "unsupported_media_type",
}


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    error = cast(StarletteHTTPException, exc)
    code = _HTTP_CODES.get(error.status_code, "http_error")
    message = str(error.detail)
    hint = None
    if error.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
        hint = "see /docs (or /openapi.json) for the routes this API serves"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        allow = (error.headers or {}).get("Allow")
        hint = f"use {allow}" if allow else None
    return _error_response(error.status_code, ErrorBody(code=code, message=message, hint=hint),
                           error.headers)


async def _on_invalid(request: Request, exc: Exception) -> JSONResponse:
    error = cast(RequestValidationError, exc)
    details = [
        {"location": ".".join(str(part) for part in issue.get("loc", ())),
         "message": issue.get("msg", "invalid"),
         **({"input": issue["input"]} if _is_scalar(issue.get("input")) else {})}
        for issue in error.errors()
    ]
    first = details[0] if details else {"location": "request", "message": "invalid"}
    extra = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return _error_response(422, ErrorBody(
        code="invalid_request",
        message=f"{first['location']}: {first['message']}{extra}",
        hint="fix the listed parameters; /docs describes each one",
        details=details))


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool)


async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
    # The server logs the exception itself once this response is sent.
    return _error_response(500, ErrorBody(
        code="internal", message="the bridge failed to handle this request",
        hint="this is a bug; the daemon log has the traceback"))


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No API key, or an unknown one."},
    403: {"model": ErrorResponse, "description": "The key lacks the scope this route needs."},
    422: {"model": ErrorResponse, "description": "Invalid parameters."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such point or source."}}
DEVICE_ERRORS: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse,
          "description": "The point is not writable (`not_writable`) or its source is "
          "disabled (`source_disabled`)."},
    422: {"model": ErrorResponse,
          "description": "Invalid request, or a value or point the device cannot take "
          "(`rejected`)."},
    502: {"model": ErrorResponse,
          "description": "The device refused (`device_error`, `device_denied`) or answered "
          "something invalid (`protocol_error`)."},
    503: {"model": ErrorResponse,
          "description": "The source is not connected or the device did not answer "
          "(`device_unavailable`)."},
}


# --- dependencies ---------------------------------------------------------------------------


@dataclass
class ApiContext:
    """What the handlers serve from; kept in ``app.state.fieldbridge``."""

    runtime: Runtime
    keys: KeyRing
    hub: EventHub
    """Fans stored events out to the event streams."""
    streams: StreamSettings = field(default_factory=StreamSettings)
    device_requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Live reads and writes by (operation, result): ``ok`` or the error code."""
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the server stops: long-lived responses (event streams) must end on it."""
    _point_ids: tuple[tuple[int, int, int], list[str]] = ((0, -1, -1), [])

    def point_ids(self) -> list[str]:
        """Every configured or stored point id, sorted; recomputed only when the set changes.

        Points are only ever added to the latest values, and a reload replaces the
        configured points' dict, so the dict's identity and both sizes tell a change.
        """
        points, latest = self.runtime.points, self.runtime.router.latest
        key = (id(points), len(points), len(latest))
        if self._point_ids[0] != key:
            self._point_ids = (key, sorted(points.keys() | latest.keys()))
        return self._point_ids[1]

    def close(self) -> None:
        """The server stops: set ``closing`` and end every event stream."""
        self.closing.set()
        self.hub.close()


async def _context(request: Request) -> ApiContext:
    return cast(ApiContext, request.app.state.fieldbridge)


Context = Annotated[ApiContext, Depends(_context)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`.")


async def authorize(
    request: Request,
    context: Context,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> Principal:
    """The caller, if its key has the scope the request needs: ``read`` to read (GET),
    ``write`` for anything else; ``admin`` has both."""
    scope = Scope.READ if request.method in ("GET", "HEAD") else Scope.WRITE
    presented = bearer.credentials if bearer is not None else api_key
    try:
        return context.keys.authorize(presented, scope)
    except AuthError as exc:
        logger.debug("refused %s %s: %s", request.method, request.url.path, exc.message)
        unauthenticated = exc.failure is AuthFailure.UNAUTHENTICATED
        raise ApiError(
            401 if unauthenticated else 403, exc.failure.value, exc.message, exc.hint,
            headers={"WWW-Authenticate": 'Bearer realm="fieldbridge"'} if unauthenticated
            else None) from None


Authorized = Depends(authorize)


# --- helpers --------------------------------------------------------------------------------


def parse_time(text: str, now: float) -> float:
    """ISO 8601 (naive means UTC), POSIX seconds, ``now``, or relative like ``-1h``/``-90s``."""
    text = text.strip()
    if text == "now":
        return now
    if text.startswith("-"):
        return now - float(parse_duration(text[1:]))
    try:
        seconds = float(text)
    except ValueError:
        return parse_timestamp(text)
    if not math.isfinite(seconds):
        raise ValueError("expected a finite number of seconds")
    return seconds


def _time_parameter(name: str, text: str | None, now: float) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text, now)
    except (ValueError, OverflowError):
        raise ApiError(
            422, "invalid_request", f"query.{name}: cannot read '{text}' as a time",
            "give ISO 8601 (2025-01-31T12:00:00Z), POSIX seconds, 'now', or a relative time "
            "such as -15m, -1h or -7d",
            details=[{"location": f"query.{name}", "message": "expected a time",
                      "input": text}]) from None


def _point_value(
    point_id: str, point: ResolvedPoint | None, event: Event | None
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": point_id,
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


def _tag_filters(tags: Sequence[str]) -> list[TagFilter]:
    filters = []
    for text in tags:
        key, equals, value = text.partition("=")
        if not key:
            raise ApiError(
                422, "invalid_request", f"query.tag: '{text}' has no tag name",
                "write tag=key=value (or tag=key for any value); repeat it to require several",
                details=[{"location": "query.tag", "message": "expected key=value",
                          "input": text}])
        filters.append(TagFilter(key, value if equals else None))
    return filters


def _store_problem(exc: Exception) -> ApiError:
    return ApiError(503, "store_unavailable", f"the store cannot be read: {exc}",
                    "check /health/ready and the daemon log")


def _known_point(context: ApiContext, point_id: str) -> ResolvedPoint | None:
    point = context.runtime.points.get(point_id)
    if point is None and point_id not in context.runtime.router.latest:
        raise ApiError(404, "not_found", f"no point '{point_id}'",
                       "GET /v1/points lists the points this bridge serves")
    return point


def _device_target(context: ApiContext, point_id: str) -> tuple[ResolvedPoint, RunningSource]:
    """A configured point and the running source that serves it, for a live read or a write."""
    point = context.runtime.points.get(point_id)
    if point is None:
        stored = point_id in context.runtime.router.latest
        raise ApiError(
            404, "not_found",
            f"point '{point_id}' is no longer configured" if stored else
            f"no point '{point_id}'",
            "only configured points are read from or written to a device; GET /v1/points "
            "lists them")
    running = context.runtime.sources.get(point.source)
    if running is None or not running.enabled:
        raise ApiError(409, "source_disabled",
                       f"source '{point.source}' of point '{point_id}' is disabled",
                       f"enable source '{point.source}' in the configuration")
    return point, running


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


def _device_problem(exc: WriteError, doing: str, source: str) -> ApiError:
    problem = _DEVICE_PROBLEMS[exc.category]
    return ApiError(problem.status, problem.code, f"{doing}: {exc.reason}",
                    problem.hint.replace("{source}", source),
                    headers={"Retry-After": "5"} if problem.status == 503 else None)


@contextlib.contextmanager
def _counted(context: ApiContext, operation: Literal["read", "write"]) -> Iterator[None]:
    """Count a live read or a write by its result, for the metrics."""
    try:
        yield
    except ApiError as exc:
        context.device_requests[operation, exc.body.code] += 1
        raise
    context.device_requests[operation, "ok"] += 1


def _map_live(runtime: Runtime, point: ResolvedPoint, readings: Sequence[Reading]) -> list[Event]:
    """The events of ``point`` in a live read's readings.

    The point is compiled afresh for every live read, with the protocol's own ``build``, and
    mapped by that: the same decoding as the running mapping, but without its
    report-by-exception state, so a live read always yields the value and never moves the
    deadband or heartbeat of what the bridge reports.
    """
    configured = {source.id: source for source in runtime.config.sources}[point.source]
    build = BuildContext(bridge_id=runtime.bridge_id, state_dir=runtime.config.state_dir,
                         config_dir=runtime.config.path.parent)
    mapper = protocols()[configured.protocol].build(configured, [point], build).mapper
    events: list[Event] = []
    for reading in readings:
        try:
            mapped = mapper.map(reading)
        except DecodeError as exc:
            raise ApiError(502, "protocol_error",
                           f"cannot map the live reading of '{point.id}': {exc.reason}",
                           "the device answered something the mapping cannot read; check "
                           "the point's configuration") from exc
        events.extend(event for event in mapped if event.point == point.id)
    return events


def _source_entry(
    entry: Mapping[str, Any], enabled: bool, counts: Counter[tuple[str, str | None]]
) -> dict[str, Any]:
    source_id = entry["id"]
    entry = {**entry, "enabled": enabled,
             "points": sum(count for (source, _), count in counts.items()
                           if source == source_id)}
    if "devices" in entry:
        entry["devices"] = [{**device, "points": counts[source_id, device["id"]]}
                            for device in entry["devices"]]
    return entry


def _point_counts(points: Mapping[str, ResolvedPoint]) -> Counter[tuple[str, str | None]]:
    return Counter((point.source, point.device) for point in points.values())


# --- routes ---------------------------------------------------------------------------------

health = APIRouter(prefix="/health", tags=["health"])
v1 = APIRouter(prefix="/v1", dependencies=[Authorized], responses=ERROR_RESPONSES)
monitoring = APIRouter(tags=["monitoring"], dependencies=[Authorized],
                       responses=ERROR_RESPONSES)

PointId = Annotated[str, Path(description="Point id, e.g. `boiler.supply_temp`.")]


@v1.get("/points", response_model=PointPage, tags=["points"])
async def list_points(
    context: Context,
    source: Annotated[str | None, Query(description="Only points of this source.")] = None,
    device: Annotated[str | None, Query(description="Only points of this device.")] = None,
    tag: Annotated[list[str] | None, Query(
        description="`key=value` (or `key` for any value); repeat to require several.",
    )] = None,
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
    tag_filters = _tag_filters(tag or ())
    qualities = set(quality or ())
    runtime = context.runtime
    points = runtime.points
    latest = runtime.router.latest
    matched: list[dict[str, Any]] = []
    total = 0
    for point_id in context.point_ids():
        if prefix is not None and not point_id.startswith(prefix):
            continue
        point = points.get(point_id)
        event = latest.get(point_id)
        point_source = point.source if point is not None else event.source if event else None
        if source is not None and point_source != source:
            continue
        if device is not None and (point is None or point.device != device):
            continue
        if tag_filters:
            tags = point.tags if point is not None else event.tags if event else {}
            if not all(wanted.matches(tags) for wanted in tag_filters):
                continue
        if qualities and (event.quality.value if event is not None else "none") not in qualities:
            continue
        if offset <= total < offset + limit:
            matched.append(_point_value(point_id, point, event))
        total += 1
    return JsonBody({"total": total, "offset": offset, "limit": limit, "items": matched})


@v1.get("/points/{point_id}", response_model=PointValue, tags=["points"],
        responses=NOT_FOUND)
async def get_point(context: Context, point_id: PointId) -> JsonBody:
    """Latest value and metadata of one point."""
    point = _known_point(context, point_id)
    return JsonBody(_point_value(point_id, point, context.runtime.router.latest.get(point_id)))


@v1.get("/points/{point_id}/history", response_model=History, tags=["points"],
        responses={**NOT_FOUND, 503: {"model": ErrorResponse,
                                      "description": "The store cannot be read."}})
async def point_history(
    context: Context,
    point_id: PointId,
    since: Annotated[str | None, Query(
        description="Oldest time: ISO 8601, POSIX seconds, `now` or relative (`-1h`).")] = None,
    until: Annotated[str | None, Query(
        description="Newest time, in the same forms as `since`.")] = None,
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
    start = _time_parameter("since", since, now)
    end = _time_parameter("until", until, now)
    if start is not None and end is not None and start > end:
        raise ApiError(422, "invalid_request", "query.since is after query.until",
                       "swap them, or leave one out",
                       details=[{"location": "query.since", "message": "after until"}])
    try:
        bodies = context.runtime.store.history_json(
            point_id, since=start, until=end, limit=limit + 1, newest_first=order == "desc")
    except (StoreError, sqlite3.Error) as exc:
        raise _store_problem(exc) from exc
    items = bodies[:limit]
    # The store keeps each event as its documented JSON: join the bodies, don't re-encode.
    head = pydantic_core.to_json({"point": point_id, "order": order, "count": len(items),
                                  "has_more": len(bodies) > limit})
    return Response(head[:-1] + b',"items":[' + ",".join(items).encode() + b"]}",
                    media_type="application/json")


@v1.get("/points/{point_id}/live", response_model=EventModel, tags=["points"],
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
        point, running = _device_target(context, point_id)
        try:
            readings = await running.unit.source.read(point_id)
        except WriteError as exc:
            raise _device_problem(exc, f"cannot read '{point_id}' from the device",
                                  point.source) from exc
        events = _map_live(context.runtime, point, readings)
        if not events:
            raise ApiError(502, "protocol_error", f"the device gave no value for '{point_id}'",
                           "check the point's address against the device")
    return JsonBody(events[-1].to_dict())


@v1.put("/points/{point_id}", response_model=WriteResult, tags=["points"],
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
    with _counted(context, "write"):
        point, running = _device_target(context, point_id)
        if not point.spec.writable:
            audit.info("write refused: key %s, point %s, value %r: the point is not writable",
                       principal.name, point_id, write.value)
            raise ApiError(409, "not_writable", f"point '{point_id}' is not writable",
                           "only points configured with `writable: true` accept writes")
        try:
            await running.unit.source.write(point_id, write.value)
        except WriteError as exc:
            audit.info("write failed: key %s, point %s, value %r: %s (%s)", principal.name,
                       point_id, write.value, exc.reason, exc.category)
            raise _device_problem(exc, f"cannot write {write.value!r} to '{point_id}'",
                                  point.source) from exc
    audit.info("write: key %s, point %s, value %r", principal.name, point_id, write.value)
    return JsonBody({"point": point_id, "source": point.source, "value": write.value,
                     "written_at": isoformat(time.time())})


@v1.get("/events/stream", tags=["events"], response_class=EventStreamResponse, status_code=200,
        responses={
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "Server-Sent Events: `event: event` messages, each with `id:` the "
          "event id and `data:` the normalized event JSON; `event: warning` and "
          "`event: error` messages carry `{code, message, hint}`."},
    503: {"model": ErrorResponse, "description": "The server is stopping, or the store "
          "cannot be read to resume."}})
async def event_stream(
    request: Request,
    context: Context,
    principal: Annotated[Principal, Authorized],
    source: Annotated[str | None, Query(description="Only events of this source.")] = None,
    prefix: Annotated[str | None, Query(
        description="Only points whose id starts with this.")] = None,
    tag: Annotated[list[str] | None, Query(
        description="`key=value` (or `key` for any value); repeat to require several.",
    )] = None,
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
    event_filter = EventFilter(source=source, prefix=prefix, tags=tuple(_tag_filters(tag or ())),
                               qualities=frozenset(quality or ()))
    resume_id = last_event_id_header or last_event_id
    resume = None
    warning = None
    if resume_id:
        try:
            seq = context.runtime.store.history_seq(resume_id)
        except (StoreError, sqlite3.Error) as exc:
            raise _store_problem(exc) from exc
        if seq is None:
            warning = {
                "code": "unknown_last_event_id",
                "message": f"event '{resume_id}' is not in the history (pruned, or not "
                "stored by this bridge); events stored since then cannot be replayed, the "
                "stream starts with live events",
                "hint": "GET /v1/points/{id}/history?since=... has what is still stored",
                "last_event_id": resume_id,
            }
        else:
            resume = Resume(resume_id, seq)
    peer = f"{request.client.host}:{request.client.port}" if request.client else "client"
    return EventStreamResponse(context.hub, event_filter, context.streams,
                               store=context.runtime.store, resume=resume, warning=warning,
                               client=f"{peer} (key {principal.name})")


@v1.get("/sources", response_model=SourceList, tags=["sources"])
async def list_sources(context: Context) -> JsonBody:
    """Every configured source with its state, last error, counters and devices."""
    runtime = context.runtime
    counts = _point_counts(runtime.points)
    return JsonBody({"items": [
        _source_entry(entry, runtime.sources[str(entry["id"])].enabled, counts)
        for entry in runtime.inventory()
    ]})


@v1.get("/sources/{source_id}", response_model=SourceModel, tags=["sources"],
        responses=NOT_FOUND)
async def get_source(
    context: Context, source_id: Annotated[str, Path(description="Source id.")]
) -> JsonBody:
    """One source with its state, last error, counters and devices."""
    runtime = context.runtime
    running = runtime.sources.get(source_id)
    if running is None:
        raise ApiError(404, "not_found", f"no source '{source_id}'",
                       "GET /v1/sources lists the configured sources")
    return JsonBody(_source_entry(running.status.to_dict(), running.enabled,
                                  _point_counts(runtime.points)))


@v1.get("/sinks", response_model=SinkList, tags=["sinks"])
async def list_sinks(context: Context) -> JsonBody:
    """Every configured sink with its state, counters, outbox and delivery figures."""
    return JsonBody({"items": context.runtime.sink_inventory()})


@v1.get("/sinks/{sink_id}", response_model=SinkModel, tags=["sinks"], responses=NOT_FOUND)
async def get_sink(
    context: Context, sink_id: Annotated[str, Path(description="Sink id.")]
) -> JsonBody:
    """One sink with its state, counters, outbox and delivery figures."""
    if sink_id not in context.runtime.sinks:
        raise ApiError(404, "not_found", f"no sink '{sink_id}'",
                       "GET /v1/sinks lists the configured sinks")
    return JsonBody(context.runtime.sink_entry(sink_id))


@health.get("/live", response_model=Liveness)
async def live(context: Context) -> dict[str, Any]:
    """200 while the daemon's event loop runs (this handler runs on it)."""
    return {"status": "alive", "version": __version__,
            "uptime_seconds": round(time.time() - context.runtime.started_at, 3)}


@health.get("/ready", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready; see `reasons`."}})
async def ready(context: Context) -> Any:
    """200 once every source is started and the store can be read; 503 with reasons before.

    A source being down does not make the bridge unready (it still serves the last values);
    the per-source states are listed so a probe or a person can see it.
    """
    runtime = context.runtime
    reasons = []
    if not runtime.ready.is_set():
        reasons.append("starting: the sources are not all started yet")
    try:
        # One indexed lookup: proves the store is open and readable.
        runtime.store.history_count("")
    except (StoreError, sqlite3.Error) as exc:
        reasons.append(f"the store cannot be read: {exc}")
    states = {source_id: running.status.state.value
              for source_id, running in runtime.sources.items()}
    body: dict[str, Any] = {
        "status": "not_ready" if reasons else "ready",
        "reasons": reasons,
        "sources": states,
        "summary": dict(Counter(states.values())),
    }
    if not reasons:
        return body
    body["error"] = ErrorBody(
        code="not_ready", message="; ".join(reasons),
        hint="wait for startup to finish; if it does not, check the daemon log").model_dump(
        exclude_none=True)
    return JSONResponse(Readiness.model_validate(body).model_dump(mode="json"), status_code=503)


@monitoring.get("/metrics", response_class=PlainTextResponse, responses={
    200: {"content": {metrics.CONTENT_TYPE: {}},
          "description": "Prometheus text exposition format 0.0.4."}})
async def prometheus_metrics(context: Context) -> PlainTextResponse:
    """Counters and states of the router, the store and every source and device."""
    return PlainTextResponse(metrics.render(context.runtime, context.keys)
                             + _api_metrics(context), media_type=metrics.CONTENT_TYPE)


def _api_metrics(context: ApiContext) -> str:
    """The event streams' and the device requests' families."""
    exposition = metrics.Exposition()
    hub = context.hub
    exposition.family("fieldbridge_api_stream_clients", "gauge",
                      "Event stream clients connected.").add(hub.clients)
    exposition.family("fieldbridge_api_streams_total", "counter",
                      "Event streams opened.").add(hub.counters["streams"])
    exposition.family("fieldbridge_api_stream_events_total", "counter",
                      "Events queued for event stream clients.").add(hub.counters["events"])
    ended = exposition.family(
        "fieldbridge_api_streams_ended_total", "counter",
        "Event streams ended, by reason (slow_consumer and stalled: the client was dropped).")
    for reason in get_args(EndReason):
        ended.add(hub.counters[f"ended_{reason}"], reason=reason)
    requests = exposition.family(
        "fieldbridge_api_device_requests_total", "counter",
        "Live reads and writes through the API, by operation and result (ok or the error "
        "code).")
    for (operation, result), count in sorted(context.device_requests.items()):
        requests.add(count, operation=operation, result=result)
    return exposition.render()


def create_app(runtime: Runtime, *, streams: StreamSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``runtime``; ``streams`` sets the event streams'
    limits (the defaults suit production)."""
    keys = KeyRing(runtime.config.api.keys)
    auth_note = ("Every `/v1` route and `/metrics` need an API key, as `Authorization: Bearer "
                 "<key>` or `X-API-Key: <key>`, with the `read` scope (`write` to change "
                 "anything; `admin` has all scopes)." if keys.enabled else
                 "No API keys are configured: every route is open. The API listens on "
                 "loopback unless `api.host` says otherwise; configure `api.keys` before "
                 "exposing it.")
    app = FastAPI(
        title="Fieldbridge",
        version=__version__,
        description="Latest values, history, live reads, write-back, a live event stream "
        f"and the inventory of a Fieldbridge instance (`{runtime.bridge_id}`). Errors are "
        f"`{{\"error\": {{\"code\", \"message\", \"hint\"}}}}`.\n\n{auth_note} "
        "Health endpoints are always open.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.fieldbridge = ApiContext(runtime=runtime, keys=keys,
                                       hub=EventHub(runtime.router),
                                       streams=streams or StreamSettings())
    app.include_router(v1)
    app.include_router(health)
    app.include_router(monitoring)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(Exception, _on_crash)
    return app


# --- server ---------------------------------------------------------------------------------


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the daemon: no signal handling of its own, and an event once serving."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.settled = asyncio.Event()
        """Set once the server accepts connections, or once it has failed to."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The daemon owns SIGTERM and SIGINT; it stops the server through ApiServer.stop().
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.settled.set()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().serve(sockets=sockets)
        finally:
            self.settled.set()


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to, all on one port."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ApiServerError(host, port, f"cannot resolve '{host}': {exc.strerror}") from exc
    addresses = list(dict.fromkeys(
        (family, proto, address) for family, _, proto, _, address in infos))
    sockets: list[socket.socket] = []
    try:
        for family, proto, address in addresses:
            if sockets:  # port 0: every address on the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            # The protocol must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only then, and
            # without it small responses wait ~40 ms for a delayed ACK.
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and len(addresses) > 1:
                    # The IPv4 address gets its own socket, as asyncio does it.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
            except OSError as exc:
                sock.close()
                if sockets and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    continue  # e.g. "localhost" resolves to ::1 but IPv6 is disabled
                raise
            sockets.append(sock)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ApiServerError(host, port, exc.strerror or str(exc)) from exc
    return sockets


def _loopback_only(sockets: Sequence[socket.socket]) -> bool:
    return all(ipaddress.ip_address(sock.getsockname()[0]).is_loopback for sock in sockets)


def _abort_unflushed(server: uvicorn.Server) -> None:
    """Drop the connections that are closed but still flushing to a client that reads
    nothing (a dropped event stream): uvicorn would wait for them to drain before it stops."""
    for connection in list(server.server_state.connections):
        if connection.transport.is_closing():
            connection.transport.abort()


class ApiServer:
    """The API served by uvicorn as the task ``api``, on the daemon's event loop."""

    STOP_TIMEOUT = 2.5
    """Seconds ``stop()`` waits for requests to finish before cancelling them."""

    def __init__(self, runtime: Runtime, *, streams: StreamSettings | None = None) -> None:
        self.runtime = runtime
        self.app = create_app(runtime, streams=streams)
        self.context: ApiContext = self.app.state.fieldbridge
        self.port: int | None = None
        """The port it listens on, once started (the real one when configured as 0)."""
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str | None:
        """The base URL, once started."""
        if self.port is None:
            return None
        api = self.runtime.config.api
        return f"{'https' if api.tls else 'http'}://{_address(api.host, self.port)}"

    async def start(self) -> None:
        """Bind, start serving, and return once connections are accepted.

        Raises ``ApiServerError`` naming host:port when the address cannot be bound or the
        TLS certificate cannot be loaded.
        """
        if self._task is not None:
            raise RuntimeError("the API server is already started")
        api = self.runtime.config.api
        sockets = _bind(api.host, api.port)
        config = uvicorn.Config(
            self.app,
            log_config=None,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=1,
            ssl_certfile=api.tls.cert if api.tls else None,
            ssl_keyfile=api.tls.key if api.tls else None,
        )
        try:
            config.load()
        except OSError as exc:  # ssl.SSLError is an OSError; only TLS files are read here
            for sock in sockets:
                sock.close()
            files = f" {api.tls.cert} with key {api.tls.key}" if api.tls else ""
            raise ApiServerError(api.host, api.port,
                                 f"cannot load TLS certificate{files}: {exc}") from exc
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=sockets), name="api")
        await server.settled.wait()
        if task.done():
            for sock in sockets:
                sock.close()
            failure = task.exception() if not task.cancelled() else None
            raise ApiServerError(api.host, api.port, f"the server did not start: {failure}")
        task.add_done_callback(self._finished)
        self._server, self._task = server, task
        self.port = int(sockets[0].getsockname()[1])
        logger.info("API listening on %s", self.url)
        if not self.runtime.config.api.keys and not _loopback_only(sockets):
            logger.warning("API listens on %s without api.keys: anyone who can reach it can "
                           "read every point", self.url)

    def _finished(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("API server failed", exc_info=task.exception())

    async def stop(self) -> None:
        """Stop accepting, let running requests finish briefly, and leave no task behind."""
        server, task = self._server, self._task
        if server is None or task is None:
            return
        self._server = self._task = None
        self.context.close()  # event streams end now: stopping does not wait for them
        server.should_exit = True
        deadline = asyncio.get_running_loop().time() + self.STOP_TIMEOUT
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self.context.hub.wait_for_clients(0)
            _abort_unflushed(server)
            done, _ = await asyncio.wait(
                {task}, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
            if not done:
                server.force_exit = True
                task.cancel()
            # Requests past uvicorn's graceful timeout are cancelled, maybe not yet finished.
            requests = set(server.server_state.tasks)
            for request in requests:
                request.cancel()
            await asyncio.wait({task, *requests})
        finally:
            if not task.done():
                task.cancel()
        self.port = None
