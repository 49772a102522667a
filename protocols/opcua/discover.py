"""OPC-UA discovery: browse a server's address space and write a source with its variables.

The browse starts at ``root`` (the Objects folder by default) and follows every hierarchical
reference (Organizes, HasComponent, HasOrderedComponent … and their subtypes), level by level
down to ``depth``, in batches within the server's MaxNodesPerBrowse, fetching the rest of a
long answer through continuation points. A node reached a second time (a reference cycle, or
a node with two parents) is not browsed again; it keeps the first browse path. Properties
(HasProperty) are not points: a variable's EngineeringUnits property becomes its ``unit``.

Each variable's DataType, ValueRank, AccessLevel, Description and current value are read in
batches within MaxNodesPerRead. A variable becomes a point when the bridge can map its value
(numbers, booleans, strings, texts, times); arrays, structures, byte strings and unreadable
variables are listed as comments at the end of the file, each with the reason. A variable
whose value reads Bad right now (a failed sensor) is mapped from its DataType and listed too:
it runs ``bad`` until it reads.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.ua_utils import get_base_data_type
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIdNames, ObjectIds
from asyncua.ua.uaerrors import UaError
from pydantic import Field, field_validator

from bridge.config.models import Duration, Identifier
from bridge.core.discovery import (
    DiscoveredItem,
    Discovery,
    DiscoveryContext,
    DiscoveryRequest,
    DiscoverySpec,
    UniqueNames,
    point_name,
    render_yaml,
    secret_reference,
)
from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError, DecodeError, ErrorCategory
from protocols.opcua.browse import (
    BrowseResult,
    RequestError,
    ServerLimits,
    browse,
    browse_path,
    call,
    nsu_form,
    read_attributes,
    resolve_root,
    server_limits,
)
from protocols.opcua.config import (
    PROTOCOL,
    AuthConfig,
    OpcuaSourceConfig,
    SecurityConfig,
    parse_node_id,
    redact_url,
)
from protocols.opcua.mapping import normalize, variant_value
from protocols.opcua.session import default_client
from protocols.opcua.source import OpcuaSource

logger = logging.getLogger(__name__)

_READ_ATTRIBUTES = (AttributeIds.DataType, AttributeIds.ValueRank, AttributeIds.AccessLevel,
                    AttributeIds.Description, AttributeIds.Value)
_CURRENT_READ = 1
_CURRENT_WRITE = 2
_MAPPABLE_TYPES = frozenset({
    ObjectIds.Boolean, ObjectIds.SByte, ObjectIds.Byte, ObjectIds.Int16, ObjectIds.UInt16,
    ObjectIds.Int32, ObjectIds.UInt32, ObjectIds.Int64, ObjectIds.UInt64, ObjectIds.Float,
    ObjectIds.Double, ObjectIds.String, ObjectIds.DateTime, ObjectIds.Guid,
    ObjectIds.XmlElement, ObjectIds.NodeId, ObjectIds.ExpandedNodeId, ObjectIds.QualifiedName,
    ObjectIds.LocalizedText, ObjectIds.Number, ObjectIds.Integer, ObjectIds.UInteger,
    ObjectIds.Enumeration,
})
"""Builtin DataTypes whose values the mapping carries (the abstract numeric ones included)."""


class OpcuaDiscoverRequest(DiscoveryRequest):
    """What to browse, and how to connect: the source's own security and identity settings."""

    url: str = Field(description="Endpoint URL, `opc.tcp://host:4840/path`.")
    root: str = Field(
        default="i=85", description="NodeId to start from (`i=85`, the Objects folder; or "
        "e.g. `ns=2;s=Plant`, `nsu=urn:vendor:plc;s=Plant`).")
    depth: int = Field(default=10, ge=1, le=64, description="Levels below the root to browse.")
    include_standard: bool = Field(
        default=False, description="Also browse standard (namespace 0) nodes below the root, "
        "such as the Server object's diagnostics.")
    security: SecurityConfig = Field(
        default_factory=SecurityConfig, description="Secure channel, as for the source.")
    auth: AuthConfig = Field(
        default_factory=AuthConfig, description="User identity, as for the source.")
    timeout: Duration = Field(
        default=10.0, gt=0, description="How long connecting, and each request, may take.")
    source_id: Identifier = Field(
        default="opcua", description="The id of the generated source.")
    mode: Literal["subscribe", "poll"] = Field(
        default="subscribe", description="The generated source's mode.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "opc.tcp" or not parts.hostname or "@" in parts.netloc:
            raise ValueError("expected an endpoint URL such as opc.tcp://plc.local:4840 "
                             "(credentials go in auth)")
        return value

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        parse_node_id(value)
        return value

    def source_config(self) -> OpcuaSourceConfig:
        """A source with these connection settings (its one point is the root)."""
        return OpcuaSourceConfig.model_validate({
            "id": self.source_id, "protocol": PROTOCOL, "url": self.url,
            "timeout": self.timeout, "security": self.security, "auth": self.auth,
            "points": [{"name": "root", "node": self.root}]})


def _target(text: str) -> dict[str, Any]:
    return {"url": text}


@dataclass(frozen=True)
class _TypeInfo:
    name: str
    base: int | None
    """The builtin (namespace 0, below 30) type it derives from, when known."""

    @property
    def structure(self) -> bool:
        """Whether its values are structures (extension objects)."""
        return self.base == ObjectIds.Structure

    @property
    def mappable(self) -> bool | None:
        """Whether a value of this type can be a point; ``None``: the type does not say."""
        if self.base is None or self.base == ObjectIds.BaseDataType:
            return None
        return self.base in _MAPPABLE_TYPES


async def _data_types(client: Client, types: set[ua.NodeId]) -> dict[ua.NodeId, _TypeInfo]:
    info: dict[ua.NodeId, _TypeInfo] = {}
    for data_type in types:
        identifier = data_type.Identifier
        if data_type.NamespaceIndex == 0 and isinstance(identifier, int) \
                and identifier in ObjectIdNames:
            name = ObjectIdNames[identifier]
        else:
            browse_name = await call("read a data type", client.get_node(data_type)
                                      .read_browse_name())
            name = browse_name.Name
        base: int | None = None
        try:
            found = (await get_base_data_type(client.get_node(data_type))).nodeid.Identifier
            base = found if isinstance(found, int) else None
        except (UaError, OSError, TimeoutError):
            pass  # the type's ancestry is not readable: judged by the value alone
        info[data_type] = _TypeInfo(name, base)
    return info


def _text(value: ua.DataValue) -> str | None:
    raw = value.Value.Value if value.Value is not None else None
    if isinstance(raw, ua.LocalizedText):
        return raw.Text or None
    return None


@dataclass(frozen=True)
class _Skipped:
    path: str
    node: str
    reason: str


async def discover(request: OpcuaDiscoverRequest, context: DiscoveryContext) -> Discovery:
    """Browse the server and write a source with a point per mappable variable.

    Raises ``ConnectorError`` when the server cannot be reached or refuses the session;
    a failure after that returns what was found, partial.
    """
    config = request.source_config()
    source = OpcuaSource(config, [], bridge_id="discover",
                         state_dir=context.state_dir or Path.cwd(),
                         client_factory=default_client)
    status = EndpointStatus(name=config.id, kind="source", protocol=PROTOCOL,
                            endpoint=config.endpoint())
    endpoint = config.endpoint()
    async with source.session(status) as client:
        try:
            limits = await server_limits(client)
            root = resolve_root(request.root, limits.namespaces)
        except RequestError as failure:
            raise ConnectorError(endpoint, failure.reason, failure.category) from failure
        found = await browse(client, root, request.depth, request.include_standard,
                       limits, context)
        if found.error is not None and not found.variables:
            raise ConnectorError(endpoint, found.error, ErrorCategory.PROTOCOL)
        items, skipped, error = await _describe(client, found, limits, context)
    if found.error is not None:
        error = found.error
    return _result(request, context, items, skipped, found, error)


async def _describe(client: Client, found: BrowseResult, limits: ServerLimits,
                    context: DiscoveryContext
                    ) -> tuple[list[DiscoveredItem], list[_Skipped], str | None]:
    variables = found.variables
    reads = [(variable.node_id, attribute) for variable in variables
             for attribute in _READ_ATTRIBUTES]
    with_units = [variable for variable in variables if variable.units_node is not None]
    reads += [(variable.units_node, AttributeIds.Value) for variable in with_units
              if variable.units_node is not None]
    try:
        values = await read_attributes(client, reads, limits, context)
        type_ids = {value.Value.Value for value in values[0:len(variables) * 5:5]
                    if value.Value is not None and isinstance(value.Value.Value, ua.NodeId)}
        types = await _data_types(client, type_ids)
    except RequestError as failure:
        return [], [], failure.reason
    units: dict[ua.NodeId, str] = {}
    for variable, value in zip(with_units, values[len(variables) * 5:], strict=True):
        raw = value.Value.Value if value.Value is not None else None
        if isinstance(raw, ua.EUInformation) and raw.DisplayName and raw.DisplayName.Text:
            units[variable.node_id] = raw.DisplayName.Text
    names = UniqueNames()
    items: list[DiscoveredItem] = []
    skipped: list[_Skipped] = []
    for index, variable in enumerate(variables):
        data_type, value_rank, access, description, value = values[index * 5:index * 5 + 5]
        path = browse_path(variable.path)
        node = nsu_form(variable.node_id, limits.namespaces)
        type_id = data_type.Value.Value if data_type.Value is not None else None
        type_info = types.get(type_id) if isinstance(type_id, ua.NodeId) else None
        type_name = type_info.name if type_info is not None else "unknown"
        rank = value_rank.Value.Value if value_rank.Value is not None else None
        level = access.Value.Value if access.Value is not None else None
        level = level if isinstance(level, int) else 0
        reason = _unmappable(type_info, type_name, rank, level, value)
        if reason is not None:
            skipped.append(_Skipped(path, node, reason))
            continue
        name = point_name([qualified.Name for qualified in variable.path], names)
        text = _text(description)
        if variable.path and text == variable.path[-1].Name:
            text = None  # many servers repeat the browse name: no news
        extra: dict[str, Any] = {"path": path, "value_rank": rank}
        if value.StatusCode is not None and value.StatusCode.is_bad():
            extra["status"] = value.StatusCode.name
        items.append(DiscoveredItem(
            name=name, address=node, type=type_name, unit=units.get(variable.node_id),
            writable=bool(level & _CURRENT_WRITE), description=text, extra=extra))
    return items, skipped, None


def _unmappable(type_info: _TypeInfo | None, type_name: str, rank: Any, level: int,
                value: ua.DataValue) -> str | None:
    """Why a variable cannot be a point, or ``None`` when it can."""
    if not level & _CURRENT_READ:
        return "not readable (AccessLevel has no CurrentRead)"
    if isinstance(rank, int) and rank >= 1:
        dimensions = "an array" if rank == 1 else f"a {rank}-dimensional array"
        return f"{dimensions} of {type_name} (ValueRank {rank}); only scalar values are bridged"
    if type_info is not None and type_info.structure:
        return f"a structure ({type_name}); only numbers, booleans and strings are bridged"
    if value.StatusCode is not None and value.StatusCode.is_bad():
        # A failed sensor is still a point: its DataType says what it will hold.
        mappable = type_info.mappable if type_info is not None else None
        if mappable is None:
            return (f"reading it gives {value.StatusCode.name} and its DataType ({type_name}) "
                    "does not say what it holds; add it by hand once it reads")
        if not mappable:
            return f"a {type_name}; only numbers, booleans and strings are bridged"
        return None
    raw = variant_value(value.Value)
    try:
        normalize(raw)
    except DecodeError as exc:
        return f"{exc.reason} ({type_name})"
    return None


def _source_section(request: OpcuaDiscoverRequest, items: Sequence[DiscoveredItem]
                    ) -> dict[str, Any]:
    section: dict[str, Any] = {"id": request.source_id, "protocol": PROTOCOL,
                               "url": request.url}
    if request.mode != "subscribe":
        section["mode"] = request.mode
    security = request.security.model_dump(mode="json", exclude_defaults=True)
    if "private_key_password" in security:
        security["private_key_password"] = secret_reference("OPCUA_KEY_PASSWORD")
    if security:
        section["security"] = security
    auth = request.auth.model_dump(mode="json", exclude_defaults=True)
    if "password" in auth:
        auth["password"] = secret_reference("OPCUA_PASSWORD")
    if "private_key_password" in auth:
        auth["private_key_password"] = secret_reference("OPCUA_USER_KEY_PASSWORD")
    if auth:
        section["auth"] = auth
    points = []
    for item in items:
        point: dict[str, Any] = {"name": item.name, "node": item.address}
        if item.unit:
            point["unit"] = item.unit
        if item.description:
            point["description"] = item.description
        if item.writable:
            point["writable"] = True
        points.append(point)
    section["points"] = points
    return section


def _result(request: OpcuaDiscoverRequest, context: DiscoveryContext,
            items: list[DiscoveredItem], skipped: list[_Skipped], found: BrowseResult,
            error: str | None) -> Discovery:
    warnings = list(found.warnings)
    if found.stopped:
        warnings.append(found.stopped)
    if error is not None:
        warnings.append(error)
    partial = error is not None or found.stopped is not None
    moment = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    header = [
        f"Generated by {context.command or 'fieldbridge discover opcua'} on {moment}",
        f"from {redact_url(request.url)} on {socket.gethostname()}: root {request.root}, "
        f"depth {request.depth}.",
        f"{len(found.variables)} variables found: {len(items)} points below, "
        f"{len(skipped)} not mapped (listed at the end).",
        "Point names come from the browse paths; rename them freely, the `node` is what "
        "counts.",
    ]
    if partial:
        header.insert(0, "PARTIAL: the browse did not finish; " + "; ".join(
            part for part in (error, found.stopped) if part))
    if request.auth.password is not None:
        header.append("Set OPCUA_PASSWORD in the environment (or write ${file:/path}).")
    if found.revisited:
        header.append(f"{found.revisited} references led to nodes already seen (cycles or "
                      "nodes with several parents): each is listed once.")
    header.extend(f"warning: {warning}" for warning in warnings)
    failing = [item for item in items if "status" in item.extra]
    footer: list[str] = []
    if failing:
        footer.append("Reading Bad during discovery (mapped from their DataType; they stay "
                      "bad until they read):")
        footer.extend(f"  {item.extra['path']} ({item.address}): {item.extra['status']}"
                      for item in failing)
    if skipped:
        footer.append("Not mapped:")
        footer.extend(f"  {entry.path} ({entry.node}): {entry.reason}" for entry in skipped)
    document: dict[str, Any] = {"sources": [_source_section(request, items)]} if items else {}
    if not items:
        header.append("No variable could be mapped: there is no source to write.")
    text = render_yaml(document, header=header, footer=footer)
    context.progress.finish(f"{len(items)} points, {len(skipped)} not mapped"
                            + (" (partial)" if partial else ""))
    return Discovery(protocol=PROTOCOL, yaml=text, items=items, partial=partial,
                     warnings=warnings, error=error)



SPEC = DiscoverySpec(
    request_model=OpcuaDiscoverRequest,
    run=discover,
    target=_target,
    target_name="URL",
    summary="browse an OPC-UA server and write a source with its variables",
)

__all__ = ["SPEC", "OpcuaDiscoverRequest", "browse_path", "discover", "nsu_form"]
