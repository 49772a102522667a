"""Request bodies: authenticated before they are read, and read only up to ``api.max_body``.

FastAPI reads and parses a request's body before it runs the route's dependencies, the key
check among them: a large body sent without a key would be buffered whole only to be
answered 401. ``BodyGuard`` checks the key of every ``/v1`` request that carries a body
before the application reads a byte of it, then refuses a ``Content-Length`` past the limit.
Either refusal leaves the connection open: closing it with the body unread would reset it,
and the client might lose the answer; what the client still sends is read and dropped, and
the connection is dropped once ``api.header_timeout`` passes without a new request
(``bridge.api.connections``). A body without a length
(chunked) is counted while it is read by Starlette's ``RequestBodyLimitMiddleware``, inside
this one, which answers 413 as soon as the chunks read pass the limit.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from bridge.api.auth import AuthError, AuthFailure, KeyRing
from bridge.api.auth import Scope as KeyScope
from bridge.api.handlers import error_response
from bridge.api.models import ErrorBody

logger = logging.getLogger(__name__)


class BodyGuard:
    """ASGI middleware: a ``/v1`` request with a body and no valid key is refused unread, and
    so is a body whose declared length is past ``max_body``."""

    def __init__(self, app: ASGIApp, keys: KeyRing, max_body: int) -> None:
        self.app = app
        self.keys = keys
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse, or pass the request on untouched."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length", "0")
        if length == "0" and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body: the route checks the key itself
            return
        if self.keys.enabled and str(scope["path"]).startswith("/v1/"):
            refusal = self._unauthorized(scope, headers)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        if length.isdigit() and int(length) > self.max_body:
            response = error_response(413, ErrorBody(
                code="too_large",
                message=f"the request body is {int(length):,} bytes; at most "
                f"{self.max_body:,} are accepted",
                hint="send a smaller body (api.max_body sets the limit)"))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _unauthorized(self, scope: Scope, headers: Headers) -> Response | None:
        needed = KeyScope.READ if scope["method"] in ("GET", "HEAD") else KeyScope.WRITE
        try:
            self.keys.authorize(_presented_key(headers), needed)
        except AuthError as exc:
            logger.debug("refused %s %s before reading its body: %s", scope["method"],
                         scope["path"], exc.message)
            unauthenticated = exc.failure is AuthFailure.UNAUTHENTICATED
            return error_response(
                401 if unauthenticated else 403,
                ErrorBody(code=exc.failure.value, message=exc.message, hint=exc.hint),
                {"WWW-Authenticate": 'Bearer realm="fieldbridge"'} if unauthenticated else None)
        return None


def _presented_key(headers: Headers) -> str | None:
    """The key as ``authorize`` reads it: ``Authorization: Bearer`` first, then
    ``X-API-Key``."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key") or None
