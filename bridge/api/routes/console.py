"""The console at ``/`` and the API documentation at ``/docs``, both served from files inside
installed packages, so neither needs the internet.

The console is a page of hand-written HTML, CSS and JavaScript in ``bridge/api/console/``
(package data) and the vendored uPlot chart library with its licence; it reads the API
with the key the operator gives it. ``/docs`` is Swagger UI from the ``fastapi-offline``
distribution's files instead of a CDN.
"""

from __future__ import annotations

import functools
import importlib.resources

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

CONSOLE_PACKAGE = "bridge.api"
CONSOLE_DIRECTORY = "console"
"""The console's files: ``bridge/api/console/`` inside the installed package."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'")
"""The console's policy: the browser itself refuses anything not served by this API (uPlot
sets element styles, hence inline styles)."""

router = APIRouter(include_in_schema=False)


@functools.cache
def _index() -> str:
    return (importlib.resources.files(CONSOLE_PACKAGE) / CONSOLE_DIRECTORY / "index.html"
            ).read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
async def console() -> HTMLResponse:
    """The console page; its data comes from the API, with the operator's key."""
    return HTMLResponse(_index(), headers={
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    })


def install(app: FastAPI) -> None:
    """Serve the console at ``/`` (assets under ``/console/``) and Swagger UI at ``/docs``
    (assets under ``/docs/assets/``) on ``app``, whose own ``docs_url`` must be off."""
    app.include_router(router)
    app.mount("/console", StaticFiles(packages=[(CONSOLE_PACKAGE, CONSOLE_DIRECTORY)]),
              name="console")
    app.mount("/docs/assets", StaticFiles(packages=[("fastapi_offline", "static")]),
              name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    title = f"{app.title} API"

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    async def docs() -> HTMLResponse:
        """Swagger UI, from the packaged assets."""
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=title,
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon.png",
            # The validator badge would ask a public server about the document.
            swagger_ui_parameters={"validatorUrl": None})
