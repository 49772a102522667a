"""``/v1/sources``, ``/v1/sinks`` and ``/v1/servers``: every configured endpoint with its
state, last error and counters (sources with their devices, sinks with their outbox and
delivery figures, northbound servers with their clients and requests)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from bridge.api.context import Authorized, Context
from bridge.api.handlers import JsonBody
from bridge.api.models import (
    ERROR_RESPONSES,
    NOT_FOUND,
    ServerList,
    SinkList,
    SinkModel,
    SourceList,
    SourceModel,
)
from bridge.errors import ApiError

router = APIRouter(prefix="/v1", dependencies=[Authorized], responses=ERROR_RESPONSES)


@router.get("/sources", response_model=SourceList, tags=["sources"])
async def list_sources(context: Context) -> JsonBody:
    """Every configured source with its state, last error, counters and devices."""
    return JsonBody({"items": context.runtime.sources()})


@router.get("/sources/{source_id}", response_model=SourceModel, tags=["sources"],
            responses=NOT_FOUND)
async def get_source(
    context: Context, source_id: Annotated[str, Path(description="Source id.")]
) -> JsonBody:
    """One source with its state, last error, counters and devices."""
    try:
        entry = context.runtime.source(source_id)
    except KeyError:
        raise ApiError(404, "not_found", f"no source '{source_id}'",
                       "GET /v1/sources lists the configured sources") from None
    return JsonBody(entry)


@router.get("/sinks", response_model=SinkList, tags=["sinks"])
async def list_sinks(context: Context) -> JsonBody:
    """Every configured sink with its state, counters, outbox and delivery figures."""
    return JsonBody({"items": context.runtime.sinks()})


@router.get("/sinks/{sink_id}", response_model=SinkModel, tags=["sinks"], responses=NOT_FOUND)
async def get_sink(
    context: Context, sink_id: Annotated[str, Path(description="Sink id.")]
) -> JsonBody:
    """One sink with its state, counters, outbox and delivery figures."""
    try:
        entry = context.runtime.sink(sink_id)
    except KeyError:
        raise ApiError(404, "not_found", f"no sink '{sink_id}'",
                       "GET /v1/sinks lists the configured sinks") from None
    return JsonBody(entry)


@router.get("/servers", response_model=ServerList, tags=["servers"])
async def list_servers(context: Context) -> JsonBody:
    """Every configured northbound server with its state, port, clients and request
    counters."""
    return JsonBody({"items": context.runtime.servers()})
