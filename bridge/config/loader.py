"""Loading a configuration file: YAML with file and line, includes, validation, resolution.

The whole-file model is built from a ``Catalog`` of the installed connectors' models (given by
``bridge.registry``, which finds them), so a connector's source, sink and profile models
validate their own sections. The loader imports no connector and not the registry.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol, cast

from pydantic import BaseModel, Field, ValidationError, create_model

from bridge.config.models import (
    MAX_VALUE_BYTES,
    ApiSection,
    BridgeSection,
    Config,
    DeviceBase,
    DeviceSourceBase,
    OutboxSection,
    PointBase,
    ProfileBase,
    ReportSpec,
    ResolvedPoint,
    ServerBase,
    SinkBase,
    SourceBase,
    StoreSection,
    StrictModel,
)
from bridge.config.yamlsource import Document, KeyPath, load_yaml
from bridge.errors import ConfigError, ConfigIssue, excerpt


class ConnectorModels(Protocol):
    """What the loader needs of one protocol connector (``bridge.registry.ProtocolSpec``)."""

    @property
    def name(self) -> str:
        """The protocol's name, the ``protocol`` value of its sections."""
        ...

    @property
    def source_model(self) -> type[SourceBase] | None:
        """The source's model, if the protocol can be a source."""
        ...

    @property
    def profile_model(self) -> type[ProfileBase] | None:
        """The device profile's model, if the protocol has devices."""
        ...

    @property
    def sink_model(self) -> type[SinkBase] | None:
        """The sink's model, if the protocol can be a sink."""
        ...

    @property
    def server_model(self) -> type[ServerBase] | None:
        """The northbound server's model, if the protocol can serve points."""
        ...

    @property
    def check_server(
        self,
    ) -> Callable[[ServerBase, Mapping[str, ResolvedPoint]], list[tuple[KeyPath, str]]]:
        """Checks of a server against the configured points: (key path, message)."""
        ...

    @property
    def source_points(self) -> Callable[[SourceBase, KeyPath], list[ResolvedPoint]]:
        """Points declared on the source itself (not through devices)."""
        ...

    @property
    def shared_workers(self) -> bool:
        """Whether several worker processes can share one source."""
        ...

    @property
    def check(self) -> Callable[[SourceBase, Sequence[ResolvedPoint]], list[tuple[KeyPath, str]]]:
        """Checks a schema cannot express: (key path, message)."""
        ...


@dataclass(frozen=True)
class Catalog:
    """The installed protocol connectors, and why a registered one cannot be used."""

    protocols: Mapping[str, ConnectorModels]
    unavailable: Mapping[str, str] = field(default_factory=dict)
    """Protocol name → why its connector is missing (it failed to import, say)."""


def root_model(catalog: Catalog) -> type[BaseModel]:
    """The whole-file model, built from the connectors' models (the JSON Schema comes from it)."""
    specs = list(catalog.protocols.values())
    source_union: Any = _tagged([spec.source_model for spec in specs])
    profile_union: Any = _tagged([spec.profile_model for spec in specs])
    sink_union: Any = _tagged([spec.sink_model for spec in specs])
    server_union: Any = _tagged([spec.server_model for spec in specs])
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
        servers=(list[server_union], Field(default_factory=list)),
    )
    return cast(type[BaseModel], model)


def _tagged(candidates: Sequence[type[BaseModel] | None]) -> Any:
    """The union of ``models`` told apart by their ``protocol``, or a model of nothing."""
    models = [model for model in candidates if model is not None]
    if not models:
        return _Nothing
    union: Any = models[0]
    for model in models[1:]:
        union = union | model
    return Annotated[union, Field(discriminator="protocol")]


class _Nothing(StrictModel):
    """Stands for a section no installed connector provides: any entry is refused."""

    protocol: Annotated[str, Field(pattern=r"^$", description="no connector provides this")]


def load_config(path: str | Path, catalog: Catalog) -> Config:
    """Load, validate and resolve a configuration file; raise ``ConfigError`` with every issue.

    ``catalog`` holds the connectors' models (``bridge.registry.load_config`` passes the
    installed ones).
    """
    config_path = Path(path).resolve()
    issues: list[ConfigIssue] = []
    document = load_yaml(config_path, issues)
    if issues:
        raise ConfigError(issues)
    if not isinstance(document.data, dict):
        raise ConfigError([document.issue((), "expected a mapping at the top of the file")])
    _foreign_keys(document, root_model(catalog), issues)
    if issues:
        raise ConfigError(issues)
    _merge_includes(document, (config_path,), issues, seen={config_path})
    if issues:
        raise ConfigError(issues)
    _unavailable(document, catalog, issues)
    if issues:
        raise ConfigError(issues)
    try:
        model = root_model(catalog).model_validate(document.data)
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
        servers=list(model.servers),  # type: ignore[attr-defined]
    )
    _mark_substituted(config)
    _resolve(config, catalog, issues)
    if issues:
        raise ConfigError(issues)
    return config


_NOT_ENDPOINT = frozenset({"devices", "points", "tags", "profiles", "sources"})
"""Keys of a source or sink that never make its endpoint (a sink's ``sources`` are ids)."""


def _mark_substituted(config: Config) -> None:
    """Hand each source and sink the text settings ``${...}`` filled in (a host, a URL, a
    user name), so that its endpoint shows them masked. A number (a port) is no secret, and
    masking its digits would mangle the rest of the endpoint."""
    document = config.document
    for section, entries in (("sources", config.sources), ("sinks", config.sinks),
                             ("servers", config.servers)):
        for index, entry in enumerate(entries):
            values = []
            for path in document.substituted:
                if path[:2] != (section, index) or len(path) < 3 or path[2] in _NOT_ENDPOINT:
                    continue
                value = _setting_at(entry, path[2:])
                if isinstance(value, str):
                    values.append(value)
            if values:
                entry.substituted(values)


def _setting_at(model: Any, path: KeyPath) -> Any:
    """The validated setting at ``path`` inside ``model`` (keys are fields, integers index
    lists), or ``None``."""
    value = model
    for part in path:
        if isinstance(part, int):
            value = value[part] if isinstance(value, list | tuple) and part < len(value) else None
        elif isinstance(value, BaseModel):
            value = getattr(value, part, None)
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


def _merge_includes(
    document: Document, chain: tuple[Path, ...], issues: list[ConfigIssue], seen: set[Path]
) -> None:
    """Merge the ``profiles`` of included files into ``document``, keeping their locations.

    ``chain`` is the file being merged and the files that included it, outermost first: a
    file that includes one of them is a cycle. A file included twice along two branches is
    merged once.
    """
    path = chain[-1]
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
            issues.append(document.issue(("include", index),
                                         f"no file matches {excerpt(pattern)}"))
            continue
        for match in matches:
            included_path = Path(match).resolve()
            if included_path in chain:
                cycle = " → ".join(str(link) for link in
                                   (*chain[chain.index(included_path):], included_path))
                issues.append(document.issue(("include", index), f"include cycle: {cycle}"))
                continue
            if included_path in seen:
                continue
            seen.add(included_path)
            included = load_yaml(included_path, issues)
            if included.data is None:
                continue
            if not _mapping_file(included, included_path, issues):
                continue
            _merge_includes(included, (*chain, included_path), issues, seen)
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


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def _foreign_keys(document: Document, model: type[BaseModel], issues: list[ConfigIssue]) -> None:
    """Unknown top-level keys that are not even names: the file is not a configuration
    (``fieldbridge validate /etc/shadow``), and its lines must not be echoed as keys."""
    foreign = [key for key in document.data
               if key not in model.model_fields and not (
                   isinstance(key, str) and _PLAIN_KEY.fullmatch(key))]
    if foreign:
        first = document.locate((foreign[0],))
        issues.append(ConfigIssue(
            first.file if first else "<config>", first.line if first else None, "",
            f"not a Fieldbridge configuration: {len(foreign)} top-level key"
            f"{'s are' if len(foreign) > 1 else ' is'} not a section name"))


def _mapping_file(included: Document, path: Path, issues: list[ConfigIssue]) -> bool:
    """Whether an included file holds only ``profiles`` and ``include``; if not, one issue
    that names neither its keys nor its values: it may be any file (``/etc/shadow``)."""
    data = included.data
    if isinstance(data, dict) and set(data) <= {"profiles", "include"}:
        return True
    if isinstance(data, dict):
        others = [key for key in data if key not in ("profiles", "include")]
        first = included.locate((others[0],))
        where = f", the first at line {first.line}" if first else ""
        found = f"{len(others)} other top-level key{'s' if len(others) > 1 else ''}{where}"
    else:
        found = f"a {type(data).__name__} at the top"
    issues.append(ConfigIssue(
        str(path), None, "", "not a mapping file: an included file may only hold `profiles` "
        f"and `include` (found {found})"))
    return False


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
            message = f"{message} (got {excerpt(error['input'])})"
        issues.append(document.issue(key_path, message))
    return issues


def _unavailable(document: Document, catalog: Catalog, issues: list[ConfigIssue]) -> None:
    """A section whose protocol's connector is registered but could not be loaded."""
    if not catalog.unavailable or not isinstance(document.data, dict):
        return
    for section in ("sources", "sinks", "servers"):
        entries = document.data.get(section)
        if not isinstance(entries, list):
            continue
        for index, entry in enumerate(entries):
            protocol = entry.get("protocol") if isinstance(entry, dict) else None
            if isinstance(protocol, str) and protocol in catalog.unavailable:
                issues.append(document.issue(
                    (section, index, "protocol"),
                    f"protocol '{protocol}' is not available: {catalog.unavailable[protocol]}"))


def _resolve(config: Config, catalog: Catalog, issues: list[ConfigIssue]) -> None:
    """Instantiate profiles, merge settings, and check what a schema cannot."""
    document = config.document
    registry = catalog.protocols
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
        if source.max_value_bytes != MAX_VALUE_BYTES:
            points = [dataclasses.replace(point, max_value_bytes=source.max_value_bytes)
                      for point in points]
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
    _check_servers(config, catalog, issues)


def _check_servers(config: Config, catalog: Catalog, issues: list[ConfigIssue]) -> None:
    """Server ids are unique, and each server's own check against the points holds."""
    document = config.document
    seen: set[str] = set()
    index_of_points = config.point_index()
    for index, server in enumerate(config.servers):
        if server.id in seen:
            issues.append(document.issue(("servers", index, "id"),
                                         f"server id '{server.id}' is used twice"))
        seen.add(server.id)
        spec = catalog.protocols[server.protocol]
        for key_path, message in spec.check_server(server, index_of_points):
            issues.append(document.issue(("servers", index, *key_path), message))


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
