"""Connection limits that uvicorn does not enforce by itself.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) only after a first
response, and counts its ``limit_concurrency`` only when a request arrives: a client that
connects and sends nothing, or sends its request head a byte at a time, holds its connection
and a file descriptor for ever. ``limited_protocol`` (``bridge/api/uvicorn_adapter.py``)
extends uvicorn's HTTP/1.1 protocol with these rules; this module holds the limits and the
answers, without uvicorn:

- a connection past ``api.max_connections`` is answered ``503`` and closed at once, except
  for ``HEALTH_RESERVE`` more that may ask ``/health/...`` only (and are closed after the
  answer): a monitor can tell a busy API from a dead one;
- a request head (request line and headers) must arrive within ``api.header_timeout`` of the
  connection opening, or of the end of the keep-alive time after a response; a client still
  sending a body the server refused is dropped then too;
- a request body must arrive within ``api.body_timeout`` of its head: a client trickling one
  is answered ``408`` (if nothing was answered yet) and dropped;
- a request whose malformed body uvicorn answered ``400`` itself, while the application was
  answering it too, ends quietly rather than with a traceback;
- the ASGI scope carries ``ABORT``: a callable that drops the connection at once, unsent data
  and all, for an event stream whose client stopped reading (``transport.close()`` would wait
  for the kernel to flush to a client that never reads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ABORT = "fieldbridge.abort"
"""The key, in the ASGI scope's ``extensions``, of the callable that drops the connection."""

HEALTH_RESERVE = 4
"""Connections accepted past ``api.max_connections`` for ``/health/...`` requests only."""


@dataclass
class ConnectionLimits:
    """The limits of one server, and whether it is refusing connections now."""

    max_connections: int
    header_timeout: float
    body_timeout: float = 30.0
    refused: int = 0
    """Connections refused at the cap since the server started."""
    full: bool = False


def busy_body(limit: int) -> bytes:
    """The JSON error of a connection refused at the cap of ``limit``."""
    return json.dumps({"error": {
        "code": "too_many_connections",
        "message": f"the API serves at most {limit} connections at once",
        "hint": "retry later; close idle connections (api.max_connections sets the cap)"}}
    ).encode()


def raw_response(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response with a JSON ``body``, written before any request is read."""
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + extra
            + b"connection: close\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


def busy_response(limit: int) -> bytes:
    """``503`` for a connection past the cap and the health reserve."""
    return raw_response(b"503 Service Unavailable", busy_body(limit), b"retry-after: 5\r\n")


def slow_body_response(timeout: float) -> bytes:
    """``408`` for a request whose body did not arrive within ``timeout``."""
    return raw_response(b"408 Request Timeout", json.dumps({"error": {
        "code": "request_timeout",
        "message": f"the request body did not arrive within {timeout:g} s",
        "hint": "send the body at once (api.body_timeout sets the limit)"}}).encode())
