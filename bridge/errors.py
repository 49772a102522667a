"""The few exception classes of Fieldbridge, each carrying where and why."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorCategory(enum.StrEnum):
    """What kind of failure an endpoint error is; shown in the inventory."""

    TRANSIENT = "transient"
    """Network trouble, timeouts, a peer that went away: retry with backoff."""
    AUTH = "auth"
    """Credentials or certificates were refused."""
    CONFIG = "config"
    """The configuration cannot work against this endpoint (bad address, unknown node)."""
    PROTOCOL = "protocol"
    """The peer spoke something we could not parse."""
    DEVICE = "device"
    """The device answered, but with an exception or a refusal."""


class BridgeError(Exception):
    """Base of every error Fieldbridge raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One configuration mistake, located in its file."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.message}"


class ConfigError(BridgeError):
    """The configuration is invalid; carries every issue found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class ConnectorError(BridgeError):
    """A connection to an endpoint failed; the supervisor decides what happens next."""

    def __init__(self, endpoint: str, reason: str, category: ErrorCategory) -> None:
        self.endpoint = endpoint
        self.reason = reason
        self.category = category
        super().__init__(f"{endpoint}: {reason} ({category})")


class DecodeError(BridgeError):
    """A raw value could not be turned into a point value."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class DeviceError(BridgeError):
    """A live read or a write of one point on its device failed: refused, not supported, or
    the device cannot be reached (``category`` says which)."""

    def __init__(self, point: str, reason: str, category: ErrorCategory) -> None:
        self.point = point
        self.reason = reason
        self.category = category
        super().__init__(f"{point}: {reason}")


class ReadError(DeviceError):
    """A live read of a point from its device failed or is not supported by its source."""


class WriteError(DeviceError):
    """A write-back to a device was refused or could not be carried out."""


class NotWritableError(WriteError):
    """A write to a point that is not configured with ``writable: true``."""

    def __init__(self, point: str) -> None:
        super().__init__(point, "the point is not writable", ErrorCategory.CONFIG)


class ConnectorUnavailableError(BridgeError):
    """A protocol was asked for a part it does not provide (the source of a sink-only one)."""

    def __init__(self, protocol: str, part: str) -> None:
        super().__init__(f"protocol '{protocol}' provides no {part}")
        self.protocol = protocol
        self.part = part


class ApiServerError(BridgeError):
    """The API cannot serve: its address cannot be bound or its certificate not loaded."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(f"API cannot listen on {address}: {reason}")


class ServerError(BridgeError):
    """A northbound server cannot serve: its address cannot be bound, say."""

    def __init__(self, server: str, endpoint: str, reason: str) -> None:
        self.server = server
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(f"server '{server}' cannot listen on {endpoint}: {reason}")


class ApiError(BridgeError):
    """A request the API refuses: the HTTP status, a stable code, a message and a hint.

    The API's exception handler turns it into the structured error body; ``details`` lists
    per-field problems, ``headers`` go with the response (``WWW-Authenticate``,
    ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        hint: str | None = None,
        *,
        details: list[dict[str, object]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.hint = hint
        self.details = details
        self.headers = dict(headers or {})
        super().__init__(message)


class StoreError(BridgeError):
    """The store cannot be opened, read or written."""


class StoreFullError(StoreError):
    """The store cannot write now: its disk is full, below the ``store.min_free`` reserve, or
    failing. Nothing of the batch was stored; the same write may succeed later."""


EXCERPT_CHARS = 80
"""How much of a refused value a message quotes."""


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``value`` as a message may quote it: its repr when short, else the start of it and
    its length, so a huge or hostile value never fills a log line or a response."""
    if isinstance(value, str | bytes) and len(value) > limit:
        kind = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}… ({len(value):,} {kind})"
    text = repr(value)
    if len(text) > limit:
        return f"{text[:limit]}… ({len(text):,} characters)"
    return text


REASON_CHARS = 200
"""How much of a connector's reason (which may quote a value) a message keeps."""


def shorten(reason: str, limit: int = REASON_CHARS) -> str:
    """A connector's reason cut to a line's length, saying how long it was."""
    return reason if len(reason) <= limit else f"{reason[:limit]}… ({len(reason):,} characters)"
