"""The OPC-UA source: one session to one server, subscribing to or polling its nodes.

The source connects, resolves every configured node (NodeIds as given, namespace URIs and
browse paths through the server), then serves until the connection fails, when it raises
``ConnectorError`` and lets the supervisor back off and call ``run`` again; every run creates
the subscription and all its monitored items afresh. asyncua's own reconnect stays off so
that one supervisor owns retrying.

A node that does not exist or cannot be read marks its points ``bad`` with the server's
reason (and the source ``degraded``); it never stops the other points.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

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
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography.hazmat.primitives import serialization

from bridge.config.models import PointBase, ResolvedPoint
from bridge.core.aio import primary_failure
from bridge.core.model import Quality, Reading, Value
from bridge.core.source import Source, SourceContext
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory, WriteError
from protocols.opcua.config import (
    PROTOCOL,
    OpcuaPoint,
    OpcuaSourceConfig,
    parse_browse_path,
    parse_node_id,
)
from protocols.opcua.security import (
    MODES,
    POLICIES,
    Material,
    application_uris,
    ensure_client_certificate,
    first_certificate,
    load_certificate,
    load_private_key,
    read_material,
    thumbprint,
)

logger = logging.getLogger(__name__)


class _LostConnectionNoise(logging.Filter):
    """Drops what asyncua logs about a connection that is gone, which the source reports once
    itself ("source ... down: connection lost"): a traceback from its publish loop and
    warnings from closing a session nobody can answer."""

    TEARDOWN = frozenset({
        "close_session but connection wasn't established",
        "close_session was called but connection is closed",
        "close_secure_channel was called but connection is closed",
    })

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if message in self.TEARDOWN:
            return False
        if message.startswith("Publish iteration crashed") and record.exc_info:
            return not isinstance(record.exc_info[1], ConnectionError)
        return True


def _quiet_asyncua() -> None:
    noise = _LostConnectionNoise()
    for name in ("asyncua.client.ua_session.UaSession", "asyncua.client.ua_client.UaClient"):
        logging.getLogger(name).addFilter(noise)


_quiet_asyncua()

ClientFactory = Callable[[OpcuaSourceConfig], Client]
"""Creates the asyncua client for one run; tests may pass their own."""

DEFAULT_PORT = 4840
SESSION_TIMEOUT = 60.0
"""Seconds the server keeps our session (and subscription) after we vanish without closing."""
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

_AUTH_STATUSES = frozenset({
    "BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected",
    "BadSecurityChecksFailed", "BadUserSignatureInvalid", "BadApplicationSignatureInvalid",
    "BadNoValidCertificates", "BadRequestNotAllowed",
})
_CONFIG_STATUSES = frozenset({
    "BadSecurityPolicyRejected", "BadSecurityModeRejected", "BadTcpEndpointUrlInvalid",
    "BadServerUriInvalid", "BadServiceUnsupported",
})
_TRANSIENT_STATUSES = frozenset({
    "BadTimeout", "BadRequestTimeout", "BadServerHalted", "BadShutdown",
    "BadCommunicationError", "BadConnectionClosed", "BadConnectionRejected",
    "BadSecureChannelClosed", "BadSecureChannelIdInvalid", "BadSessionClosed",
    "BadSessionIdInvalid", "BadSessionNotActivated", "BadNoCommunication",
    "BadServerNotConnected", "BadTooManySessions", "BadMaxConnectionsReached",
    "BadTcpServerTooBusy", "BadResourceUnavailable", "BadOutOfMemory", "BadNoSubscription",
    "BadSubscriptionIdInvalid", "BadTooManyPublishRequests",
})
UNAVAILABLE_STATUSES = frozenset({
    "BadNodeIdUnknown", "BadNodeIdInvalid", "BadNotReadable", "BadUserAccessDenied",
    "BadAttributeIdInvalid", "BadNotSupported", "BadFilterNotAllowed",
    "BadMonitoredItemFilterUnsupported", "BadMonitoredItemFilterInvalid",
    "BadDeadbandFilterInvalid", "BadIndexRangeNoData", "BadNoMatch", "BadBrowseNameInvalid",
    "BadNotFound",
})
"""Statuses that say a node cannot be served as configured (rather than a bad value)."""


def status_category(name: str) -> ErrorCategory:
    """The error category of a status code's symbolic name."""
    if name in _AUTH_STATUSES or name.startswith("BadCertificate"):
        return ErrorCategory.AUTH
    if name in _CONFIG_STATUSES:
        return ErrorCategory.CONFIG
    if name in _TRANSIENT_STATUSES:
        return ErrorCategory.TRANSIENT
    return ErrorCategory.PROTOCOL


def describe(exc: BaseException) -> tuple[str, ErrorCategory]:
    """What went wrong, for the inventory, and its category."""
    if isinstance(exc, UaStatusCodeError):
        status = ua.StatusCode(exc.code)
        return f"{status.name} ({status.doc.strip().rstrip('.')})", status_category(status.name)
    if isinstance(exc, TimeoutError):
        return "no answer in time", ErrorCategory.TRANSIENT
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}", ErrorCategory.TRANSIENT
    if isinstance(exc, OSError):
        # asyncio words a refused connection "Connect call failed (address)": the errno says it.
        text = os.strerror(exc.errno) if exc.errno else str(exc)
        return text or type(exc).__name__, ErrorCategory.TRANSIENT
    text = str(exc)
    if text.startswith("No matching endpoints"):
        return ("the server offers no endpoint with this security policy and mode",
                ErrorCategory.CONFIG)
    if "certificate mismatch" in text:
        return "the server presented another certificate than at discovery", ErrorCategory.AUTH
    return text or type(exc).__name__, ErrorCategory.PROTOCOL


def quality_of(status: ua.StatusCode | None) -> tuple[Quality, str | None]:
    """Good → good, Uncertain → uncertain, Bad → bad; the status name is the reason."""
    if status is None or status.value == 0:
        return Quality.GOOD, None
    if status.is_bad():
        return Quality.BAD, status.name
    if status.is_uncertain():
        return Quality.UNCERTAIN, status.name
    return Quality.GOOD, None


def timestamp_of(moment: datetime | None) -> float | None:
    """POSIX seconds of an OPC-UA DateTime; the null DateTime (year 1601) means none."""
    if moment is None or moment.year <= 1601:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def connect_url(url: str) -> str:
    """The URL with the default port made explicit, which asyncua needs."""
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    has_port = "]:" in host if host.startswith("[") else ":" in host
    if has_port:
        return url
    return f"{scheme}://{host}:{DEFAULT_PORT}{slash}{path}"


def default_client(config: OpcuaSourceConfig) -> Client:
    """An asyncua client for ``config``; its own reconnecting stays off."""
    return Client(connect_url(config.url), timeout=config.timeout,
                  watchdog_intervall=config.keepalive, auto_reconnect=False)


def _numeric(identifier: int) -> ua.NodeId:
    """A namespace-0 numeric NodeId (the standard nodes)."""
    return ua.NodeId(ua.Int32(identifier))


_Item = TypeVar("_Item")


def chunked(items: Sequence[_Item], size: int) -> list[Sequence[_Item]]:
    """``items`` in consecutive slices of at most ``size``."""
    return [items[start:start + size] for start in range(0, len(items), size)]


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


@dataclass
class _Health:
    """Nodes that cannot be served as configured; the source is degraded while there are any."""

    problems: dict[str, str] = field(default_factory=dict)

    def note(self, reading: Reading) -> None:
        """Track a node's availability from what a reading says about it."""
        if reading.quality is Quality.BAD and reading.reason in UNAVAILABLE_STATUSES:
            self.problems[str(reading.address)] = reading.reason
        else:
            self.problems.pop(str(reading.address), None)

    def report(self, status: EndpointStatus, total: int) -> None:
        """Move the status to degraded or up as the problems say, recording changes only."""
        if not self.problems:
            status.details.pop("unavailable", None)
            status.success()
            return
        listed = [f"{address} ({reason})" for address, reason in self.problems.items()]
        shown = ", ".join(listed[:3]) + (", ..." if len(listed) > 3 else "")
        summary = f"{len(listed)} of {total} nodes unavailable: {shown}"
        if status.state is not ConnectionState.DEGRADED or status.last_error != summary:
            status.details["unavailable"] = listed
            status.degraded(summary, ErrorCategory.CONFIG)
        status.last_success = time.time()


class _Pending:
    """Readings collected without awaiting and handed over in batches to one publishing task."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._readings: list[Reading] = []
        self._ready = asyncio.Event()
        self._room = asyncio.Event()

    async def put(self, reading: Reading) -> None:
        """Add a reading; waits only when ``limit`` readings are already waiting."""
        while len(self._readings) >= self._limit:
            self._room.clear()
            await self._room.wait()
        self._readings.append(reading)
        self._ready.set()

    async def take(self) -> list[Reading]:
        """Everything collected since the last call, once there is something."""
        await self._ready.wait()
        self._ready.clear()
        readings, self._readings = self._readings, []
        self._room.set()
        return readings


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
        self.certificate_dir = state_dir / "opcua" / config.id
        """Where the generated client certificate is kept."""
        self._client_factory = client_factory
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
        """Connect, resolve the nodes, then subscribe or poll until the connection fails."""
        client = self._client_factory(self.config)
        client.connection_lost_callback = self._lost
        self._loss = None
        connected = False
        try:
            await self._connect(client, context.status)
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
            await self._close(client, connected)

    @contextlib.asynccontextmanager
    async def session(self, status: EndpointStatus) -> AsyncIterator[Client]:
        """A connected client for one-off work such as discovery: the source's security,
        identity and certificate handling; the session is closed on the way out."""
        client = self._client_factory(self.config)
        connected = False
        try:
            await self._connect(client, status)
            connected = True
            yield client
        finally:
            await self._close(client, connected)

    def _failures(self, doing: str) -> contextlib.AbstractContextManager[None]:
        return _translated(self.endpoint, doing)

    async def _connect(self, client: Client, status: EndpointStatus) -> None:
        config = self.config
        client.name = "Fieldbridge"
        client.description = f"Fieldbridge {self.bridge_id}/{self.id}"
        client.product_uri = "urn:fieldbridge"
        client.application_uri = self.application_uri
        client.session_timeout = int(SESSION_TIMEOUT * 1000)
        if config.security.policy != "None":
            await self._secure(client, status)
        auth = config.auth
        if auth.username is not None and auth.password is not None:
            client.set_user(auth.username)
            client.set_password(auth.password.get_secret_value())
        elif auth.certificate is not None and auth.private_key is not None:
            password = auth.private_key_password
            certificate = self._material(auth.certificate, "auth.certificate")
            key = self._material(auth.private_key, "auth.private_key")
            try:
                client.user_certificate = load_certificate(certificate)
                client.user_private_key = load_private_key(
                    key, password.get_secret_value() if password else None)
            except (ValueError, TypeError) as exc:
                raise ConnectorError(self.endpoint, f"auth: cannot load the user certificate "
                                     f"or key: {exc}", ErrorCategory.CONFIG) from exc
        with self._failures("connect"):
            await client.connect()

    async def _secure(self, client: Client, status: EndpointStatus) -> None:
        security = self.config.security
        password = security.private_key_password
        if security.client_certificate is not None and security.private_key is not None:
            certificate = self._material(security.client_certificate,
                                         "security.client_certificate")
            key = self._material(security.private_key, "security.private_key")
            try:
                loaded = load_certificate(certificate)
            except ValueError as exc:
                raise ConnectorError(self.endpoint, f"security.client_certificate: {exc}",
                                     ErrorCategory.CONFIG) from exc
            if security.application_uri is None:
                uris = application_uris(loaded)
                client.application_uri = uris[0] if uris else self.application_uri
            status.details["certificate"] = {"path": str(security.client_certificate),
                                             "thumbprint": thumbprint(loaded)}
        else:
            try:
                generated = ensure_client_certificate(
                    self.certificate_dir, self.application_uri, hostname=socket.gethostname())
            except (OSError, ValueError) as exc:
                raise ConnectorError(self.endpoint, f"cannot keep a client certificate in "
                                     f"{self.certificate_dir}: {exc}",
                                     ErrorCategory.CONFIG) from exc
            certificate = self._material(generated.certificate, "client certificate")
            key = self._material(generated.private_key, "client key")
            status.details["certificate"] = {"path": str(generated.certificate),
                                             "thumbprint": generated.thumbprint}
        server = await self._server_certificate(client)
        with self._failures("security setup"):
            await client.set_security(
                POLICIES[security.policy],
                certificate.properties(),
                key.properties(password.get_secret_value() if password else None),
                server_certificate=Material(server, "der").properties(),
                mode=MODES[security.mode],
            )

    async def _server_certificate(self, client: Client) -> bytes:
        """The certificate of the endpoint with our policy and mode, checked against the pin.

        Asked over an unsecured discovery channel, as every client must; a wrong pin found
        here is a clear refusal, where encrypting for the wrong key would only time out.
        """
        security = self.config.security
        with self._failures("get endpoints"):
            endpoints = await client.connect_and_get_server_endpoints()
            endpoint = Client.find_endpoint(endpoints, MODES[security.mode],
                                            POLICIES[security.policy].URI)
        try:
            offered = first_certificate(endpoint.ServerCertificate or b"")
        except ValueError as exc:
            raise ConnectorError(self.endpoint, f"the server's certificate is unreadable: {exc}",
                                 ErrorCategory.PROTOCOL) from exc
        if security.server_certificate is not None:
            pinned = self._material(security.server_certificate, "security.server_certificate")
            try:
                expected = thumbprint(load_certificate(pinned))
            except ValueError as exc:
                raise ConnectorError(self.endpoint, f"security.server_certificate: {exc}",
                                     ErrorCategory.CONFIG) from exc
            if thumbprint(offered) != expected:
                raise ConnectorError(
                    self.endpoint, f"the server's certificate (SHA-1 {thumbprint(offered)}) is "
                    f"not security.server_certificate (SHA-1 {expected})", ErrorCategory.AUTH)
        return offered.public_bytes(serialization.Encoding.DER)

    def _material(self, path: Path, what: str) -> Material:
        try:
            return read_material(path)
        except OSError as exc:
            raise ConnectorError(self.endpoint, f"cannot read {what} {path}: "
                                 f"{exc.strerror or exc}", ErrorCategory.CONFIG) from exc

    async def _limits(self, client: Client) -> _Limits:
        """The server's operation limits (0 or absent: none) and namespace table."""
        limit_ids = (
            ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
            ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerTranslateBrowsePathsToNodeIds,
        )
        node_ids = [_numeric(identifier) for identifier in (*limit_ids,
                                                             ObjectIds.Server_NamespaceArray)]
        with self._failures("read server limits"):
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
            with self._failures("resolve browse paths"):
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

    def _reading(self, address: str, data: ua.DataValue | None, received_at: float) -> Reading:
        """A reading from a node's DataValue: value, source time, quality from its status."""
        if data is None:
            return Reading(source=self.id, address=address, value=None,
                           received_at=received_at, quality=Quality.BAD, reason="no value")
        quality, reason = quality_of(data.StatusCode)
        value = data.Value.Value if data.Value is not None else None
        ts = timestamp_of(data.SourceTimestamp) or timestamp_of(data.ServerTimestamp)
        return Reading(source=self.id, address=address,
                       value=None if quality is Quality.BAD else value,
                       received_at=received_at, ts=ts, quality=quality, reason=reason)

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
        with self._failures("create subscription"):
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
            with self._failures("create monitored items"):
                results = await subscription.create_monitored_items(batch)
            for request, result in zip(batch, results, strict=True):
                if isinstance(result, ua.StatusCode):
                    node = handles[request.RequestedParameters.ClientHandle]
                    self._problems[node.address] = result.name
                else:
                    created += 1
        context.status.details["monitored_items"] = created
        health = _Health(dict(self._problems))
        await context.publish(self._unresolved(time.time()))
        health.report(context.status, len(self._nodes))
        pending = _Pending(max(PENDING_READINGS, QUEUE_PER_NODE * len(self._nodes)))
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
        pending: _Pending,
    ) -> None:
        """Turn notifications into readings as they come, without publishing each one."""
        async for event in subscription:
            if isinstance(event, DataChangeEvent):
                item = event.data.monitored_item
                address = addresses.get(item.ClientHandle)
                if address is not None:
                    await pending.put(self._reading(address, item.Value, time.time()))
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

    async def _hand_on(self, pending: _Pending, health: _Health, context: SourceContext) -> None:
        while True:
            readings = await pending.take()
            await context.publish(readings)
            for reading in readings:
                health.note(reading)
            health.report(context.status, len(self._nodes))

    async def _poll(self, client: Client, limits: _Limits, context: SourceContext) -> None:
        """Read every node each cycle, in batches the server accepts, and publish per cycle."""
        status = context.status
        health = _Health(dict(self._problems))
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
                status.counters["overruns"] += 1
                due = now
            await asyncio.sleep(due - now)

    async def _read(self, client: Client, nodes: Sequence[_Node]) -> list[Reading]:
        parameters = ua.ReadParameters(
            MaxAge=0,
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            NodesToRead=[ua.ReadValueId(NodeId=node.node_id, AttributeId=AttributeIds.Value)
                         for node in nodes],
        )
        with self._failures("read"):
            values = await client.uaclient.read(parameters)
        if len(values) != len(nodes):
            raise ConnectorError(self.endpoint, f"the server answered {len(values)} values "
                                 f"for {len(nodes)} nodes", ErrorCategory.PROTOCOL)
        received_at = time.time()
        return [self._reading(node.address, value, received_at)
                for node, value in zip(nodes, values, strict=True)]

    async def _close(self, client: Client, connected: bool) -> None:
        """Close the session (deleting its subscription) and wait for asyncua's tasks."""
        if not connected and client.state is UaClientState.DISCONNECTED:
            return
        uaclient = client.uaclient
        # disconnect() cancels the publish loop but does not wait for it to finish.
        publish = uaclient._publish_task
        if client.state is UaClientState.DISCONNECTED:
            # Lost: nobody answers a CloseSession, so only our side is torn down. asyncua
            # may have given up on a socket that is still open (a failed keep-alive).
            if uaclient.protocol is not None:
                if not uaclient.protocol.is_closed:
                    uaclient.protocol.disconnect_socket()
                uaclient.protocol = None
            if publish is not None:
                publish.cancel()
        try:
            async with asyncio.timeout(self.config.timeout):
                await client.disconnect()
        except (TimeoutError, OSError, UaError) as exc:
            logger.debug("closing the session of %s: %s", self.id, exc)
            client.disconnect_socket()
        if publish is not None and not publish.done():
            await asyncio.wait([publish], timeout=self.config.timeout)

    # -- live read and write-back --------------------------------------------------------

    def _live_node(self, point_id: str) -> tuple[Client, OpcuaPoint, _Node, ua.NodeId]:
        spec = self._points.get(point_id)
        if spec is None:
            raise WriteError(point_id, f"source {self.id} has no such point", ErrorCategory.CONFIG)
        client = self._client
        if client is None:
            raise WriteError(point_id, f"source {self.id} is not connected",
                             ErrorCategory.TRANSIENT)
        node = self._nodes[spec.address]
        if node.node_id is None:
            reason = self._problems.get(spec.address, "unresolved")
            raise WriteError(point_id, f"node {spec.address} is unavailable: {reason}",
                             ErrorCategory.CONFIG)
        return client, spec, node, node.node_id

    async def read(self, point_id: str) -> list[Reading]:
        """Read the point's node now, bypassing subscription and poll cycle."""
        client, _, node, _ = self._live_node(point_id)
        try:
            return await self._read(client, [node])
        except ConnectorError as exc:
            raise WriteError(point_id, exc.reason, exc.category) from exc

    async def write(self, point_id: str, value: Value) -> None:
        """Write an engineering value to a writable point, converted to the node's data type."""
        declared = self._points.get(point_id)
        if declared is not None and not declared.writable:
            raise WriteError(point_id, "the point is not writable (set writable: true)",
                             ErrorCategory.CONFIG)
        client, spec, _, node_id = self._live_node(point_id)
        raw = raw_for_write(point_id, spec, value)
        try:
            with self._failures("write"):
                variant_type = await client.get_node(node_id).read_data_type_as_variant_type()
                variant = ua.Variant(coerce(point_id, raw, variant_type), variant_type)
                results = await client.uaclient.write_attributes(
                    [node_id], [ua.DataValue(variant)], AttributeIds.Value)
        except ConnectorError as exc:
            raise WriteError(point_id, exc.reason, exc.category) from exc
        status = results[0]
        if not status.is_good():
            category = (ErrorCategory.AUTH if status.name == "BadUserAccessDenied"
                        else ErrorCategory.DEVICE)
            raise WriteError(point_id, f"the server refused the write: {status.name}", category)


@contextlib.contextmanager
def _translated(endpoint: str, doing: str) -> Iterator[None]:
    """Turn asyncua's and the network's exceptions into ``ConnectorError``."""
    try:
        yield
    except (UaError, OSError, TimeoutError) as exc:
        reason, category = describe(exc)
        raise ConnectorError(endpoint, f"{doing}: {reason}", category) from exc


_INTEGER_RANGES: dict[ua.VariantType, tuple[int, int]] = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}


def raw_for_write(point_id: str, spec: PointBase, value: Value) -> Value:
    """The raw value for an engineering value: enum label to key, or scale/offset undone."""
    if spec.enum is not None:
        for key, label in spec.enum.items():
            if label == value:
                if isinstance(key, str) and key.lstrip("-").isdigit():
                    return int(key)
                return key
        raise WriteError(point_id, f"{value!r} is not one of the point's enum labels "
                         f"({', '.join(spec.enum.values())})", ErrorCategory.CONFIG)
    if spec.scale == 1.0 and spec.offset == 0.0:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WriteError(point_id, f"the point is scaled: write a number, not {value!r}",
                         ErrorCategory.CONFIG)
    return (value - spec.offset) / spec.scale


def coerce(point_id: str, value: Value, variant_type: ua.VariantType) -> Any:
    """``value`` as the node's data type needs it, or ``WriteError`` saying why not."""
    if variant_type is ua.VariantType.Boolean:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
    elif variant_type in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[variant_type]
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and math.isfinite(value) and abs(
                value - round(value)) < 1e-9:
            number = round(value)
        if number is not None:
            if not low <= number <= high:
                raise WriteError(point_id, f"{value} is outside the range of "
                                 f"{variant_type.name} ({low}..{high})", ErrorCategory.CONFIG)
            return number
    elif variant_type in (ua.VariantType.Float, ua.VariantType.Double):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif variant_type is ua.VariantType.String:
        if isinstance(value, str):
            return value
    else:
        raise WriteError(point_id, f"writing {variant_type.name} nodes is not supported",
                         ErrorCategory.CONFIG)
    raise WriteError(point_id, f"{value!r} cannot be written to a {variant_type.name} node",
                     ErrorCategory.CONFIG)
