"""Configuration models and loading: validated fully before any I/O.

Each field is declared once, with its description and default; the config reference and the
JSON Schema are generated from these models (``fieldbridge schema``).
"""

from __future__ import annotations

import glob
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from bridge.errors import ConfigError, ConfigIssue
from bridge.yamlsource import Document, KeyPath, Location, load_yaml

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


Scope = Literal["read", "write", "admin"]
"""What an API key may do: read values, write points, administer."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


class PointBase(StrictModel):
    """What every point has, whatever its protocol."""

    name: Identifier = Field(description="Point name; the point id is the device prefix + name.")
    description: str | None = Field(default=None, description="Free text shown in the API.")
    unit: str | None = Field(default=None, description="Engineering unit, e.g. `degC`, `kWh`.")
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
    profile: str | None = Field(default=None, description="Name of a profile under `profiles`.")
    prefix: str | None = Field(
        default=None, description="Prefix of this device's point ids; default `<device id>.`.")
    tags: dict[str, str] = Field(default_factory=dict, description="Labels for every point.")
    report: ReportSpec | None = Field(default=None, description="Overrides the profile default.")
    points: Sequence[PointBase] = Field(
        default_factory=list, description="Points added to (or replacing, by name) the profile's.")


class SourceBase(StrictModel):
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
    host: str = Field(default="127.0.0.1", description="Listen address; loopback by default.")
    port: int = Field(default=8780, ge=0, le=65535, description="Listen port (0: any free port).")
    keys: list[ApiKey] = Field(
        default_factory=list, description="API keys; none configured means no authentication.")
    tls: TlsSection | None = Field(default=None, description="Certificate and key for HTTPS.")


class StoreSection(StrictModel):
    """The embedded SQLite store: last values and bounded history."""

    path: Path | None = Field(default=None, description="Database file; default in state_dir.")
    history_max_age: Duration = Field(
        default=7 * 86400.0, description="Drop history older than this.")
    history_max_rows: int = Field(
        default=10_000, ge=0, description="Keep at most this many history rows per point.")
    commit_interval: Duration = Field(
        default=0.005, ge=0, le=1.0,
        description="Shortest time between two commits: what arrives meanwhile is committed "
        "together. Under load, fewer and larger transactions cost less CPU per event; an event "
        "waits at most this long, and the first after a quiet spell not at all. 0: commit as "
        "soon as anything arrives.")


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


class SinkBase(StrictModel):
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


class DeviceSourceBase(SourceBase):
    """A source whose points are grouped into devices that may instantiate profiles."""

    devices: Sequence[DeviceBase] = Field(default_factory=list)


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

    @property
    def state_dir(self) -> Path:
        """The state directory, resolved."""
        if self.bridge.state_dir is not None:
            return (self.path.parent / self.bridge.state_dir).resolve()
        if os.environ.get("STATE_DIRECTORY"):
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "fieldbridge"

    @property
    def store_path(self) -> Path:
        """The SQLite database file."""
        if self.store.path is not None:
            return (self.path.parent / self.store.path).resolve()
        return self.state_dir / "fieldbridge.db"

    def point_index(self) -> dict[str, ResolvedPoint]:
        """Every point by id."""
        return {point.id: point for points in self.points.values() for point in points}


def root_model() -> type[BaseModel]:
    """The whole-file model, built from the protocol registry (used for the JSON Schema too)."""
    from bridge.registry import protocols

    specs = list(protocols().values())
    source_union: Any = Annotated[
        _union([spec.source_model for spec in specs]), Field(discriminator="protocol")]
    profile_models = [spec.profile_model for spec in specs if spec.profile_model is not None]
    profile_union: Any = Annotated[_union(profile_models), Field(discriminator="protocol")]
    sink_models = [spec.sink_model for spec in specs if spec.sink_model is not None]
    sink_union: Any = Annotated[_union(sink_models), Field(discriminator="protocol")]
    model = create_model(
        "FieldbridgeConfig",
        __base__=StrictModel,
        bridge=(BridgeSection, Field(default_factory=BridgeSection)),
        api=(ApiSection, Field(default_factory=ApiSection)),
        store=(StoreSection, Field(default_factory=StoreSection)),
        include=(list[str], Field(default_factory=list, description="Mapping files or globs, "
                                  "relative to this file, whose `profiles` are merged in.")),
        profiles=(dict[str, profile_union], Field(default_factory=dict)),
        sources=(list[source_union], Field(default_factory=list)),
        outbox=(OutboxSection, Field(default_factory=OutboxSection)),
        sinks=(list[sink_union], Field(default_factory=list)),
    )
    return cast(type[BaseModel], model)


def _union(models: list[Any]) -> Any:
    if len(models) == 1:
        return models[0]
    union: Any = models[0]
    for model in models[1:]:
        union = union | model
    return union


def load_config(path: str | Path) -> Config:
    """Load, validate and resolve a configuration file; raise ``ConfigError`` with every issue."""
    config_path = Path(path).resolve()
    issues: list[ConfigIssue] = []
    document = load_yaml(config_path, issues)
    if issues:
        raise ConfigError(issues)
    if not isinstance(document.data, dict):
        raise ConfigError([document.issue((), "expected a mapping at the top of the file")])
    _merge_includes(document, config_path, issues, seen={config_path})
    if issues:
        raise ConfigError(issues)
    try:
        model = root_model().model_validate(document.data)
    except ValidationError as exc:
        raise ConfigError(_validation_issues(document, exc, ())) from None
    config = Config(
        path=config_path,
        bridge=model.bridge,  # type: ignore[attr-defined]
        api=model.api,  # type: ignore[attr-defined]
        store=model.store,  # type: ignore[attr-defined]
        profiles=dict(model.profiles),  # type: ignore[attr-defined]
        sources=list(model.sources),  # type: ignore[attr-defined]
        points={},
        document=document,
        outbox=model.outbox,  # type: ignore[attr-defined]
        sinks=list(model.sinks),  # type: ignore[attr-defined]
    )
    _resolve(config, issues)
    if issues:
        raise ConfigError(issues)
    return config


def _merge_includes(
    document: Document, path: Path, issues: list[ConfigIssue], seen: set[Path]
) -> None:
    """Merge the ``profiles`` of included files into ``document``, keeping their locations."""
    data = document.data
    includes = data.get("include", [])
    if not isinstance(includes, list):
        issues.append(document.issue(("include",), "expected a list of file names or globs"))
        return
    profiles = data.setdefault("profiles", {})
    if not isinstance(profiles, dict):
        return
    for index, pattern in enumerate(includes):
        if not isinstance(pattern, str):
            issues.append(document.issue(("include", index), "expected a file name or glob"))
            continue
        full = pattern if os.path.isabs(pattern) else str(path.parent / pattern)
        matches = sorted(glob.glob(full))
        if not matches:
            issues.append(document.issue(("include", index), f"no file matches '{pattern}'"))
            continue
        for match in matches:
            included_path = Path(match).resolve()
            if included_path in seen:
                continue
            seen.add(included_path)
            included = load_yaml(included_path, issues)
            if included.data is None:
                continue
            if not isinstance(included.data, dict):
                issues.append(included.issue((), "expected a mapping with `profiles` and/or "
                                                 "`include`"))
                continue
            unknown = set(included.data) - {"profiles", "include"}
            for key in sorted(unknown, key=str):
                issues.append(included.issue((key,), "an included file may only hold `profiles` "
                                                     "and `include`"))
            _merge_includes(included, included_path, issues, seen)
            for name, profile in (included.data.get("profiles") or {}).items():
                if name in profiles:
                    where = document.locate(("profiles", name))
                    first = f" (first defined at {where.file}:{where.line})" if where else ""
                    issues.append(included.issue(("profiles", name),
                                                 f"profile '{name}' is defined twice{first}"))
                    continue
                profiles[name] = profile
                for key_path, location in included.locations.items():
                    if key_path[:2] == ("profiles", name):
                        document.locations[key_path] = location


def _validation_issues(
    document: Document, exc: ValidationError, prefix: KeyPath
) -> list[ConfigIssue]:
    issues = []
    known = {key_path[:end] for key_path in document.locations
             for end in range(1, len(key_path) + 1)}
    for error in exc.errors(include_url=False):
        path: list[str | int] = list(prefix)
        loc = error["loc"]
        for position, part in enumerate(loc):
            candidate = (*path, part)
            # Union tags and validator names sit in `loc` between real keys: skip them.
            if candidate in known or position == len(loc) - 1:
                path.append(part)
        key_path = tuple(path)
        message = error["msg"]
        if error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "union_tag_invalid":
            message = f"unknown protocol; expected one of {error['ctx']['expected_tags']}"
        elif error["type"] == "union_tag_not_found":
            message = "required key `protocol` is missing"
        elif key_path not in document.substituted and "input" in error and not isinstance(
            error["input"], dict | list
        ):
            message = f"{message} (got {error['input']!r})"
        issues.append(document.issue(key_path, message))
    return issues


def _resolve(config: Config, issues: list[ConfigIssue]) -> None:
    """Instantiate profiles, merge settings, and check what a schema cannot."""
    from bridge.registry import protocols

    document = config.document
    registry = protocols()
    seen_sources: dict[str, int] = {}
    seen_devices: dict[str, KeyPath] = {}
    seen_points: dict[str, KeyPath] = {}
    for index, source in enumerate(config.sources):
        source_path: KeyPath = ("sources", index)
        if source.id in seen_sources:
            issues.append(document.issue((*source_path, "id"),
                                         f"source id '{source.id}' is used twice"))
        seen_sources[source.id] = index
        points: list[ResolvedPoint] = []
        if isinstance(source, DeviceSourceBase):
            for device_index, device in enumerate(source.devices):
                device_path: KeyPath = (*source_path, "devices", device_index)
                if device.id in seen_devices:
                    issues.append(document.issue((*device_path, "id"),
                                                 f"device id '{device.id}' is used twice"))
                seen_devices[device.id] = device_path
                points.extend(_device_points(config, source, device, device_path, issues))
        spec = registry[source.protocol]
        points.extend(spec.source_points(source, source_path))
        for point in points:
            if point.id in seen_points:
                first = document.locate(seen_points[point.id])
                where = f" (first at {first.file}:{first.line})" if first else ""
                issues.append(document.issue(point.path,
                                             f"point id '{point.id}' is defined twice{where}"))
            else:
                seen_points[point.id] = point.path
        for key_path, message in spec.check(source, points):
            issues.append(document.issue(key_path, message))
        if source.workers > 1 and not spec.shared_workers:
            issues.append(document.issue(
                (*source_path, "workers"),
                f"{source.protocol} sources run in at most one worker process (more than one "
                "needs a broker that shares the messages among them: mqtt, amqp)"))
        config.points[source.id] = points
    seen_sinks: set[str] = set()
    for index, sink in enumerate(config.sinks):
        if sink.id in seen_sinks:
            issues.append(document.issue(("sinks", index, "id"),
                                         f"sink id '{sink.id}' is used twice"))
        seen_sinks.add(sink.id)
        for position, source_id in enumerate(sink.sources):
            if source_id not in seen_sources:
                issues.append(document.issue(("sinks", index, "sources", position),
                                             f"no source has the id '{source_id}'"))


def _device_points(
    config: Config,
    source: DeviceSourceBase,
    device: DeviceBase,
    device_path: KeyPath,
    issues: list[ConfigIssue],
) -> list[ResolvedPoint]:
    document = config.document
    declared: dict[str, tuple[PointBase, KeyPath]] = {}
    tags = dict(source.tags)
    report = ReportSpec()
    if device.profile is not None:
        profile = config.profiles.get(device.profile)
        if profile is None:
            known = ", ".join(sorted(config.profiles)) or "none loaded"
            issues.append(document.issue((*device_path, "profile"),
                                         f"unknown profile '{device.profile}' (known: {known})"))
            return []
        if profile.protocol != source.protocol:
            issues.append(document.issue(
                (*device_path, "profile"),
                f"profile '{device.profile}' is for {profile.protocol}, not {source.protocol}"))
            return []
        tags.update(profile.tags)
        report = report.merged(profile.report)  # valid alone: nothing merged yet
        for index, point in enumerate(profile.points):
            declared[point.name] = (point, ("profiles", device.profile, "points", index))
    tags.update(device.tags)
    try:
        report = report.merged(device.report)
    except ValidationError:
        issues.append(document.issue((*device_path, "report"),
                                     "report settings conflict with the profile's"))
        return []
    for index, point in enumerate(device.points):
        declared[point.name] = (point, (*device_path, "points", index))
    prefix = device.prefix if device.prefix is not None else f"{device.id}."
    resolved = []
    for point, path in declared.values():
        try:
            merged = report.merged(point.report)
        except ValidationError as exc:
            # Each level is valid alone; together they may contradict (mode vs deadband).
            reason = "; ".join(error["msg"].removeprefix("Value error, ")
                               for error in exc.errors(include_url=False))
            issues.append(document.issue((*path, "report"),
                                         f"report settings conflict with the device's or "
                                         f"profile's: {reason}"))
            continue
        resolved.append(ResolvedPoint(
            id=f"{prefix}{point.name}",
            source=source.id,
            device=device.id,
            spec=point,
            tags={**tags, **point.tags},
            report=merged,
            path=path,
        ))
    return resolved


def location_of(config: Config, path: KeyPath) -> Location | None:
    """Where ``path`` was written, for messages raised after loading."""
    return config.document.locate(path)
