"""The API's request and response models, and the error responses each route documents.

The handlers build their bodies themselves (``bridge.api.handlers.JsonBody``); these models
give the OpenAPI document its schemas, and the tests hold the bodies to them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic.config import JsonDict

from bridge.core.model import Quality
from bridge.core.schema import event_fields

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


def _event_model() -> type[BaseModel]:
    """The event's response model, derived field by field from its one declaration
    (``bridge.core.model.Event``, through ``bridge.core.schema.event_fields``)."""
    fields: dict[str, Any] = {
        field.name: (field.type, Field(description=field.description,
                                       json_schema_extra=field.json_schema_extra or None))
        for field in event_fields()}
    model: type[BaseModel] = create_model(
        "EventModel", __doc__="The normalized event (see the event JSON Schema).", **fields)
    return model


if TYPE_CHECKING:
    class EventModel(BaseModel):
        """The normalized event, as the type checker sees it: built from the declaration."""
else:
    EventModel = _event_model()


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
    paused: str | None = Field(
        default=None, description="Why the source's events wait, when the bridge holds them "
        "back: `store: disk full: ...` while the store cannot write (nothing is acknowledged "
        "upstream meanwhile).")


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


class ServerModel(BaseModel):
    """A configured northbound server: state, port and counters (requests, exceptions,
    clients); ``details``: connected_clients and what it serves."""

    model_config = ConfigDict(extra="allow")

    id: str
    kind: Literal["server"]
    protocol: str
    endpoint: str = Field(description="Where it listens.")
    enabled: bool
    port: int | None = Field(description="The port it listens on; unset while not serving.")
    state: Literal["connecting", "up", "degraded", "down", "disabled"]
    since: str | None = Field(json_schema_extra=ISO_TIME)
    counters: dict[str, int]
    details: dict[str, Any]


class ServerList(BaseModel):
    """Every configured northbound server."""

    items: list[ServerModel]


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


class StreamNotice(BaseModel):
    """The data of an event stream's ``warning`` or ``error`` message."""

    code: str = Field(description="Stable machine-readable code, e.g. `slow_consumer`.")
    message: str = Field(description="What happened, for a person.")
    hint: str = Field(description="What to do about it.")
    last_event_id: str | None = Field(
        default=None, description="The event to resume after (`Last-Event-ID`); null when "
        "the stream sent none yet.")


def event_stream_content(**messages: dict[str, Any]) -> dict[str, Any]:
    """The ``text/event-stream`` content of a streaming route's 200: each message is one item
    (OpenAPI 3.2 ``itemSchema``, as FastAPI documents its own streams) whose ``event`` names
    its kind and whose ``data`` is JSON of the schema given for that kind."""
    kinds = [{
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": schema},
        },
    } for name, schema in messages.items()]
    return {"text/event-stream": {"itemSchema": {"oneOf": kinds}}}


def component(model: type[BaseModel]) -> dict[str, str]:
    """A reference to ``model`` in the OpenAPI components (a model some route returns)."""
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def inline(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema of a flat ``model`` (no nested models), to inline in the OpenAPI."""
    return model.model_json_schema()


# What routes document besides their 200 (the handlers raise ``ApiError`` for these).

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
