"""Configuration models and loading: validated fully before any I/O.

Each field is declared once, with its description and default; the config reference and the
JSON Schema are generated from these models (``fieldbridge schema``).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    model_validator,
)

from bridge.config.yamlsource import Document, KeyPath

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """``1.5``, ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"`` to seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError("expected a duration such as 500ms, 10s, 5m, 2h or 7d")
        return float(match.group(1)) * _UNITS[match.group(2)]
    return value


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    Field(ge=0, json_schema_extra={"anyOf": [{"type": "number"}, {"type": "string"}]}),
]
"""Seconds, as a number or a string with a unit (ms, s, m, h, d)."""

Identifier = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", max_length=200),
]
"""Ids of sources, devices and points: letters, digits, ``_ . : -``."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def no_control_characters(value: str) -> str:
    """Refuse control characters and line breaks: a host, a name or an id is one line of
    plain text, never a file's content that ``${file:...}`` pulled in by mistake."""
    found = _CONTROL.search(value)
    if found is not None:
        raise ValueError(f"must be one line without control characters (found {found.group()!r} "
                         f"at position {found.start()} of {len(value):,} characters)")
    return value


PlainText = Annotated[str, AfterValidator(no_control_characters)]
"""Host names, user names, queue and exchange names: one line, no control characters."""

Scope = Literal["read", "write", "admin"]
"""What an API key may do: read values, write points, administer."""


MAX_VALUE_BYTES = 64 * 1024
"""The default largest string value of a point, in UTF-8 bytes."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, never ignored, and a number
    must be finite (``.nan`` or ``"inf"`` as a scale, an offset or an interval would make
    every value it touches meaningless)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ReportSpec(StrictModel):
    """When a reading becomes an event (report-by-exception)."""

    mode: Literal["always", "change"] | None = Field(
        default=None,
        description="`always` publishes every reading; `change` only when the value or quality "
        "changes (beyond the deadband). Unset: `change` when a deadband or heartbeat is given, "
        "else `always`.",
    )
    deadband: float | None = Field(
        default=None, ge=0, description="Absolute deadband: changes smaller than this are not "
        "reported.")
    deadband_percent: float | None = Field(
        default=None, ge=0, le=100, description="Deadband as a percent of the last reported value.")
    heartbeat: Duration | None = Field(
        default=None, description="Re-publish an unchanged value after at most this long.")

    @property
    def on_change(self) -> bool:
        """Whether unchanged values are suppressed."""
        if self.mode is not None:
            return self.mode == "change"
        return (self.deadband is not None or self.deadband_percent is not None
                or self.heartbeat is not None)

    @model_validator(mode="after")
    def _consistent(self) -> ReportSpec:
        if self.mode == "always" and (self.deadband or self.deadband_percent or self.heartbeat):
            raise ValueError("a deadband or heartbeat needs mode: change")
        if self.deadband is not None and self.deadband_percent is not None:
            raise ValueError("give deadband or deadband_percent, not both")
        return self

    def merged(self, override: ReportSpec | None) -> ReportSpec:
        """This spec with the fields ``override`` sets replacing ours."""
        if override is None:
            return self
        values = self.model_dump(exclude_unset=True)
        values.update(override.model_dump(exclude_unset=True))
        return ReportSpec.model_validate(values)


ValueType = Literal["bool", "integer", "number", "string"]
"""What kind of value a point's events carry."""


class PointBase(StrictModel):
    """What every point has, whatever its protocol."""

    name: Identifier = Field(description="Point name; the point id is the device prefix + name.")
    description: str | None = Field(default=None, description="Free text shown in the API.")
    unit: PlainText | None = Field(
        default=None, description="Engineering unit, e.g. `degC`, `kWh`.")
    scale: float = Field(default=1.0, description="Multiplier applied to the decoded value.")
    offset: float = Field(default=0.0, description="Added after scaling.")
    enum: dict[int | str, str] | None = Field(
        default=None, description="Map raw values to labels; a value not listed is `bad`.")
    round: int | None = Field(
        default=None, ge=0, le=12, description="Round the scaled value to this many decimals.")
    report: ReportSpec | None = Field(default=None, description="Report-by-exception settings.")
    tags: dict[str, str] = Field(default_factory=dict, description="Labels carried on events.")
    writable: bool = Field(default=False, description="Allow write-back through the API.")

    @model_validator(mode="after")
    def _enum_or_scale(self) -> PointBase:
        if self.enum is not None and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError("a point maps raw values through enum or scale/offset, not both")
        return self

    def value_type(self) -> ValueType | None:
        """The type of the values this point's events carry, when the configuration fixes
        it (an enum gives labels, a scale or offset numbers); ``None`` when only the values
        tell. Protocols whose points declare a decoded type refine it."""
        if self.enum is not None:
            return "string"
        if self.scale != 1.0 or self.offset != 0.0:
            return "number"
        return None


class ProfileBase(StrictModel):
    """A device profile: a point map written once, instantiated per device."""

    protocol: str
    description: str | None = Field(default=None, description="What device this profile maps.")
    report: ReportSpec | None = Field(default=None, description="Default report settings.")
    tags: dict[str, str] = Field(default_factory=dict, description="Labels for every point.")
    points: Sequence[PointBase] = Field(default_factory=list)


class DeviceBase(StrictModel):
    """One device behind a source, optionally instantiating a profile."""

    id: Identifier = Field(description="Device id, unique within the bridge.")
    profile: PlainText | None = Field(
        default=None, description="Name of a profile under `profiles`.")
    prefix: PlainText | None = Field(
        default=None, description="Prefix of this device's point ids; default `<device id>.`.")
    tags: dict[str, str] = Field(default_factory=dict, description="Labels for every point.")
    report: ReportSpec | None = Field(default=None, description="Overrides the profile default.")
    points: Sequence[PointBase] = Field(
        default_factory=list, description="Points added to (or replacing, by name) the profile's.")


MASK = "***"
"""What a value that came from ``${...}`` is shown as in an endpoint."""


def mask_substituted(text: str, values: Iterable[str]) -> str:
    """``text`` with each of ``values`` (substituted settings) shown as ``MASK``."""
    for value in sorted(values, key=len, reverse=True):
        if value:
            text = text.replace(value, MASK)
    return text


class _MaskedEndpoint(StrictModel):
    """A source's or sink's settings whose ``endpoint()`` never shows a value that came from
    ``${...}``: the README promises such values are never returned by the API or logged.

    The loader hands each entry the values substituted into its own settings
    (``substituted``); a connector's ``endpoint()`` is wrapped when its class is made, so no
    connector has to remember to mask.
    """

    _substituted: frozenset[str] = PrivateAttr(default_factory=frozenset)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("endpoint")
        if callable(own):
            cls.endpoint = _masking(own)  # type: ignore[attr-defined]

    def substituted(self, values: Iterable[str]) -> None:
        """Mark ``values`` as substituted into these settings (the loader calls it)."""
        self._substituted = frozenset(values)


def _masking(endpoint: Callable[[Any], str]) -> Callable[[Any], str]:
    def masked(self: _MaskedEndpoint) -> str:
        return mask_substituted(endpoint(self), self._substituted)

    masked.__doc__ = endpoint.__doc__
    masked.__name__ = endpoint.__name__
    return masked


class SourceBase(_MaskedEndpoint):
    """What every source has, whatever its protocol."""

    id: Identifier = Field(description="Source id, unique within the bridge.")
    protocol: str
    enabled: bool = Field(default=True, description="A disabled source is validated, not run.")
    tags: dict[str, str] = Field(default_factory=dict, description="Labels for every point.")
    workers: int = Field(
        default=0, ge=0, le=16,
        description="Worker processes for this source. 0: it runs in the daemon's process. "
        "1 or more: each worker process runs the connection and the mapping on a core of its "
        "own and hands the events to the daemon, which keeps the store, the outbox, the sinks "
        "and the API. More than 1 only for MQTT (a shared subscription spreads the messages "
        "over the workers) and AMQP (competing consumers on the queue); report-by-exception "
        "and the order of a point's events then hold per worker.")

    max_value_bytes: ByteSize = Field(
        default=ByteSize(MAX_VALUE_BYTES), ge=1, description="The largest string value a point "
        "of this source may carry, in UTF-8 bytes (a number or a size such as `1MiB`). A "
        "larger one becomes a `bad` event that says so, and the value is neither stored nor "
        "published.")

    def endpoint(self) -> str:
        """Where this source connects, with any secret redacted."""
        return self.id


class BridgeSection(StrictModel):
    """Identity and state of this bridge instance."""

    id: Identifier = Field(
        default_factory=lambda: socket.gethostname().split(".")[0] or "fieldbridge",
        description="Instance id carried on every event; default the host name.")
    state_dir: Path | None = Field(
        default=None,
        description="Where the store lives. Default `$STATE_DIRECTORY` (systemd), else "
        "`~/.local/state/fieldbridge`. Relative paths are relative to the config file.")


def _read_only() -> list[Scope]:
    return ["read"]


class ApiKey(StrictModel):
    """An API key, stored as its SHA-256 (`fieldbridge hash-key` prints it)."""

    name: Identifier = Field(description="Who holds the key; shown in logs, never the key.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the key.")
    scopes: list[Scope] = Field(
        default_factory=_read_only, description="`read`, `write` and/or `admin`.")


class TlsSection(StrictModel):
    """Serve the API over HTTPS."""

    cert: Path = Field(description="PEM certificate (chain) file.")
    key: Path = Field(description="PEM private key file.")


class ApiSection(StrictModel):
    """The REST API."""

    enabled: bool = Field(default=True, description="Serve the REST API.")
    host: PlainText = Field(default="127.0.0.1", description="Listen address; loopback by default.")
    port: int = Field(default=8780, ge=0, le=65535, description="Listen port (0: any free port).")
    keys: list[ApiKey] = Field(
        default_factory=list, description="API keys; none configured means no authentication.")
    tls: TlsSection | None = Field(default=None, description="Certificate and key for HTTPS.")
    max_body: ByteSize = Field(
        default=ByteSize(1 << 20), ge=0, description="The largest request body, counted while "
        "it is read (a number or a size such as `64KiB`): a larger one is answered 413 and "
        "not read further. A request with a body is authenticated before it is read.")
    max_connections: int = Field(
        default=256, ge=1, description="Open connections at most, event streams and idle "
        "keep-alive connections included; one more is answered 503 and closed, except that "
        "4 more are kept for `/health/...` requests (one each), so a monitor can tell a busy "
        "API from a dead one.")
    body_timeout: Duration = Field(
        default=30.0, gt=0, description="A request body must have arrived this long after "
        "its request head: a client still sending is answered 408 and dropped.")
    stream_max_bytes: ByteSize = Field(
        default=ByteSize(4 << 20), ge=1024, description="Bytes of events an event stream "
        "client may fall behind (a number or a size such as `16MiB`): one that falls further "
        "is dropped at once with a `slow_consumer` error and counted in "
        "`fieldbridge_api_streams_ended_total`; it resumes from the store with "
        "`Last-Event-ID`. Clients share the events they wait for: this bounds each one's "
        "backlog, not copies of it.")
    keep_alive_timeout: Duration = Field(
        default=5.0, gt=0, description="Close a keep-alive connection idle this long after a "
        "response.")
    header_timeout: Duration = Field(
        default=10.0, gt=0, description="Close a connection whose request line and headers "
        "have not all arrived this long after it opened (or after the previous response).")


class StoreSection(StrictModel):
    """The embedded SQLite store: last values and bounded history."""

    path: Path | None = Field(default=None, description="Database file; default in state_dir.")
    history_max_age: Duration = Field(
        default=7 * 86400.0, description="Drop history older than this.")
    history_max_rows: int = Field(
        default=10_000, ge=0, description="Keep at most this many history rows per point.")
    history_max_bytes: ByteSize | None = Field(
        default=None, ge=0, description="Keep at most this much event JSON in the history of "
        "all points together (a number or a size such as `512MiB`); the oldest is pruned "
        "first, whatever its point. Unset: bounded by rows and age only. Setting it makes "
        "start-up read the whole history once to size it.")
    min_free: ByteSize = Field(
        default=ByteSize(64 << 20), ge=0, description="Disk space the store leaves free (free "
        "pages inside its file count): below it the store stops writing, sources wait and "
        "nothing is acknowledged upstream until space returns; `/health/ready` and "
        "`/v1/sources` say so. 0: write until the disk is full (that is handled the same way).")
    sync: Literal["full", "normal"] = Field(
        default="full", description="`full`: every commit is on disk (fsync) before any "
        "upstream acknowledgement (MQTT QoS 1/2, AMQP), so a power cut loses nothing that was "
        "acknowledged. `normal`: faster; a crash of the process loses nothing, but a power cut "
        "or a kernel panic may undo the last commits, including events already acknowledged "
        "upstream.")
    replay_max_bytes: ByteSize = Field(
        default=ByteSize(64 << 20), ge=0, description="Event streams that resume "
        "(`Last-Event-ID`) replay from the store's event log, which keeps at least this much "
        "of its newest events (beyond what the sinks still need); a number or a size such "
        "as `64MiB`.")
    replay_max_age: Duration = Field(
        default=3600.0, ge=0, description="The event log keeps events for resuming streams "
        "at most this long.")
    commit_interval: Duration = Field(
        default=0.0, ge=0, le=1.0,
        description="Shortest time between the starts of two commits. 0 (the default): group "
        "commit with no wait, a batch is committed as soon as the previous commit is done, and "
        "what arrives meanwhile is committed together. A longer interval makes fewer, larger "
        "transactions under load at the cost of latency; the first event after a quiet spell "
        "never waits.")


class OutboxSection(StrictModel):
    """The outbox: events stored for the sinks until the broker confirmed them."""

    max_events: int = Field(
        default=1_000_000, ge=1, description="At most this many events wait for each sink.")
    max_bytes: ByteSize = Field(
        default=ByteSize(1 << 30), ge=1, description="At most this many bytes of event JSON wait "
        "for each sink; a number or a size such as `256MiB` or `1GB`.")
    policy: Literal["block", "drop_oldest"] = Field(
        default="block", description="When a sink's outbox is full: `block` stops storing new "
        "events (sources slow down, acknowledged protocols stop acknowledging) until the broker "
        "confirms some; `drop_oldest` deletes the oldest waiting events to make room and counts "
        "them in `dropped`.")


class SinkBase(_MaskedEndpoint):
    """What every sink has, whatever its protocol."""

    id: Identifier = Field(description="Sink id, unique within the bridge.")
    protocol: str
    enabled: bool = Field(
        default=True, description="A disabled sink is validated, not run, and gets no events.")
    sources: list[Identifier] = Field(
        default_factory=list, description="Only events of these sources; empty: every source.")
    points: list[str] = Field(
        default_factory=list, description="Only events of points whose id matches one of these "
        "patterns (`*` any characters, `?` one, e.g. `boiler.*`); empty: every point.")
    workers: int = Field(
        default=0, ge=0, le=1,
        description="1: publish from a worker process of its own, on another core; the daemon "
        "keeps the outbox and serves the worker its rows. 0: publish from the daemon's process.")

    def endpoint(self) -> str:
        """Where this sink connects, with any secret redacted."""
        return self.id


class ServerBase(_MaskedEndpoint):
    """What every northbound server has, whatever its protocol: it serves the latest value
    of configured points to clients that pull (a SCADA polling Modbus, a historian browsing
    OPC-UA)."""

    id: Identifier = Field(description="Server id, unique within the bridge.")
    protocol: str
    enabled: bool = Field(default=True, description="A disabled server is validated, not run.")
    host: PlainText = Field(
        default="127.0.0.1", description="Listen address; loopback unless told otherwise.")
    port: int = Field(ge=1, le=65535, description="Listen port; it is bound at start-up, "
                      "whatever the state of sources and sinks.")

    def endpoint(self) -> str:
        """Where this server listens."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.protocol}://{host}:{self.port}"


@dataclass(frozen=True)
class ResolvedPoint:
    """A point after its profile, device and source settings are merged."""

    id: str
    source: str
    device: str | None
    spec: PointBase
    tags: dict[str, str]
    report: ReportSpec
    path: KeyPath
    """Where the point was declared, for error messages."""
    max_value_bytes: int = MAX_VALUE_BYTES
    """The largest string value, from the source's ``max_value_bytes``."""


class DeviceSourceBase(SourceBase):
    """A source whose points are grouped into devices that may instantiate profiles."""

    devices: Sequence[DeviceBase] = Field(default_factory=list)


def default_state_dir() -> Path:
    """The state directory when the configuration names none: ``$STATE_DIRECTORY``
    (systemd), else ``$XDG_STATE_HOME/fieldbridge`` or ``~/.local/state/fieldbridge``."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fieldbridge"


@dataclass
class Config:
    """A loaded, validated configuration."""

    path: Path
    bridge: BridgeSection
    api: ApiSection
    store: StoreSection
    profiles: dict[str, ProfileBase]
    sources: list[SourceBase]
    points: dict[str, list[ResolvedPoint]]
    """Resolved points per source id."""
    document: Document = field(repr=False)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    sinks: list[SinkBase] = field(default_factory=list)
    servers: list[ServerBase] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        """The state directory, resolved."""
        if self.bridge.state_dir is not None:
            return (self.path.parent / self.bridge.state_dir).resolve()
        return default_state_dir()

    @property
    def store_path(self) -> Path:
        """The SQLite database file."""
        if self.store.path is not None:
            return (self.path.parent / self.store.path).resolve()
        return self.state_dir / "fieldbridge.db"

    def point_index(self) -> dict[str, ResolvedPoint]:
        """Every point by id."""
        return {point.id: point for points in self.points.values() for point in points}
