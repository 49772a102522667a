"""Health (``/health/live``, ``/health/ready``: always open) and Prometheus ``/metrics``."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client.exposition import generate_latest

from bridge import __version__
from bridge.api.context import Authorized, Context
from bridge.api.metrics import CONTENT_TYPE
from bridge.api.models import ERROR_RESPONSES, ErrorBody, Liveness, Readiness

health = APIRouter(prefix="/health", tags=["health"])
monitoring = APIRouter(tags=["monitoring"], dependencies=[Authorized],
                       responses=ERROR_RESPONSES)


@health.get("/live", response_model=Liveness)
async def live(context: Context) -> dict[str, Any]:
    """200 while the daemon's event loop runs (this handler runs on it)."""
    return {"status": "alive", "version": __version__,
            "uptime_seconds": round(time.time() - context.runtime.started_at, 3)}


@health.get("/ready", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready; see `reasons`."}})
async def ready(context: Context) -> Any:
    """200 once every source is started and the store can be read and written; 503 with
    reasons otherwise (the store's disk full, say).

    A source being down does not make the bridge unready (it still serves the last values);
    the per-source states are listed so a probe or a person can see it.
    """
    facts = context.runtime.readiness()
    reasons = []
    if not facts.started:
        reasons.append("starting: the sources are not all started yet")
    if facts.store_problem is not None:
        reasons.append(f"the store cannot be read: {facts.store_problem}")
    if facts.store_paused is not None:
        reasons.append(f"store: {facts.store_paused}; sources wait until it can write again")
    body: dict[str, Any] = {
        "status": "not_ready" if reasons else "ready",
        "reasons": reasons,
        "sources": facts.source_states,
        "summary": dict(Counter(facts.source_states.values())),
    }
    if not reasons:
        return body
    body["error"] = ErrorBody(
        code="not_ready", message="; ".join(reasons),
        hint=("free space on the store's disk (store.min_free is the reserve kept); the "
              "bridge resumes by itself" if facts.store_paused is not None else
              "wait for startup to finish; if it does not, check the daemon log")).model_dump(
        exclude_none=True)
    return JSONResponse(Readiness.model_validate(body).model_dump(mode="json"), status_code=503)


# ``response_class=Response``: the 200 is documented in the exposition format alone, and the
# errors as the JSON they are.
@monitoring.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE: {}},
          "description": "Prometheus text exposition format 0.0.4."}})
async def prometheus_metrics(context: Context) -> PlainTextResponse:
    """Counters and states of the router, the store and every source and device."""
    return PlainTextResponse(generate_latest(context.metrics), media_type=CONTENT_TYPE)
