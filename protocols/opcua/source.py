"""The OPC-UA source: one session to one server, subscribing to or polling its nodes.

The source connects, resolves every configured node (NodeIds as given, namespace URIs and
browse paths through the server), then serves until the connection fails, when it marks
every point ``bad`` with the reason, raises ``ConnectorError`` and lets the supervisor back
off and call ``run`` again; every run creates the subscription and all its monitored items
afresh. asyncua's own reconnect stays off so
that one supervisor owns retrying.

A node that does not exist or cannot be read marks its points ``bad`` with the server's
reason (and the source ``degraded``); it never stops the other points.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import (
    DataChangeEvent,
    OverflowPolicy,
    StatusChangeEvent,
    Subscription,
)
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds

from bridge.config.models import ResolvedPoint
from bridge.core.aio import primary_failure
from bridge.core.counters import OVERRUNS
from bridge.core.model import Quality, Reading, Value
from bridge.core.source import Source, SourceContext
from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError, DeviceError, ErrorCategory, ReadError, WriteError
from protocols.opcua.config import (
    PROTOCOL,
    OpcuaPoint,
    OpcuaSourceConfig,
    parse_browse_path,
    parse_node_id,
)
from protocols.opcua.readings import (
    NodeHealth,
    PendingReadings,
    chunked,
    reading_of,
)
from protocols.opcua.session import (
    SESSION_TIMEOUT,
    ClientFactory,
    Session,
    default_client,
    describe,
    status_category,
)
from protocols.opcua.write import write_node

DEFAULT_BATCH = 1000
"""Nodes per Read or CreateMonitoredItems call when neither the server nor the config caps it."""
NOTIFICATION_QUEUE = 10_000
"""Notifications asyncua may hold for us, at the least; past that the session is
re-established."""
PENDING_READINGS = 10_000
"""Readings collected while the previous batch is still being published, at the least."""
QUEUE_PER_NODE = 4
"""Both bounds grow with the subscription: the first burst of initial values alone is one
notification per node."""

def _numeric(identifier: int) -> ua.NodeId:
    """A namespace-0 numeric NodeId (the standard nodes)."""
    return ua.NodeId(ua.Int32(identifier))


@dataclass
class _Node:
    """One node the source serves (several points may read it)."""

    address: str
    spec: OpcuaPoint
    node_id: ua.NodeId | None = None


@dataclass(frozen=True)
class _Limits:
    """What the server allows per call, and its namespace table."""

    read: int
    monitor: int
    translate: int
    namespaces: tuple[str, ...]


class OpcuaSource(Source):
    """An OPC-UA server, subscribed to (monitored items) or polled (batched reads)."""

    def __init__(
        self,
        config: OpcuaSourceConfig,
        points: Sequence[ResolvedPoint],
        *,
        bridge_id: str,
        state_dir: Path,
        client_factory: ClientFactory = default_client,
    ) -> None:
        super().__init__(source_id=config.id, protocol=PROTOCOL, endpoint=config.endpoint())
        self.config = config
        self.bridge_id = bridge_id
        self._client_factory = client_factory
        self._session = Session(
            config, endpoint=self.endpoint, application_uri=self.application_uri,
            certificate_dir=state_dir / "opcua" / config.id,
            description=f"Fieldbridge {bridge_id}/{config.id}")
        self._points: dict[str, OpcuaPoint] = {}
        self._nodes: dict[str, _Node] = {}
        for point in points:
            spec = point.spec
            if not isinstance(spec, OpcuaPoint):
                raise TypeError(f"point {point.id} is not an OPC-UA point")
            self._points[point.id] = spec
            self._nodes.setdefault(spec.address, _Node(spec.address, spec))
        self._client: Client | None = None
        self._problems: dict[str, str] = {}
        self._overflowed = asyncio.Event()
        self._loss: str | None = None

    @property
    def application_uri(self) -> str:
        """The ApplicationUri this client presents (and a generated certificate carries)."""
        security = self.config.security
        if security.application_uri is not None:
            return security.application_uri
        return f"urn:fieldbridge:{self.bridge_id}:{self.id}"

    # -- running ---------------------------------------------------------------------------

    async def run(self, context: SourceContext) -> None:
        """Connect, resolve the nodes, then subscribe or poll until the connection fails.

        When it fails (or cannot be made), every point turns ``bad`` with the reason before
        the error goes to the supervisor: a value from a server that is gone is not current.
        """
        try:
            await self._serve(context)
        except ConnectorError as exc:
            await self._all_bad(context, exc.reason)
            raise

    async def _all_bad(self, context: SourceContext, reason: str) -> None:
        now = time.time()
        await context.publish([
            Reading(source=self.id, address=address, value=None, received_at=now,
                    quality=Quality.BAD, reason=reason)
            for address in self._nodes])

    async def _serve(self, context: SourceContext) -> None:
        """One session: connect, resolve, then subscribe or poll until it fails."""
        client = self._client_factory(self.config)
        client.connection_lost_callback = self._lost
        self._loss = None
        connected = False
        try:
            await self._session.open(client, context.status)
            connected = True
            context.status.up()
            limits = await self._limits(client)
            await self._resolve(client, limits)
            self._client = client
            try:
                async with asyncio.TaskGroup() as group:
                    if self.config.mode == "subscribe":
                        await self._subscribe(client, limits, context, group)
                    else:
                        group.create_task(self._poll(client, limits, context),
                                          name=f"{PROTOCOL}[{self.id}].poll")
                    # Watched in the group's body, which so stays busy until a task fails:
                    # Python 3.11's TaskGroup leaves its parent marked as cancelling when a
                    # task fails after the body has returned.
                    await self._watch(client)
            except BaseExceptionGroup as failures:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    # Cancelled while a task failed: stopping wins over reconnecting.
                    raise asyncio.CancelledError from None
                raise primary_failure(failures) from None
        finally:
            self._client = None
            await self._session.close(client, connected)

    @contextlib.asynccontextmanager
    async def session(self, status: EndpointStatus) -> AsyncIterator[Client]:
        """A connected client for one-off work such as discovery: the source's security,
        identity and certificate handling; the session is closed on the way out."""
        client = self._client_factory(self.config)
        connected = False
        try:
            await self._session.open(client, status)
            connected = True
            yield client
        finally:
            await self._session.close(client, connected)

    async def _limits(self, client: Client) -> _Limits:
        """The server's operation limits (0 or absent: none) and namespace table."""
        limit_ids = (
            ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
            ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerTranslateBrowsePathsToNodeIds,
        )
        node_ids = [_numeric(identifier) for identifier in (*limit_ids,
                                                             ObjectIds.Server_NamespaceArray)]
        with self._session.failures("read server limits"):
            values = await client.uaclient.read_attributes(node_ids, AttributeIds.Value)
        caps: list[int] = []
        for value in values[:3]:
            raw = value.Value.Value if value.Value is not None else None
            good = value.StatusCode is None or value.StatusCode.is_good()
            caps.append(int(raw) if good and isinstance(raw, int) and raw > 0 else DEFAULT_BATCH)
        namespace_value = values[3].Value.Value if values[3].Value is not None else None
        namespaces = tuple(namespace_value) if isinstance(namespace_value, list) else ()
        read = caps[0]
        if self.config.max_nodes_per_read is not None:
            read = min(read, self.config.max_nodes_per_read)
        return _Limits(read=read, monitor=caps[1], translate=caps[2], namespaces=namespaces)

    async def _resolve(self, client: Client, limits: _Limits) -> None:
        """NodeIds for every node; what cannot be resolved is a problem, not an error."""
        self._problems = {}
        paths: list[_Node] = []
        for node in self._nodes.values():
            node.node_id = None
            if node.spec.node is None:
                paths.append(node)
                continue
            parsed = parse_node_id(node.spec.node)
            if isinstance(parsed, ua.ExpandedNodeId) and parsed.NamespaceUri:
                if parsed.NamespaceUri not in limits.namespaces:
                    self._problems[node.address] = (
                        f"namespace {parsed.NamespaceUri} is not on the server")
                    continue
                index = limits.namespaces.index(parsed.NamespaceUri)
                parsed = ua.NodeId(parsed.Identifier, ua.Int16(index), parsed.NodeIdType)
            node.node_id = ua.NodeId(parsed.Identifier, parsed.NamespaceIndex, parsed.NodeIdType)
        objects = _numeric(ObjectIds.ObjectsFolder)
        for batch in chunked(paths, limits.translate):
            relative = [parse_browse_path(node.address) for node in batch]
            with self._session.failures("resolve browse paths"):
                results = await client.translate_browsepaths(objects, relative)
            for node, result in zip(batch, results, strict=True):
                if result.StatusCode.is_good() and result.Targets:
                    target = result.Targets[0].TargetId
                    node.node_id = ua.NodeId(target.Identifier, target.NamespaceIndex,
                                             target.NodeIdType)
                else:
                    name = result.StatusCode.name if not result.StatusCode.is_good() else (
                        "BadNoMatch")
                    self._problems[node.address] = name

    def _unresolved(self, received_at: float) -> list[Reading]:
        return [
            Reading(source=self.id, address=address, value=None, received_at=received_at,
                    quality=Quality.BAD, reason=reason)
            for address, reason in self._problems.items()
        ]

    async def _watch(self, client: Client) -> None:
        """Raise once the connection is lost (socket closed or the keep-alive read failed)."""
        async with client.subscribe_state() as states:
            while client.state is UaClientState.CONNECTED:
                await states.next_change()
        cause = f": {self._loss}" if self._loss else ""
        raise ConnectorError(self.endpoint, f"connection lost{cause}", ErrorCategory.TRANSIENT)

    def _queue_bound(self) -> int:
        return max(NOTIFICATION_QUEUE, QUEUE_PER_NODE * len(self._nodes))

    async def _lost(self, exc: Exception) -> None:
        """asyncua's connection-lost callback: remember why, for ``_watch`` to report."""
        self._loss = describe(exc)[0]

    async def _watch_overflow(self) -> None:
        await self._overflowed.wait()
        raise ConnectorError(self.endpoint, f"more than {self._queue_bound()} notifications "
                             "waited to be handed on; resubscribing to catch up",
                             ErrorCategory.TRANSIENT)

    async def _subscribe(
        self, client: Client, limits: _Limits, context: SourceContext, group: asyncio.TaskGroup
    ) -> None:
        """Create the subscription and its monitored items, then serve them from tasks."""
        config = self.config
        interval = config.publishing_interval * 1000
        keepalive = max(1, math.ceil(config.keepalive * 1000 / interval))
        parameters = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=interval,
            RequestedLifetimeCount=max(3 * keepalive, math.ceil(SESSION_TIMEOUT * 1000 / interval)),
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        with self._session.failures("create subscription"):
            subscription = await client.create_subscription(
                parameters, None, queue_maxsize=self._queue_bound(),
                overflow=OverflowPolicy.DISCONNECT)
        self._overflowed = asyncio.Event()
        subscription.set_overflow_disconnect_handler(self._overflowed.set)
        readable = [node for node in self._nodes.values() if node.node_id is not None]
        handles = {handle: node for handle, node in enumerate(readable, start=1)}
        requests = [self._monitor_request(handle, node) for handle, node in handles.items()]
        created = 0
        for batch in chunked(requests, limits.monitor):
            with self._session.failures("create monitored items"):
                results = await subscription.create_monitored_items(batch)
            for request, result in zip(batch, results, strict=True):
                if isinstance(result, ua.StatusCode):
                    node = handles[request.RequestedParameters.ClientHandle]
                    self._problems[node.address] = result.name
                else:
                    created += 1
        context.status.details["monitored_items"] = created
        health = NodeHealth(dict(self._problems))
        await context.publish(self._unresolved(time.time()))
        health.report(context.status, len(self._nodes))
        pending = PendingReadings(max(PENDING_READINGS, QUEUE_PER_NODE * len(self._nodes)))
        name = f"{PROTOCOL}[{self.id}]"
        addresses = {handle: node.address for handle, node in handles.items()}
        group.create_task(self._watch_overflow(), name=f"{name}.overflow")
        group.create_task(self._collect(client, subscription, addresses, pending),
                          name=f"{name}.notifications")
        group.create_task(self._hand_on(pending, health, context), name=f"{name}.publish")

    def _monitor_request(self, handle: int, node: _Node) -> ua.MonitoredItemCreateRequest:
        config, spec = self.config, node.spec
        sampling = spec.sampling_interval if spec.sampling_interval is not None else (
            config.sampling_interval)
        deadband = spec.deadband or config.deadband
        data_filter = None
        if deadband is not None:
            data_filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=(ua.DeadbandType.Absolute if deadband.type == "absolute"
                              else ua.DeadbandType.Percent),
                DeadbandValue=deadband.value,
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=node.node_id, AttributeId=AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=ua.MonitoringParameters(
                ClientHandle=handle,
                # -1 asks the server to sample at the publishing interval.
                SamplingInterval=sampling * 1000 if sampling is not None else -1,
                QueueSize=spec.queue_size or config.queue_size,
                DiscardOldest=True,
                Filter=data_filter,
            ),
        )

    async def _collect(
        self, client: Client, subscription: Subscription, addresses: dict[int, str],
        pending: PendingReadings,
    ) -> None:
        """Turn notifications into readings as they come, without publishing each one."""
        async for event in subscription:
            if isinstance(event, DataChangeEvent):
                item = event.data.monitored_item
                address = addresses.get(item.ClientHandle)
                if address is not None:
                    await pending.put(reading_of(self.id, address, item.Value, time.time()))
            elif isinstance(event, StatusChangeEvent):
                status = event.notification.Status
                if status is None or status.is_good():
                    continue
                if client.state is not UaClientState.CONNECTED:
                    return  # asyncua telling its subscriptions the connection is gone: _watch
                    # reports that, with the reason.
                raise ConnectorError(self.endpoint, f"the server ended the subscription: "
                                     f"{status.name}", status_category(status.name))
        raise ConnectorError(self.endpoint, "the subscription was closed",
                             ErrorCategory.TRANSIENT)

    async def _hand_on(self, pending: PendingReadings, health: NodeHealth,
                       context: SourceContext) -> None:
        while True:
            readings = await pending.take()
            await context.publish(readings)
            for reading in readings:
                health.note(reading)
            health.report(context.status, len(self._nodes))

    async def _poll(self, client: Client, limits: _Limits, context: SourceContext) -> None:
        """Read every node each cycle, in batches the server accepts, and publish per cycle."""
        status = context.status
        health = NodeHealth(dict(self._problems))
        await context.publish(self._unresolved(time.time()))
        readable = [node for node in self._nodes.values() if node.node_id is not None]
        batches = chunked(readable, limits.read)
        status.details["read_batches"] = len(batches)
        loop = asyncio.get_running_loop()
        interval = self.config.poll_interval
        due = loop.time()
        while True:
            readings: list[Reading] = []
            for batch in batches:
                readings.extend(await self._read(client, batch))
            await context.publish(readings)
            for reading in readings:
                health.note(reading)
            health.report(status, len(self._nodes))
            due += interval
            now = loop.time()
            if due < now:
                status.counters.add(OVERRUNS)
                due = now
            await asyncio.sleep(due - now)

    async def _read(self, client: Client, nodes: Sequence[_Node]) -> list[Reading]:
        parameters = ua.ReadParameters(
            MaxAge=0,
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            NodesToRead=[ua.ReadValueId(NodeId=node.node_id, AttributeId=AttributeIds.Value)
                         for node in nodes],
        )
        with self._session.failures("read"):
            values = await client.uaclient.read(parameters)
        if len(values) != len(nodes):
            raise ConnectorError(self.endpoint, f"the server answered {len(values)} values "
                                 f"for {len(nodes)} nodes", ErrorCategory.PROTOCOL)
        received_at = time.time()
        return [reading_of(self.id, node.address, value, received_at)
                for node, value in zip(nodes, values, strict=True)]

    # -- live read and write-back --------------------------------------------------------

    def _live_node(self, point_id: str, error: type[DeviceError]
                   ) -> tuple[Client, OpcuaPoint, _Node, ua.NodeId]:
        """The connected client and the point's resolved node, or ``error`` saying why not."""
        spec = self._points.get(point_id)
        if spec is None:
            raise error(point_id, f"source {self.id} has no such point", ErrorCategory.CONFIG)
        client = self._client
        if client is None:
            raise error(point_id, f"source {self.id} is not connected", ErrorCategory.TRANSIENT)
        node = self._nodes[spec.address]
        if node.node_id is None:
            reason = self._problems.get(spec.address, "unresolved")
            raise error(point_id, f"node {spec.address} is unavailable: {reason}",
                        ErrorCategory.CONFIG)
        return client, spec, node, node.node_id

    async def read(self, point_id: str) -> list[Reading]:
        """Read the point's node now, bypassing subscription and poll cycle."""
        client, _, node, _ = self._live_node(point_id, ReadError)
        try:
            return await self._read(client, [node])
        except ConnectorError as exc:
            raise ReadError(point_id, exc.reason, exc.category) from exc

    async def write(self, point_id: str, value: Value) -> None:
        """Write an engineering value to a point, converted to the node's data type (the
        runtime's write path has checked that the point is writable)."""
        client, spec, _, node_id = self._live_node(point_id, WriteError)
        await write_node(client, self.endpoint, node_id, point_id, spec, value)
