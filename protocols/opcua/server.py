"""The OPC-UA server: bridged points as variables, a folder per source and device.

asyncua's ``Server`` serves the address space. Each served point is a variable whose
DataType comes from the point's type, with its unit (EngineeringUnits) and description; its
value, SourceTimestamp and StatusCode follow the point's latest event (good → Good,
uncertain → Uncertain, bad → BadDeviceFailure, its source down → BadNoCommunication), pushed
to subscribed clients as events are stored. A client's write to a writable point goes
through the runtime's audited write path, whose outcome is the write's status.

Security: SecurityPolicy None only with ``allow_none``; the server's certificate is
generated at first start in ``<state_dir>/opcua-server/<id>/``, and a client certificate not
in its ``pki/trusted`` folder is refused and lands in ``pki/rejected``, where an operator
moves it to ``pki/trusted`` to trust it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from asyncua import ua
from asyncua.common.node import Node
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server as UaServer
from asyncua.server.user_managers import UserManager
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from bridge.config.models import ServerBase, ValueType
from bridge.core.counters import CERTIFICATES_REJECTED, VALUE_UPDATES, WRITES, WRITES_FAILED
from bridge.core.model import Event, Quality, Value
from bridge.core.server import Server, ServerView
from bridge.core.sink import PointInfo
from bridge.core.source import BuildContext
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ErrorCategory, NotWritableError, ServerError, WriteError
from protocols.opcua.server_config import OpcuaServerConfig

logger = logging.getLogger(__name__)

_POLICIES: dict[tuple[str, str], ua.SecurityPolicyType] = {
    ("Basic256Sha256", "Sign"): ua.SecurityPolicyType.Basic256Sha256_Sign,
    ("Basic256Sha256", "SignAndEncrypt"): ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ("Aes256_Sha256_RsaPss", "Sign"): ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    ("Aes256_Sha256_RsaPss", "SignAndEncrypt"):
        ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
}

def _numeric(identifier: int) -> ua.NodeId:
    return ua.NodeId(ua.Int32(identifier))


def _named(name: str, namespace: int) -> ua.NodeId:
    return ua.NodeId(ua.String(name), ua.Int16(namespace))


_DATA_TYPES: dict[ValueType | None, tuple[ua.NodeId, ua.VariantType | None]] = {
    "bool": (_numeric(ObjectIds.Boolean), ua.VariantType.Boolean),
    "integer": (_numeric(ObjectIds.Int64), ua.VariantType.Int64),
    "number": (_numeric(ObjectIds.Double), ua.VariantType.Double),
    "string": (_numeric(ObjectIds.String), ua.VariantType.String),
    None: (_numeric(ObjectIds.BaseDataType), None),
}


_ADMIN = User(role=UserRole.Admin)
"""The user asyncua's own writes run as (its attribute service's default)."""


class _Users(UserManager):
    """Users from the configuration, checked against their SHA-256; anonymous sessions only
    when allowed."""

    def __init__(self, config: OpcuaServerConfig) -> None:
        self.users = {user.name: user for user in config.users}
        self.anonymous = config.anonymous

    def get_user(self, iserver: Any, username: str | None = None,
                 password: str | None = None, certificate: Any = None) -> User | None:
        """The session's user, or ``None`` to refuse it."""
        if username is None:
            # asyncua lets its Anonymous role do nothing, reads included; an anonymous
            # session is a user without a name, which the write check never lets write.
            return User(role=UserRole.User) if self.anonymous else None
        user = self.users.get(username)
        if user is None or password is None:
            return None
        digest = hashlib.sha256(password.encode()).hexdigest()
        if not hmac.compare_digest(digest, user.sha256):
            return None
        return User(role=UserRole.User, name=username)


class OpcuaServer(Server):
    """The OPC-UA server of one ``servers:`` entry."""

    def __init__(self, config: OpcuaServerConfig, state_dir: Path) -> None:
        super().__init__(config)
        self.config = config
        self.directory = state_dir / "opcua-server" / config.id
        self.trusted = self.directory / "pki" / "trusted"
        self.rejected = self.directory / "pki" / "rejected"
        self.application_uri = f"urn:fieldbridge:server:{config.id}"
        self._server: UaServer | None = None
        self._variables: dict[str, Node] = {}
        self._nodes: dict[ua.NodeId, str] = {}
        self._writers = {user.name for user in config.users if user.role == "write"}
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: list[Any] = []
        self._bridge: ServerView | None = None
        self._status: EndpointStatus | None = None

    @property
    def port(self) -> int | None:
        """The port while it serves."""
        return self.config.port if self._server is not None else None

    async def start(self, bridge: ServerView, status: EndpointStatus) -> None:
        """Build the address space, bind and serve; ``ServerError`` when it cannot bind."""
        config = self.config
        self._bridge, self._status = bridge, status
        server = UaServer(user_manager=_Users(config))
        await server.init()
        host = f"[{config.host}]" if ":" in config.host else config.host
        server.set_endpoint(f"opc.tcp://{host}:{config.port}/{config.path}")
        server.set_server_name(f"Fieldbridge {config.id}")
        await server.set_application_uri(self.application_uri)
        policies = [_POLICIES[policy, mode] for policy in config.policies
                    for mode in config.modes]
        if config.allow_none:
            policies.insert(0, ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies)
        certificate, key = await asyncio.to_thread(self._certificate)
        await server.load_certificate(str(certificate))
        await server.load_private_key(str(key))
        server.set_certificate_validator(self._validate)
        namespace = await server.register_namespace(config.namespace)
        await self._address_space(server, namespace, bridge)
        attribute_service = server.iserver.attribute_service
        passthrough = attribute_service.write

        async def write(params: ua.WriteParameters,
                        user: User = _ADMIN) -> list[ua.StatusCode]:
            return await self._write(params, user, passthrough)

        attribute_service.write = write  # type: ignore[method-assign]
        try:
            await server.start()
        except OSError as exc:
            await _quietly_stop(server)
            raise ServerError(self.id, self.endpoint, exc.strerror or str(exc)) from exc
        self._server = server
        for point_id in self._variables:
            self._pending.add(point_id)
        self._unsubscribe = [bridge.subscribe(self._stored), bridge.watch(self._states)]
        self._task = asyncio.create_task(self._publish(), name=f"opcua[{self.id}].server")
        self._wake.set()
        logger.info("opcua server %s listening on %s", self.id, self.endpoint)

    async def stop(self) -> None:
        """Close every session and the listener."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    def details(self) -> dict[str, Any]:
        """Variables served and open sessions."""
        server = self._server
        sessions = len(server.iserver.subscription_service.subscriptions) if server else 0
        return {"variables": len(self._variables), "subscriptions": sessions}

    # --- the address space ---

    async def _address_space(self, server: UaServer, namespace: int,
                             bridge: ServerView) -> None:
        folders: dict[tuple[str, ...], Node] = {}

        async def folder(path: tuple[str, ...]) -> Node:
            node = folders.get(path)
            if node is None:
                parent = server.nodes.objects if len(path) == 1 else await folder(path[:-1])
                node = await parent.add_folder(
                    _named("/".join(path), namespace), ua.QualifiedName(path[-1], namespace))
                folders[path] = node
            return node

        for point_id, point in sorted(bridge.points().items()):
            if not self.config.serves(point_id):
                continue
            path = (point.source,) if point.device is None else (point.source, point.device)
            parent = await folder(path)
            data_type, _ = _DATA_TYPES[point.value_type]
            variable = await parent.add_variable(
                _named(point_id, namespace), ua.QualifiedName(point_id, namespace),
                ua.Variant(None, ua.VariantType.Null), datatype=data_type)
            await variable.write_attribute(AttributeIds.Description, ua.DataValue(
                ua.Variant(ua.LocalizedText(_description(point)), ua.VariantType.LocalizedText)))
            await server.write_attribute_value(variable.nodeid, ua.DataValue(
                ua.Variant(None, ua.VariantType.Null),
                StatusCode=ua.StatusCode(ua.UInt32(StatusCodes.BadWaitingForInitialData))))
            if point.writable:
                await variable.set_writable()
            if point.unit:
                await _engineering_units(server, variable, point.unit)
            self._variables[point_id] = variable
            self._nodes[variable.nodeid] = point_id

    # --- values ---

    def _stored(self, events: Sequence[Event]) -> None:
        for event in events:
            if event.point in self._variables:
                self._pending.add(event.point)
        if self._pending:
            self._wake.set()

    def _states(self) -> None:
        self._pending.update(self._variables)
        self._wake.set()

    async def _publish(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, set()
            for point_id in pending:
                try:
                    await self._update(point_id)
                except Exception:  # one variable's failure must not stop the others' updates
                    logger.exception("opcua server %s could not update %s", self.id, point_id)

    async def _update(self, point_id: str) -> None:
        server, bridge = self._server, self._bridge
        if server is None or bridge is None:
            return
        point = bridge.points().get(point_id)
        event = bridge.latest().get(point_id)
        if point is None or event is None:
            return
        code = _status_code(event, self._source_down(bridge, point))
        variant_type = _DATA_TYPES[point.value_type][1]
        value = event.value
        if value is None:
            variant = ua.Variant(None, ua.VariantType.Null)
        elif variant_type is None:
            variant = ua.Variant(value)
        else:
            variant = ua.Variant(_as(value, variant_type), variant_type)
        stamp = cast(ua.DateTime, datetime.fromtimestamp(event.ts, UTC))
        await server.write_attribute_value(self._variables[point_id].nodeid, ua.DataValue(
            variant, StatusCode=ua.StatusCode(ua.UInt32(code)), SourceTimestamp=stamp,
            ServerTimestamp=cast(ua.DateTime, datetime.now(UTC))))
        if self._status is not None:
            self._status.counters.add(VALUE_UPDATES)

    @staticmethod
    def _source_down(bridge: ServerView, point: PointInfo) -> bool:
        status = bridge.sources().get(point.source)
        if status is None or status.state is ConnectionState.DOWN:
            return True
        device = status.children.get(point.device) if point.device is not None else None
        return device is not None and device.state is ConnectionState.DOWN

    # --- writes ---

    async def _write(self, params: ua.WriteParameters, user: User,
                     passthrough: Any) -> list[ua.StatusCode]:
        results: list[ua.StatusCode] = []
        for write in params.NodesToWrite:
            point_id = self._nodes.get(write.NodeId)
            if point_id is None:
                single = ua.WriteParameters(NodesToWrite=[write])
                results.extend(await passthrough(single, user))
                continue
            results.append(ua.StatusCode(ua.UInt32(await self._write_point(point_id, write, user))))
        return results

    async def _write_point(self, point_id: str, write: ua.WriteValue, user: User) -> int:
        status = self._status
        if status is not None:
            status.counters.add(WRITES)
        bridge = self._bridge
        point = bridge.points().get(point_id) if bridge is not None else None
        if write.AttributeId != AttributeIds.Value or point is None or bridge is None:
            return StatusCodes.BadNotWritable
        if not point.writable:
            return StatusCodes.BadNotWritable
        if user.name not in self._writers:
            return StatusCodes.BadUserAccessDenied
        value = write.Value.Value.Value if write.Value and write.Value.Value else None
        if not isinstance(value, bool | int | float | str):
            return StatusCodes.BadTypeMismatch
        try:
            await bridge.write(point_id, value, f"opcua server {self.id} user {user.name}")
        except NotWritableError:
            return StatusCodes.BadNotWritable
        except WriteError as exc:
            if status is not None:
                status.counters.add(WRITES_FAILED)
            return (StatusCodes.BadOutOfRange if exc.category is ErrorCategory.CONFIG
                    else StatusCodes.BadDeviceFailure)
        except KeyError:
            return StatusCodes.BadNodeIdUnknown
        return StatusCodes.Good

    # --- certificates ---

    def _certificate(self) -> tuple[Path, Path]:
        """The server's certificate and key, generated at first start."""
        certificate_path = self.directory / "server.der"
        key_path = self.directory / "server.key.pem"
        self.trusted.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(parents=True, exist_ok=True)
        if certificate_path.is_file() and key_path.is_file():
            return certificate_path, key_path
        key = cert_gen.generate_private_key()
        hostname = socket.gethostname()
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(self.application_uri),
                                         x509.DNSName(hostname)]
        certificate = cert_gen.generate_self_signed_app_certificate(
            key, f"Fieldbridge {self.id}", {}, names,
            extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            days=3650)
        key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
        key_path.chmod(0o600)
        certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.DER))
        logger.warning("generated the OPC-UA server certificate %s", certificate_path)
        return certificate_path, key_path

    async def _validate(self, certificate: x509.Certificate, application: Any) -> None:
        """Trust a client certificate found in ``pki/trusted``; park any other in
        ``pki/rejected`` and refuse it."""
        der = certificate.public_bytes(serialization.Encoding.DER)
        name = f"{hashlib.sha1(der).hexdigest()}.der"  # OPC-UA thumbprints are SHA-1
        if (self.trusted / name).is_file():
            return
        (self.rejected / name).write_bytes(der)
        if self._status is not None:
            self._status.counters.add(CERTIFICATES_REJECTED)
        logger.warning("opcua server %s refused an untrusted client certificate, kept as %s",
                       self.id, self.rejected / name)
        raise ServiceError(StatusCodes.BadCertificateUntrusted)


def _description(point: PointInfo) -> str:
    where = point.source if point.device is None else f"{point.source}/{point.device}"
    unit = f" in {point.unit}" if point.unit else ""
    return f"{point.id} from {where}{unit}"


async def _engineering_units(server: UaServer, variable: Node, unit: str) -> None:
    units = ua.EUInformation(NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
                             UnitId=-1, DisplayName=ua.LocalizedText(unit),
                             Description=ua.LocalizedText(unit))
    await variable.add_property(_named(f"{variable.nodeid.Identifier!s}.EngineeringUnits",
                                       variable.nodeid.NamespaceIndex),
                                ua.QualifiedName("EngineeringUnits", 0),
                                ua.Variant(units, ua.VariantType.ExtensionObject),
                                datatype=_numeric(ObjectIds.EUInformation))


def _status_code(event: Event, source_down: bool) -> int:
    if source_down:
        return StatusCodes.BadNoCommunication
    if event.quality is Quality.BAD:
        return StatusCodes.BadDeviceFailure
    if event.quality is Quality.UNCERTAIN:
        return StatusCodes.Uncertain
    return StatusCodes.Good


def _as(value: Value, variant_type: ua.VariantType | None) -> Value:
    """``value`` as the variable's type holds it (a whole float in an Int64, say)."""
    if variant_type is ua.VariantType.Double and isinstance(value, int):
        return float(value)
    if variant_type is ua.VariantType.Int64 and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


async def _quietly_stop(server: UaServer) -> None:
    try:
        await server.stop()
    except Exception:  # the server never started: what is left to stop may be half made
        logger.debug("stopping a server that did not start", exc_info=True)


def build_server(config: ServerBase, context: BuildContext) -> Server:
    """The server of one configured OPC-UA ``servers:`` entry."""
    if not isinstance(config, OpcuaServerConfig):
        raise TypeError(f"server {config.id} is not an OPC-UA server")
    return OpcuaServer(config, context.state_dir)
