"""The plain map from protocol names to their connectors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from bridge.config.yamlsource import KeyPath

if TYPE_CHECKING:
    from bridge.config.models import ProfileBase, ResolvedPoint, SinkBase, SourceBase
    from bridge.pipeline.sink import Sink
    from bridge.pipeline.source import BuildContext, SourceUnit


def _no_points(source: SourceBase, path: KeyPath) -> list[ResolvedPoint]:
    return []


def _no_issues(source: SourceBase, points: Sequence[ResolvedPoint]) -> list[tuple[KeyPath, str]]:
    return []


@dataclass(frozen=True)
class ProtocolSpec:
    """What the core needs to know about one protocol connector."""

    name: str
    source_model: type[SourceBase]
    """The source's config model; its ``protocol`` field is ``Literal[name]``."""
    build: Callable[[SourceBase, Sequence[ResolvedPoint], BuildContext], SourceUnit]
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


@cache
def protocols() -> dict[str, ProtocolSpec]:
    """Every protocol connector, by name."""
    from protocols import PROTOCOLS

    return PROTOCOLS
