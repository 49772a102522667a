"""How responses are written: the JSON body the handlers build, and the exception handlers
that turn every error into the structured ``{"error": {code, message, hint}}`` body."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, cast

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from bridge.api.models import ErrorBody, ErrorResponse
from bridge.errors import EXCERPT_CHARS, ApiError, excerpt


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


def error_response(
    status: int, body: ErrorBody, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The structured error response."""
    return JSONResponse(ErrorResponse(error=body).model_dump(mode="json", exclude_none=True),
                        status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(Exception, _on_crash)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    problem = cast(ApiError, exc)
    return error_response(problem.status, ErrorBody(
        code=problem.code, message=problem.message, hint=problem.hint,
        details=problem.details), problem.headers)


_HTTP_CODES = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
    413: "too_large", 415: "unsupported_media_type",
}


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    error = cast(StarletteHTTPException, exc)
    if error.status_code == 400 and error.__cause__ is not None:
        # FastAPI's one 400: a JSON body it could not parse, not UTF-8 or nested past the
        # parser's depth. Any other body that is not JSON is a 422 (``json_invalid``); these
        # are answered the same way.
        deep = isinstance(error.__cause__, RecursionError)
        problem = "the JSON nests too deeply" if deep else "the body is not UTF-8 JSON"
        return error_response(422, ErrorBody(
            code="invalid_request", message=f"body: {problem}",
            hint="send the body as JSON in UTF-8; /docs describes each route's body",
            details=[{"location": "body", "message": "expected JSON nested at most a few "
                      "hundred levels" if deep else "expected UTF-8 JSON"}]))
    code = _HTTP_CODES.get(error.status_code, "http_error")
    message = str(error.detail)
    hint = None
    headers = dict(error.headers or {})
    if error.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
        hint = "see /docs (or /openapi.json) for the routes this API serves"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        allow = _allowed_methods(request) or headers.get("Allow")
        if allow:
            headers["Allow"] = allow
        hint = f"use {allow}" if allow else None
    return error_response(error.status_code, ErrorBody(code=code, message=message, hint=hint),
                          headers or None)


def _allowed_methods(request: Request) -> str | None:
    """The methods the OpenAPI documents at the request's path (``Allow``); ``None`` for a
    path it does not document. Starlette would name only those of the first route there,
    and ``/v1/points/{point_id}`` has one route for ``GET`` and another for ``PUT``."""
    path = request.url.path
    for template, operations in request.app.openapi().get("paths", {}).items():
        if _path_pattern(template).fullmatch(path):
            return ", ".join(method.upper() for method in operations if method in _METHODS)
    return None


_METHODS = frozenset({"get", "head", "post", "put", "patch", "delete", "options", "trace"})


@functools.cache
def _path_pattern(template: str) -> re.Pattern[str]:
    pattern, _, _ = compile_path(template)
    return pattern


async def _on_invalid(request: Request, exc: Exception) -> JSONResponse:
    error = cast(RequestValidationError, exc)
    details = [
        {"location": ".".join(str(part) for part in issue.get("loc", ())),
         "message": issue.get("msg", "invalid"),
         **({"input": _quoted(issue["input"])} if _is_scalar(issue.get("input")) else {})}
        for issue in error.errors()
    ]
    first = details[0] if details else {"location": "request", "message": "invalid"}
    extra = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return error_response(422, ErrorBody(
        code="invalid_request",
        message=f"{first['location']}: {first['message']}{extra}",
        hint="fix the listed parameters; /docs describes each one",
        details=details))


def _quoted(value: object) -> object:
    """A refused input as the response echoes it: a long string as an excerpt."""
    return excerpt(value) if isinstance(value, str) and len(value) > EXCERPT_CHARS else value


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool)


async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
    # The server logs the exception itself once this response is sent.
    return error_response(500, ErrorBody(
        code="internal", message="the bridge failed to handle this request",
        hint="this is a bug; the daemon log has the traceback"))
