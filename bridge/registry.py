"""The plain map from protocol names to their connectors, found through entry points.

Every connector, the four built in included, is a ``ProtocolSpec`` registered under the entry
point group ``fieldbridge.protocols``; the entry point's name is the protocol's name:

    [project.entry-points."fieldbridge.protocols"]
    bacnet = "fieldbridge_bacnet:SPEC"

A connector that fails to import, that is not a ``ProtocolSpec``, or that registers a name
another distribution already registered is left out and reported (``problems()``), naming its
distribution: the daemon serves the rest, and a configuration that uses the missing protocol
is refused with that reason at the line that names it.

May import: ``bridge.errors``, ``bridge.config`` and ``bridge.core``. The core finds protocols
only here, never by importing ``protocols/``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bridge.config import loader
from bridge.config.loader import Catalog
from bridge.config.models import (
    Config,
    ProfileBase,
    ResolvedPoint,
    ServerBase,
    SinkBase,
    SourceBase,
)
from bridge.config.yamlsource import KeyPath
from bridge.core.discovery import DiscoverySpec
from bridge.core.server import Server, ServerCheck, ServerFactory, no_server_issues
from bridge.core.sink import Sink
from bridge.core.source import BuildContext, SourceUnit
from bridge.errors import ConnectorUnavailableError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fieldbridge.protocols"
"""The entry point group connectors register in."""

OWN_DISTRIBUTION = "fieldbridge"
"""The distribution of the built-in connectors: it keeps its names when another claims them."""


def _no_points(source: SourceBase, path: KeyPath) -> list[ResolvedPoint]:
    return []


def _no_issues(source: SourceBase, points: Sequence[ResolvedPoint]) -> list[tuple[KeyPath, str]]:
    return []


@dataclass(frozen=True)
class ProtocolSpec:
    """What the core needs to know about one protocol connector: a source, a sink, a
    northbound server, or several of them."""

    name: str
    source_model: type[SourceBase] | None = None
    """The source's config model, if the protocol can be a source; ``protocol`` is
    ``Literal[name]``."""
    build: Callable[[SourceBase, Sequence[ResolvedPoint], BuildContext], SourceUnit] | None = None
    """Compile the mapping and create the source for one configured source."""
    profile_model: type[ProfileBase] | None = None
    """Device profiles for this protocol, if it has devices."""
    source_points: Callable[[SourceBase, KeyPath], list[ResolvedPoint]] = _no_points
    """Points declared on the source itself (not through devices)."""
    check: Callable[[SourceBase, Sequence[ResolvedPoint]], list[tuple[KeyPath, str]]] = _no_issues
    """Checks a schema cannot express (overlapping registers, say): (key path, message)."""
    sink_model: type[SinkBase] | None = None
    """The sink's config model, if the protocol can be a sink; ``protocol`` is ``Literal[name]``."""
    build_sink: Callable[[SinkBase, BuildContext], Sink] | None = None
    """Create the sink for one configured sink."""
    shared_workers: bool = False
    """Whether several worker processes can share one source: the broker spreads its messages
    over them (MQTT shared subscriptions, AMQP competing consumers)."""
    discovery: DiscoverySpec | None = None
    """How to browse, scan or sample an endpoint of this protocol and write its mapping
    (``fieldbridge discover``, ``POST /v1/discover/{protocol}``); ``None``: not offered."""
    server_model: type[ServerBase] | None = None
    """The northbound server's config model, if the protocol can serve points (``servers:``);
    ``protocol`` is ``Literal[name]``."""
    build_server: ServerFactory | None = None
    """Create the server for one configured server."""
    check_server: Callable[[ServerBase, Mapping[str, ResolvedPoint]], list[ServerCheck]] = (
        no_server_issues)
    """Checks of a server against the configured points (every point it serves exists,
    its type fits): (key path inside the server's entry, message)."""
    server_template: Callable[[Sequence[ResolvedPoint]], dict[str, Any]] | None = None
    """A starting ``servers:`` entry that serves the given points, as plain data
    (``fieldbridge serve-map``); ``None``: not offered."""

    def __post_init__(self) -> None:
        if (self.source_model is None) != (self.build is None):
            raise ValueError(f"protocol '{self.name}': a source needs both source_model and build")
        if (self.sink_model is None) != (self.build_sink is None):
            raise ValueError(f"protocol '{self.name}': a sink needs both sink_model and build_sink")
        if (self.server_model is None) != (self.build_server is None):
            raise ValueError(
                f"protocol '{self.name}': a server needs both server_model and build_server")
        if self.source_model is None and self.sink_model is None and self.server_model is None:
            raise ValueError(
                f"protocol '{self.name}' provides neither a source nor a sink (nor a server)")

    def source_unit(self, source: SourceBase, points: Sequence[ResolvedPoint],
                    context: BuildContext) -> SourceUnit:
        """Compile the mapping and create the source; ``ConnectorUnavailableError`` without one."""
        if self.build is None:
            raise ConnectorUnavailableError(self.name, "source")
        return self.build(source, points, context)

    def sink(self, config: SinkBase, context: BuildContext) -> Sink:
        """Create the sink for one configured sink; ``ConnectorUnavailableError`` without one."""
        if self.build_sink is None:
            raise ConnectorUnavailableError(self.name, "sink")
        return self.build_sink(config, context)

    def server(self, config: ServerBase, context: BuildContext) -> Server:
        """Create the server for one configured server; ``ConnectorUnavailableError``
        without one."""
        if self.build_server is None:
            raise ConnectorUnavailableError(self.name, "server")
        return self.build_server(config, context)


@dataclass(frozen=True)
class PluginProblem:
    """A registered connector that was left out, and why."""

    protocol: str
    """The entry point's name: the protocol it meant to provide."""
    distribution: str
    reason: str

    def __str__(self) -> str:
        return (f"connector '{self.protocol}' from distribution '{self.distribution}' "
                f"{self.reason}")


@dataclass(frozen=True)
class Connectors:
    """What discovery found: the usable connectors by name, and those left out."""

    protocols: dict[str, ProtocolSpec]
    problems: tuple[PluginProblem, ...] = field(default=())
    distributions: dict[str, str] = field(default_factory=dict)
    """Protocol name → the distribution that provides it."""

    def catalog(self) -> Catalog:
        """What the config loader needs: the models, and why a missing protocol is missing."""
        unavailable = {problem.protocol: str(problem) for problem in self.problems
                       if problem.protocol not in self.protocols}
        return Catalog(protocols=self.protocols, unavailable=unavailable)


def _distribution(entry: EntryPoint) -> str:
    dist = entry.dist
    return dist.name if dist is not None else "(unknown distribution)"


def discover(entries: Iterable[EntryPoint] | None = None) -> Connectors:
    """Load every connector registered under ``fieldbridge.protocols``.

    The built-in distribution comes first, then the others by name, so which of two claims to
    one protocol name wins does not depend on the order of ``sys.path``; within a distribution,
    connectors come by name.
    """
    if entries is None:
        entries = entry_points(group=ENTRY_POINT_GROUP)
    ordered = sorted(entries, key=lambda entry: (
        _distribution(entry) != OWN_DISTRIBUTION, _distribution(entry), entry.name))
    found: dict[str, ProtocolSpec] = {}
    owners: dict[str, str] = {}
    problems: list[PluginProblem] = []
    for entry in ordered:
        distribution = _distribution(entry)
        if entry.name in owners:
            problems.append(PluginProblem(entry.name, distribution, (
                f"registers protocol '{entry.name}', which distribution "
                f"'{owners[entry.name]}' already provides: left out")))
            continue
        try:
            spec = entry.load()
        except Exception as exc:  # a third party's import: report it, serve the rest
            problems.append(PluginProblem(entry.name, distribution, (
                f"failed to load ({entry.value}): {type(exc).__name__}: {exc}")))
            continue
        if not isinstance(spec, ProtocolSpec):
            problems.append(PluginProblem(entry.name, distribution, (
                f"points at {entry.value}, which is a {type(spec).__name__}, "
                "not a ProtocolSpec")))
            continue
        if spec.name != entry.name:
            problems.append(PluginProblem(entry.name, distribution, (
                f"registers entry point '{entry.name}' for a ProtocolSpec named '{spec.name}': "
                "the two must match")))
            continue
        found[spec.name] = spec
        owners[spec.name] = distribution
    return Connectors(found, tuple(problems), owners)


@cache
def installed() -> Connectors:
    """The connectors of this installation, discovered once; problems are logged once."""
    connectors = discover()
    for problem in connectors.problems:
        logger.error("%s", problem)
    return connectors


def protocols() -> dict[str, ProtocolSpec]:
    """Every usable protocol connector, by name."""
    return installed().protocols


def problems() -> tuple[PluginProblem, ...]:
    """Registered connectors that were left out, and why."""
    return installed().problems


def discoverable() -> dict[str, DiscoverySpec]:
    """The discovery of every usable connector that offers one, by protocol name."""
    return {name: spec.discovery for name, spec in protocols().items()
            if spec.discovery is not None}


def load_config(path: str | Path) -> Config:
    """Load a configuration file as the installed connectors read it (``ConfigError``)."""
    return loader.load_config(path, installed().catalog())


def root_model() -> type[BaseModel]:
    """The whole-file model of the installed connectors (the JSON Schema comes from it)."""
    return loader.root_model(installed().catalog())
