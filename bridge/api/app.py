"""The REST API's FastAPI application: latest values, history, live reads, write-back, the
event and status streams, inventory, health and metrics, and the console at ``/``.

The API listens on loopback (``127.0.0.1:8780``) unless ``api.host`` says otherwise. With no
``api.keys`` configured it needs no authentication, so expose it beyond loopback only with keys
(and ``api.tls``). Health endpoints, the console page, ``/docs`` and ``/openapi.json`` are
always open (the console asks for a key to read the data). The
routes live in ``bridge.api.routes``, one module per resource; ``bridge.api.server`` serves
the app on uvicorn inside the daemon's event loop.
"""

from __future__ import annotations

from collections import Counter

from fastapi import FastAPI
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from bridge import __version__
from bridge.api import handlers, metrics
from bridge.api.auth import KeyRing
from bridge.api.bodies import BodyGuard
from bridge.api.context import ApiContext
from bridge.api.event_hub import EventHub, StreamSettings
from bridge.api.routes import console, discover, events, health, inventory, points, status
from bridge.facade import ApiFacade


def create_app(runtime: ApiFacade, *, streams: StreamSettings | None = None) -> FastAPI:
    """The FastAPI application serving a runtime through its facade; ``streams`` sets the
    event streams' limits (the defaults suit production)."""
    keys = KeyRing(runtime.api.keys)
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
        docs_url=None,  # served from packaged assets by ``console.install``
        redoc_url=None,
    )
    hub = EventHub(runtime)
    device_requests: Counter[tuple[str, str]] = Counter()
    app.state.fieldbridge = ApiContext(
        runtime=runtime, keys=keys, hub=hub,
        metrics=metrics.registry(runtime, keys=keys, hub=hub, device_requests=device_requests),
        device_requests=device_requests,
        streams=streams or StreamSettings(max_bytes=runtime.api.stream_max_bytes))
    app.include_router(points.router)
    app.include_router(events.router)
    app.include_router(inventory.router)
    app.include_router(discover.router)
    app.include_router(status.router)
    app.include_router(health.health)
    app.include_router(health.monitoring)
    console.install(app)
    handlers.install(app)
    # The last added runs first: the key and the declared length are checked before the
    # body is read, and what has no declared length is counted while it is read.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=runtime.api.max_body)
    app.add_middleware(BodyGuard, keys=keys, max_body=runtime.api.max_body)
    return app
