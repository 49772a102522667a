"""The Rockwell Logix connector: tags of ControlLogix/CompactLogix controllers, and CIP
attributes of other EtherNet/IP devices, over pycomm3."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.config.models import ResolvedPoint, SourceBase
from bridge.config.yamlsource import KeyPath
from bridge.core.source import BuildContext, SourceUnit
from bridge.registry import ProtocolSpec
from protocols.logix import discover
from protocols.logix.client import ClientFactory, create_client
from protocols.logix.config import LogixPoint, LogixSourceConfig
from protocols.logix.mapping import PROTOCOL, LogixMapper, TagAddress
from protocols.logix.points import items, logix_source, source_points
from protocols.logix.source import LogixSource

__all__ = ["SPEC", "LogixMapper", "LogixSource", "TagAddress", "build", "check"]


def build(source: SourceBase, points: Sequence[ResolvedPoint], context: BuildContext, *,
          client_factory: ClientFactory = create_client) -> SourceUnit:
    """Compile the mapping, plan the reads, and create the source (talking through
    ``client_factory``'s client)."""
    config = logix_source(source)
    planned = items(points)
    mapper = LogixMapper(points, planned, bridge_id=context.bridge_id)
    specs = {point.id: point.spec for point in points if isinstance(point.spec, LogixPoint)}
    return SourceUnit(source=LogixSource(config, planned, mapper, specs,
                                          client_factory=client_factory), mapper=mapper)


def check(source: SourceBase, points: Sequence[ResolvedPoint]) -> list[tuple[KeyPath, str]]:
    """Two points that read one tag (or attribute) as different types."""
    issues: list[tuple[KeyPath, str]] = []
    seen: dict[str, tuple[str, str]] = {}
    for point in points:
        spec = point.spec
        if not isinstance(spec, LogixPoint):
            continue
        address = str(spec.cip) if spec.cip is not None else spec.tag or ""
        earlier = seen.setdefault(address, (spec.type, point.id))
        if earlier[0] != spec.type:
            issues.append(((*point.path, "type"), f"reads {address} as {spec.type}, which "
                           f"point '{earlier[1]}' reads as {earlier[0]}"))
    return issues


SPEC = ProtocolSpec(
    name=PROTOCOL,
    source_model=LogixSourceConfig,
    build=build,
    source_points=source_points,
    check=check,
    discovery=discover.SPEC,
)
"""The Logix entry of the protocol registry."""
