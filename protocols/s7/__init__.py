"""The Siemens S7 connector: S7comm over ISO-on-TCP (python-snap7), polled in planned
block reads, with write-back and discovery."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.config.models import ResolvedPoint, SourceBase
from bridge.core.source import BuildContext, SourceUnit
from bridge.registry import ProtocolSpec
from protocols.s7 import discover
from protocols.s7.config import PROTOCOL, S7Point, S7SourceConfig, s7_source, source_points
from protocols.s7.mapping import S7Mapper
from protocols.s7.source import S7Source

__all__ = ["SPEC", "S7Mapper", "S7Point", "S7Source", "S7SourceConfig", "build"]


def build(source: SourceBase, points: Sequence[ResolvedPoint],
          context: BuildContext) -> SourceUnit:
    """Compile the mapping and create the source of one configured PLC."""
    config = s7_source(source)
    mapper = S7Mapper(points, bridge_id=context.bridge_id)
    return SourceUnit(source=S7Source(config, mapper.spans(), locations=mapper.locations()),
                      mapper=mapper)


SPEC = ProtocolSpec(
    name=PROTOCOL,
    source_model=S7SourceConfig,
    build=build,
    source_points=source_points,
    discovery=discover.SPEC,
)
"""The S7 entry of the protocol registry."""
