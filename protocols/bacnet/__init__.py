"""The BACnet/IP connector: devices found by instance, read by ReadPropertyMultiple or COV,
written at a priority, discovered with Who-Is."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.config.models import ResolvedPoint, SourceBase
from bridge.config.yamlsource import KeyPath
from bridge.core.source import BuildContext, SourceUnit
from bridge.registry import ProtocolSpec
from protocols.bacnet import discover
from protocols.bacnet.config import (
    PROTOCOL,
    BacnetDevice,
    BacnetPoint,
    BacnetProfile,
    BacnetSourceConfig,
    bacnet_source,
)
from protocols.bacnet.mapping import BacnetMapper
from protocols.bacnet.source import BacnetSource

__all__ = ["SPEC", "BacnetDevice", "BacnetMapper", "BacnetPoint", "BacnetSource",
           "BacnetSourceConfig", "build", "check"]


def build(source: SourceBase, points: Sequence[ResolvedPoint], context: BuildContext
          ) -> SourceUnit:
    """Compile the mapping and create the source of one BACnet/IP port."""
    config = bacnet_source(source)
    return SourceUnit(source=BacnetSource(config, points),
                      mapper=BacnetMapper(points, bridge_id=context.bridge_id))


def check(source: SourceBase, points: Sequence[ResolvedPoint]) -> list[tuple[KeyPath, str]]:
    """One property read with two priorities or modes (a write or a subscription is per
    property)."""
    bacnet_source(source)
    issues: list[tuple[KeyPath, str]] = []
    first: dict[tuple[str | None, str], tuple[ResolvedPoint, BacnetPoint]] = {}
    for point in points:
        spec = point.spec
        if not isinstance(spec, BacnetPoint):
            continue
        seen_point, seen_spec = first.setdefault((point.device, spec.address), (point, spec))
        if seen_point is not point and (seen_spec.mode, seen_spec.priority) != (
                spec.mode, spec.priority):
            issues.append((point.path, f"point '{seen_point.id}' reads the same property with "
                           "another mode or priority; give both the same"))
    return issues


SPEC = ProtocolSpec(
    name=PROTOCOL,
    source_model=BacnetSourceConfig,
    build=build,
    profile_model=BacnetProfile,
    check=check,
    discovery=discover.SPEC,
)
"""The BACnet entry of the protocol registry."""
