"""The OPC-UA connector: sources that subscribe to or poll the nodes of an OPC-UA server."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.config.models import ResolvedPoint, SourceBase
from bridge.core.source import BuildContext, SourceUnit
from bridge.registry import ProtocolSpec
from protocols.opcua import discover
from protocols.opcua.config import (
    PROTOCOL,
    AuthConfig,
    Deadband,
    OpcuaPoint,
    OpcuaSourceConfig,
    SecurityConfig,
    check,
    opcua_source,
    source_points,
)
from protocols.opcua.mapping import OpcuaMapper
from protocols.opcua.server import build_server
from protocols.opcua.server_config import OpcuaServerConfig
from protocols.opcua.server_config import check as check_server
from protocols.opcua.source import OpcuaSource

__all__ = [
    "SPEC",
    "AuthConfig",
    "Deadband",
    "OpcuaMapper",
    "OpcuaPoint",
    "OpcuaSource",
    "OpcuaSourceConfig",
    "SecurityConfig",
    "build",
]


def build(source: SourceBase, points: Sequence[ResolvedPoint], context: BuildContext) -> SourceUnit:
    """Compile the mapping and create the source of one configured OPC-UA server."""
    config = opcua_source(source)
    mapper = OpcuaMapper(points, bridge_id=context.bridge_id)
    return SourceUnit(
        source=OpcuaSource(config, points, bridge_id=context.bridge_id,
                           state_dir=context.state_dir),
        mapper=mapper,
    )


SPEC = ProtocolSpec(
    name=PROTOCOL,
    source_model=OpcuaSourceConfig,
    build=build,
    source_points=source_points,
    check=check,
    discovery=discover.SPEC,
    server_model=OpcuaServerConfig,
    build_server=build_server,
    check_server=check_server,
)
