"""The Modbus connector: TCP, RTU over TCP and RTU serial sources polling register maps, and
a Modbus TCP server serving bridged points."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.config.models import ResolvedPoint, SourceBase
from bridge.config.yamlsource import KeyPath
from bridge.core.source import BuildContext, SourceUnit
from bridge.registry import ProtocolSpec
from protocols.modbus import discover
from protocols.modbus.config import (
    BIT_TABLES,
    ModbusPoint,
    ModbusProfile,
    ModbusSourceConfig,
)
from protocols.modbus.holes import DevicePlan
from protocols.modbus.mapping import PROTOCOL, BlockAddress, ModbusMapper
from protocols.modbus.planner import Block, plan
from protocols.modbus.server import build_server
from protocols.modbus.server_config import ModbusServerConfig
from protocols.modbus.server_config import check as check_server
from protocols.modbus.server_config import template as server_template
from protocols.modbus.source import ModbusSource

__all__ = ["SPEC", "Block", "BlockAddress", "ModbusMapper", "ModbusSource", "build", "check"]


def _modbus_source(source: SourceBase) -> ModbusSourceConfig:
    if not isinstance(source, ModbusSourceConfig):
        raise TypeError(f"source {source.id} is not a Modbus source")
    return source


def build(
    source: SourceBase, points: Sequence[ResolvedPoint], context: BuildContext
) -> SourceUnit:
    """Compile the mapping, plan each device's requests, and create the source."""
    config = _modbus_source(source)
    mapper = ModbusMapper(points, bridge_id=context.bridge_id)
    devices = [
        DevicePlan(
            id=device.id,
            unit=device.unit,
            interval=device.interval,
            blocks=tuple(plan(mapper.spans(device.id), max_gap=config.max_gap,
                              max_registers=config.max_registers, max_bits=config.max_bits)),
            spans=tuple(mapper.spans(device.id)),
            max_registers=config.max_registers,
            max_bits=config.max_bits,
        )
        for device in config.devices
    ]
    locations = {point.id: location for point in points
                 if (location := mapper.locate(point.id)) is not None}
    return SourceUnit(source=ModbusSource(config, devices, locations=locations), mapper=mapper)


_NOUNS = {"coil": "coil", "discrete": "discrete input", "input": "input register",
          "holding": "holding register"}

_Member = tuple[int, ResolvedPoint, ModbusPoint]
"""A point with its declaration index, in the overlap check."""


def _describe(point: ModbusPoint) -> str:
    """What a point reads, numbered as its configuration wrote it (Modicon or offset)."""
    first = point.address
    last = first + point.count - 1
    noun = _NOUNS[point.resolved_table] if point.table is None else f"{point.table} offset"
    if point.bit is not None:
        return f"bit {point.bit} of {noun} {first}"
    if first == last:
        return f"{noun} {first}"
    return f"{noun}s {first}-{last}"


def check(source: SourceBase, points: Sequence[ResolvedPoint]) -> list[tuple[KeyPath, str]]:
    """Registers read by two points of one device, and points too large for one request.

    Each issue is reported at the point declared later, in declaration order.
    """
    config = _modbus_source(source)
    issues: dict[tuple[KeyPath, str], int] = {}
    groups: dict[tuple[str | None, str], list[_Member]] = {}
    for index, point in enumerate(points):
        spec = point.spec
        if not isinstance(spec, ModbusPoint):
            continue
        table = spec.resolved_table
        limit = config.max_bits if table in BIT_TABLES else config.max_registers
        if spec.count > limit:
            issues.setdefault(
                ((*point.path, "length"), f"a string of {spec.count} registers does not fit "
                 f"in one request (max_registers: {limit})"), index)
        groups.setdefault((point.device, table), []).append((index, point, spec))
    for members in groups.values():
        members.sort(key=lambda member: (member[2].start, member[0]))
        active: list[_Member] = []
        for member in members:
            spec = member[2]
            active = [other for other in active
                      if other[2].start + other[2].count > spec.start]
            for other in active:
                other_spec = other[2]
                if (spec.bit is not None and other_spec.bit is not None
                        and spec.bit != other_spec.bit):
                    continue
                earlier, later = sorted((member, other), key=lambda item: item[0])
                issues.setdefault(
                    ((*later[1].path, "address"),
                     f"reads {_describe(later[2])}, which point '{earlier[2].name}' reads "
                     f"too ({_describe(earlier[2])})"), later[0])
            active.append(member)
    return sorted(issues, key=lambda issue: issues[issue])


SPEC = ProtocolSpec(
    name=PROTOCOL,
    source_model=ModbusSourceConfig,
    build=build,
    profile_model=ModbusProfile,
    check=check,
    discovery=discover.SPEC,
    server_model=ModbusServerConfig,
    build_server=build_server,
    check_server=check_server,
    server_template=server_template,
)
"""The Modbus entry of the protocol registry."""
