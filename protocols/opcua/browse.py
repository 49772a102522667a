"""OPC-UA browsing for discovery: the server's limits, a breadth-first walk of its address
space, and attribute reads, each in batches the server accepts.

The walk follows every hierarchical reference (Organizes, HasComponent, HasOrderedComponent
… and their subtypes) level by level, fetching the rest of a long answer through
continuation points. A node reached a second time (a reference cycle, or a node with two
parents) is not browsed again; it keeps the first browse path. Properties (HasProperty) are
not walked: a variable's EngineeringUnits property is remembered for its unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.uaerrors import UaError

from bridge.core.discovery import DiscoveryContext
from bridge.errors import ErrorCategory
from protocols.opcua.config import parse_node_id
from protocols.opcua.readings import chunked
from protocols.opcua.session import describe

DEFAULT_BATCH = 1000
"""Nodes per Browse or Read call when the server states no limit."""
MAX_REFERENCES = 1000
"""References asked per node and call; a server with more hands out a continuation point."""
_HAS_PROPERTY = ua.NodeId(ua.Int32(ObjectIds.HasProperty))


@dataclass
class Found:
    """A node reached by the browse."""

    node_id: ua.NodeId
    path: tuple[ua.QualifiedName, ...]
    node_class: ua.NodeClass
    units_node: ua.NodeId | None = None


@dataclass
class BrowseResult:
    """What one browse gathered so far."""

    variables: list[Found] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    revisited: int = 0
    error: str | None = None
    stopped: str | None = None


@dataclass(frozen=True)
class ServerLimits:
    """Nodes per Browse and per Read the server accepts, and its namespace table."""

    browse: int
    read: int
    namespaces: tuple[str, ...]


class RequestError(Exception):
    """A request failed part-way; what was found so far is still written."""

    def __init__(self, reason: str, category: ErrorCategory) -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category


async def call(doing: str, work: Any) -> Any:
    """Await ``work``; its failure as a ``RequestError`` naming ``doing``."""
    try:
        return await work
    except (UaError, OSError, TimeoutError) as exc:
        reason, category = describe(exc)
        raise RequestError(f"{doing}: {reason}", category) from exc


def _numeric(identifier: int) -> ua.NodeId:
    return ua.NodeId(ua.Int32(identifier))


async def server_limits(client: Client) -> ServerLimits:
    """The server's MaxNodesPerBrowse and MaxNodesPerRead (capped), and namespace table."""
    ids = [_numeric(ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerBrowse),
           _numeric(ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead),
           _numeric(ObjectIds.Server_NamespaceArray)]
    values = await call("read server limits",
                         client.uaclient.read_attributes(ids, AttributeIds.Value))
    caps = []
    for value in values[:2]:
        raw = value.Value.Value if value.Value is not None else None
        good = value.StatusCode is None or value.StatusCode.is_good()
        caps.append(min(int(raw), DEFAULT_BATCH * 10) if good and isinstance(raw, int)
                    and raw > 0 else DEFAULT_BATCH)
    array = values[2].Value.Value if values[2].Value is not None else None
    return ServerLimits(browse=caps[0], read=caps[1],
                   namespaces=tuple(array) if isinstance(array, list) else ())


def nsu_form(node_id: ua.NodeId, namespaces: Sequence[str]) -> str:
    """The NodeId with its namespace URI instead of its index (namespace 0 stays short)."""
    text = ua.NodeId(node_id.Identifier, node_id.NamespaceIndex, node_id.NodeIdType).to_string()
    index = node_id.NamespaceIndex
    if index == 0 or index >= len(namespaces):
        return text
    _, _, identifier = text.partition(";")
    return f"nsu={namespaces[index]};{identifier}"


def browse_path(path: Sequence[ua.QualifiedName]) -> str:
    """A browse path in the text form a point's ``path`` takes (``2:Plant/2:Boiler``)."""

    def escape(name: str) -> str:
        for character in "&/.<>:#!":
            name = name.replace(character, f"&{character}")
        return name

    return "/".join(f"{name.NamespaceIndex}:{escape(name.Name)}" for name in path)


def resolve_root(text: str, namespaces: Sequence[str]) -> ua.NodeId:
    """The root NodeId, its namespace URI (if given so) looked up in ``namespaces``."""
    parsed = parse_node_id(text)
    if isinstance(parsed, ua.ExpandedNodeId) and parsed.NamespaceUri:
        if parsed.NamespaceUri not in namespaces:
            raise RequestError(f"namespace {parsed.NamespaceUri} of the root is not on the server",
                          ErrorCategory.CONFIG)
        return ua.NodeId(parsed.Identifier, ua.Int16(namespaces.index(parsed.NamespaceUri)),
                         parsed.NodeIdType)
    return ua.NodeId(parsed.Identifier, parsed.NamespaceIndex, parsed.NodeIdType)


async def _browse_batch(client: Client, nodes: Sequence[ua.NodeId]
                        ) -> list[tuple[ua.StatusCode, list[ua.ReferenceDescription]]]:
    parameters = ua.BrowseParameters()
    parameters.RequestedMaxReferencesPerNode = MAX_REFERENCES
    parameters.NodesToBrowse = [
        ua.BrowseDescription(
            NodeId=node, BrowseDirection=ua.BrowseDirection.Forward,
            ReferenceTypeId=_numeric(ObjectIds.HierarchicalReferences), IncludeSubtypes=True,
            NodeClassMask=ua.NodeClass.Object | ua.NodeClass.Variable,
            ResultMask=ua.BrowseResultMask.All)
        for node in nodes]
    results = await call("browse", client.uaclient.browse(parameters))
    answers: list[tuple[ua.StatusCode, list[ua.ReferenceDescription]]] = []
    for result in results:
        references = list(result.References or [])
        continuation = result.ContinuationPoint
        while continuation:
            following = ua.BrowseNextParameters()
            following.ReleaseContinuationPoints = False
            following.ContinuationPoints = [continuation]
            (more,) = await call("browse (continuation)",
                                  client.uaclient.browse_next(following))
            if not more.StatusCode.is_good():
                raise RequestError(f"browse (continuation): {more.StatusCode.name}",
                              ErrorCategory.PROTOCOL)
            references.extend(more.References or [])
            continuation = more.ContinuationPoint
        answers.append((result.StatusCode, references))
    return answers


async def browse(client: Client, root: ua.NodeId, depth: int,
                 include_standard: bool, limits: ServerLimits, context: DiscoveryContext
                 ) -> BrowseResult:
    """Walk down from ``root`` to ``depth`` levels; a failure part-way is kept in
    ``error`` with what was found so far."""
    found = BrowseResult()
    seen = {root}
    level: list[Found] = [Found(root, (), ua.NodeClass.Object)]
    browsed = 0
    try:
        for _ in range(depth):
            following: list[Found] = []
            for batch in chunked(level, limits.browse):
                stopped = context.budget.why_stopped(len(found.variables))
                if stopped is not None:
                    found.stopped = stopped
                    return found
                answers = await _browse_batch(client, [node.node_id for node in batch])
                browsed += len(batch)
                context.progress.update(browsed, None, f"nodes browsed, "
                                        f"{len(found.variables)} variables")
                for parent, (status, references) in zip(batch, answers, strict=True):
                    if not status.is_good():
                        found.warnings.append(f"{browse_path(parent.path) or 'root'}: browse "
                                              f"refused ({status.name}); below it not covered")
                        continue
                    following.extend(_children(parent, references, seen, include_standard, found))
            level = following
            if not level:
                break
        else:
            if level:
                found.warnings.append(f"depth {depth} reached: {len(level)} nodes at "
                                      "that depth were not browsed (raise --depth)")
    except RequestError as failure:
        found.error = failure.reason
    return found


def _children(parent: Found, references: Sequence[ua.ReferenceDescription],
              seen: set[ua.NodeId], include_standard: bool, found: BrowseResult
              ) -> list[Found]:
    children = []
    for reference in references:
        target = reference.NodeId
        node_id = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
        if reference.ReferenceTypeId == _HAS_PROPERTY:
            if (parent.node_class == ua.NodeClass.Variable
                    and reference.BrowseName.Name == "EngineeringUnits"):
                parent.units_node = node_id
            continue
        if isinstance(target, ua.ExpandedNodeId) and target.ServerIndex:
            continue
        if node_id in seen:
            found.revisited += 1
            continue
        seen.add(node_id)
        if node_id.NamespaceIndex == 0 and not include_standard:
            continue
        child = Found(node_id, (*parent.path, reference.BrowseName), reference.NodeClass)
        if reference.NodeClass == ua.NodeClass.Variable:
            found.variables.append(child)
        children.append(child)
    return children


async def read_attributes(client: Client, reads: Sequence[tuple[ua.NodeId, int]],
                          limits: ServerLimits, context: DiscoveryContext
                          ) -> list[ua.DataValue]:
    """The values of ``(node, attribute)`` pairs, in order, read in batches."""
    values: list[ua.DataValue] = []
    for batch in chunked(reads, limits.read):
        parameters = ua.ReadParameters()
        parameters.TimestampsToReturn = ua.TimestampsToReturn.Neither
        parameters.NodesToRead = [ua.ReadValueId(NodeId=node, AttributeId=attribute)
                                  for node, attribute in batch]
        values.extend(await call("read attributes", client.uaclient.read(parameters)))
        context.progress.update(len(values), len(reads), "attributes read")
    return values

