"""What every handler serves from, and the dependencies and parameter helpers they share.

``ApiContext`` lives in ``app.state.fieldbridge``: the runtime's facade, the API keys, the
event hub and the API's own counters. ``authorize`` checks the caller's key for the scope a
request needs; the helpers turn bad parameters into structured ``ApiError``s.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, cast

from fastapi import Depends, Path, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client.registry import CollectorRegistry
from pydantic import WithJsonSchema

from bridge.api.auth import AuthError, AuthFailure, KeyRing, Principal, Scope
from bridge.api.event_hub import EventHub, StreamSettings
from bridge.config.models import parse_duration
from bridge.core.model import parse_timestamp
from bridge.errors import ApiError, StoreError
from bridge.facade import ApiFacade, TagFilter

logger = logging.getLogger(__name__)

MAX_PAGE = 10_000
"""The most points or history rows one request returns."""


@dataclass
class ApiContext:
    """What the handlers serve from; kept in ``app.state.fieldbridge``."""

    runtime: ApiFacade
    keys: KeyRing
    hub: EventHub
    """Fans stored events out to the event streams."""
    metrics: CollectorRegistry
    """The collectors ``/metrics`` exposes: this app's own, not the global registry."""
    device_requests: Counter[tuple[str, str]]
    """Live reads and writes by (operation, result): ``ok`` or the error code."""
    streams: StreamSettings = field(default_factory=StreamSettings)
    discovery: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while a discovery runs: one at a time."""
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the server stops: long-lived responses (event streams) must end on it."""

    def close(self) -> None:
        """The server stops: set ``closing`` and end every event stream."""
        self.closing.set()
        self.hub.close()


async def _context(request: Request) -> ApiContext:
    return cast(ApiContext, request.app.state.fieldbridge)


Context = Annotated[ApiContext, Depends(_context)]
"""The handler's ``ApiContext``."""

PointId = Annotated[str, Path(description="Point id, e.g. `boiler.supply_temp`.")]
"""The ``{point_id}`` of a route."""

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`.")


async def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> str | None:
    """The key a request presents: a bearer token, else an ``X-API-Key`` header."""
    return bearer.credentials if bearer is not None else api_key


PresentedKey = Annotated[str | None, Depends(presented_key)]
"""The key of the request (both schemes are documented in the OpenAPI)."""


async def authorize(request: Request, context: Context, presented: PresentedKey) -> Principal:
    """The caller, if its key has the scope the request needs: ``read`` to read (GET),
    ``write`` for anything else; ``admin`` has both."""
    scope = Scope.READ if request.method in ("GET", "HEAD") else Scope.WRITE
    try:
        return context.keys.authorize(presented, scope)
    except AuthError as exc:
        raise _refused(request, exc) from None


async def authorize_admin(request: Request, context: Context,
                          presented: PresentedKey) -> Principal:
    """The caller, if its key has the ``admin`` scope."""
    try:
        return context.keys.authorize(presented, Scope.ADMIN)
    except AuthError as exc:
        raise _refused(request, exc) from None


async def identify(request: Request, context: Context, presented: PresentedKey) -> Principal:
    """The caller, if its key is known, whatever its scopes (``GET /v1/whoami``)."""
    try:
        return context.keys.identify(presented)
    except AuthError as exc:
        raise _refused(request, exc) from None


def _refused(request: Request, exc: AuthError) -> ApiError:
    """The 401 or 403 of a refused request."""
    logger.debug("refused %s %s: %s", request.method, request.url.path, exc.message)
    unauthenticated = exc.failure is AuthFailure.UNAUTHENTICATED
    return ApiError(
        401 if unauthenticated else 403, exc.failure.value, exc.message, exc.hint,
        headers={"WWW-Authenticate": 'Bearer realm="fieldbridge"'} if unauthenticated
        else None)


Authorized = Depends(authorize)
"""The dependency that refuses a request without a key carrying the scope it needs."""

Identified = Depends(identify)
"""The dependency that refuses a request without a known key (any scope)."""


TIME_PATTERN = (
    r"^(now|-[0-9]+(\.[0-9]+)?(ms|s|m|h|d)?|[0-9]+(\.[0-9]+)?"
    r"|[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"([Tt ]([01][0-9]|2[0-3])(:[0-5][0-9](:[0-5][0-9]([.,][0-9]+)?)?)?"
    r"([Zz]|[+-]([01][0-9]|2[0-3])(:?[0-5][0-9])?)?)?)$")
"""The forms of a time parameter (``since``, ``until``) as the OpenAPI documents them:
``now``, a relative time (``-15m``), POSIX seconds, or ISO 8601. ``parse_time`` reads them
and answers a value it cannot read with a 422 that names the forms."""

TimeQuery = Annotated[
    Annotated[str, WithJsonSchema({"type": "string", "pattern": TIME_PATTERN})] | None,
    Query(description="ISO 8601 (`2025-01-31T12:00:00Z`; naive means UTC), POSIX seconds, "
          "`now`, or relative to now (`-15m`, `-1h`, `-7d`)."),
]
"""A time query parameter, read with ``time_parameter``."""

TAG_PATTERN = r"^[^=]"
"""A tag filter names its tag first (``key`` or ``key=value``); ``tag_filters`` answers one
that does not with a 422."""

TagQuery = Annotated[
    list[Annotated[str, WithJsonSchema({"type": "string", "pattern": TAG_PATTERN})]] | None,
    Query(description="`key=value` (or `key` for any value); repeat to require several."),
]
"""The ``tag`` query parameter, read with ``tag_filters``."""


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


def time_parameter(name: str, text: str | None, now: float) -> float | None:
    """The query parameter ``name`` read as a time; a structured 422 when it is not one."""
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


def tag_filters(tags: Sequence[str]) -> tuple[TagFilter, ...]:
    """The ``tag`` query parameters (``key=value`` or ``key``); a structured 422 for one
    without a name (``TAG_PATTERN``)."""
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
    return tuple(filters)


def store_problem(exc: StoreError) -> ApiError:
    """The 503 of a store that cannot be read."""
    return ApiError(503, "store_unavailable", f"the store cannot be read: {exc}",
                    "check /health/ready and the daemon log")
