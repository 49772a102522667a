"""A small in-process OPC-UA server: a simulated plant for the demo and the tests.

Variables are named by dotted paths under ``Objects/Plant`` (``Boiler.Temperature`` is the
variable ``Temperature`` of the object ``Boiler``), and get the NodeId
``ns=<plant namespace>;s=Boiler.Temperature``::

    async with PlantServer() as plant:
        print(plant.url, plant.node_id("Boiler.Temperature"))
        await plant.set("Boiler.Temperature", 71.5)

Starting takes about a second (asyncua builds the standard address space). ``animate()``
moves the default variables so a live view has something to show.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from asyncua import ua
from asyncua.common.node import Node
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bridge.demo import asyncua_server_adapter


def _read_material(path: Path) -> tuple[bytes, Literal["pem", "der"]]:
    """A PEM or DER file's bytes and their encoding, as asyncua's server takes them."""
    content = path.read_bytes()
    return content, "pem" if b"-----BEGIN" in content[:4096] else "der"


def _certificate_der(path: Path) -> bytes:
    """The certificate in a PEM or DER file, as DER."""
    content, encoding = _read_material(path)
    if encoding == "pem":
        return x509.load_pem_x509_certificate(content).public_bytes(serialization.Encoding.DER)
    return x509.load_der_x509_certificate(content).public_bytes(serialization.Encoding.DER)


NAMESPACE_URI = "urn:fieldbridge:plant"
"""The namespace of the plant's nodes."""

DEFAULT_VARIABLES: Mapping[str, Any] = {
    "Boiler.Temperature": 62.5,
    "Boiler.Pressure": 1.8,
    "Boiler.Running": True,
    "Boiler.Mode": "auto",
    "Pump.Speed": 1450.0,
    "Pump.Starts": ua.Variant(12, ua.VariantType.Int32),
}
"""Initial values; a ``ua.Variant`` fixes the data type where Python's would not."""

_POLICY_TYPES: Mapping[tuple[str, str], ua.SecurityPolicyType] = {
    ("Basic256Sha256", "Sign"): ua.SecurityPolicyType.Basic256Sha256_Sign,
    ("Basic256Sha256", "SignAndEncrypt"): ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ("Aes128_Sha256_RsaOaep", "Sign"): ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"):
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    ("Aes256_Sha256_RsaPss", "Sign"): ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    ("Aes256_Sha256_RsaPss", "SignAndEncrypt"):
        ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
}

CertificateCheck = Callable[[Any, ua.ApplicationDescription], Awaitable[None]]
"""asyncua's certificate validator: raise ``ServiceError`` to refuse a client certificate."""


@dataclass(frozen=True)
class ServerSecurity:
    """Endpoints that require a signed (and encrypted) channel, and the server's certificate."""

    certificate: Path
    private_key: Path
    application_uri: str
    """Must be the URI in ``certificate``."""
    endpoints: Sequence[tuple[str, str]] = (("Basic256Sha256", "SignAndEncrypt"),)
    """(policy, mode) pairs offered, named as in the source configuration."""
    allow_insecure: bool = False
    """Also offer the unsecured endpoint."""
    certificate_check: CertificateCheck | None = None


class _Users(UserManager):
    """Username/password users and trusted user certificates (DER)."""

    def __init__(self, users: Mapping[str, str], certificates: Sequence[bytes]) -> None:
        self._users = dict(users)
        self._certificates = set(certificates)

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is None:
            # A certificate identity token (on a secure channel, username logins are also
            # handed the channel's certificate, so the username decides).
            if certificate is not None and certificate in self._certificates:
                return User(role=UserRole.User, name="certificate")
            return None
        expected = self._users.get(username)
        if expected is None or password is None:
            return None
        if not hmac.compare_digest(expected.encode(), password.encode()):
            return None
        return User(role=UserRole.User, name=username)


class PlantServer:
    """An asyncua server with the plant's variables; every variable is writable.

    ``port=0`` picks a free port (``port`` holds it once started); ``users`` maps user names
    to passwords and ``user_certificates`` lists trusted user certificates (either replaces
    anonymous access); ``security`` adds signed/encrypted endpoints; ``max_nodes_per_read``
    sets the limit the server announces (asyncua itself does not enforce it).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        variables: Mapping[str, Any] = DEFAULT_VARIABLES,
        users: Mapping[str, str] | None = None,
        user_certificates: Sequence[Path] = (),
        security: ServerSecurity | None = None,
        max_nodes_per_read: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        """The listening port; the one picked once started on port 0."""
        self.namespace = 0
        """The index of ``NAMESPACE_URI`` once started."""
        self._variables = dict(variables)
        self._users = users
        self._user_certificates = tuple(user_certificates)
        self._security = security
        self._max_nodes_per_read = max_nodes_per_read
        self._nodes: dict[str, Node] = {}
        self.server: Server | None = None
        """The asyncua server while running, for what this class does not wrap."""

    @property
    def url(self) -> str:
        """The endpoint URL clients connect to."""
        return f"opc.tcp://{self.host}:{self.port}/"

    def node_id(self, name: str) -> str:
        """The NodeId string of a variable, e.g. ``ns=2;s=Boiler.Temperature``."""
        return f"ns={self.namespace};s={name}"

    def browse_path(self, name: str) -> str:
        """The browse path of a variable from Objects, e.g. ``2:Plant/2:Boiler/2:Temperature``."""
        parts = ["Plant", *name.split(".")]
        return "/".join(f"{self.namespace}:{part}" for part in parts)

    async def __aenter__(self) -> PlantServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Build the address space and listen."""
        trusted = [_certificate_der(path) for path in self._user_certificates]
        tokens: list[type] = []
        if self._users is not None:
            tokens.append(ua.UserNameIdentityToken)
        if trusted:
            tokens.append(ua.X509IdentityToken)
        server = Server(user_manager=_Users(self._users or {}, trusted) if tokens else None)
        # The server clock ticks every second, and stopping waits for its tick.
        server.disable_clock()
        await server.init()
        server.set_endpoint(f"opc.tcp://{self.host}:{self.port}/")
        server.set_server_name("Fieldbridge plant simulator")
        security = self._security
        if security is not None:
            certificate, certificate_encoding = _read_material(security.certificate)
            key, key_encoding = _read_material(security.private_key)
            await server.load_certificate(certificate, certificate_encoding)
            await server.load_private_key(key, None, key_encoding)
            await server.set_application_uri(security.application_uri)
            policies = [_POLICY_TYPES[endpoint] for endpoint in security.endpoints]
            if security.allow_insecure:
                policies.insert(0, ua.SecurityPolicyType.NoSecurity)
            server.set_security_policy(policies)
            server.iserver.certificate_validator = security.certificate_check
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_identity_tokens(tokens or [ua.AnonymousIdentityToken])
        self.namespace = await server.register_namespace(NAMESPACE_URI)
        await self._build(server)
        if self._max_nodes_per_read is not None:
            limit = server.get_node(ua.NodeId(ua.Int32(
                ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)))
            await limit.write_value(ua.Variant(self._max_nodes_per_read, ua.VariantType.UInt32))
        await server.start()
        if server.bserver is not None and server.bserver.port is not None:
            self.port = server.bserver.port
        self.server = server

    async def _build(self, server: Server) -> None:
        plant = await server.nodes.objects.add_object(
            f"ns={self.namespace};s=Plant", f"{self.namespace}:Plant")
        parents: dict[str, Node] = {"": plant}
        for name, initial in self._variables.items():
            *folders, leaf = name.split(".")
            parent = plant
            for depth in range(1, len(folders) + 1):
                path = ".".join(folders[:depth])
                if path not in parents:
                    parents[path] = await parent.add_object(
                        f"ns={self.namespace};s={path}", f"{self.namespace}:{folders[depth - 1]}")
                parent = parents[path]
            value, variant_type = (initial.Value, initial.VariantType) if isinstance(
                initial, ua.Variant) else (initial, None)
            node = await parent.add_variable(
                self.node_id(name), f"{self.namespace}:{leaf}", value, variant_type)
            await node.set_writable()
            self._nodes[name] = node

    async def stop(self) -> None:
        """Stop listening and end every session, so nothing of the server keeps running."""
        server, self.server = self.server, None
        if server is None:
            return
        await server.stop()
        # Sessions with subscriptions outlive their connection (for a reconnecting client
        # to take them over) until they time out; a stopped simulator ends them now.
        await asyncua_server_adapter.end_sessions(server)

    def _node(self, name: str) -> Node:
        if self.server is None:
            raise RuntimeError("the plant server is not running")
        return self._nodes[name]

    async def set(
        self,
        name: str,
        value: Any,
        *,
        status: int = StatusCodes.Good,
        source_timestamp: datetime | None = None,
    ) -> None:
        """Change a variable as a device would: value, status code and source time."""
        node = self._node(name)
        variant_type = await node.read_data_type_as_variant_type()
        variant = ua.Variant(value, variant_type) if value is not None else ua.Variant()
        moment = source_timestamp or datetime.now(UTC)
        await node.write_value(ua.DataValue(
            variant, StatusCode=ua.StatusCode(ua.UInt32(status)),
            SourceTimestamp=ua.DateTime.fromtimestamp(moment.timestamp(), UTC),
            ServerTimestamp=ua.DateTime.now(UTC)))

    async def get(self, name: str) -> Any:
        """A variable's current value (as a client last wrote it, say)."""
        return await self._node(name).read_value()

    async def animate(self, period: float = 1.0) -> None:
        """Move the default variables forever (run it as a task; cancel it to stop)."""
        waves = {  # name: (mean, amplitude, cycles per minute, phase)
            "Boiler.Temperature": (62.5, 4.0, 1.0, 0.0),
            "Boiler.Pressure": (1.8, 0.15, 1.0, 1.0),
            "Pump.Speed": (1450.0, 30.0, 3.0, 0.0),
        }
        moving = {name: wave for name, wave in waves.items() if name in self._variables}
        started = time.monotonic()
        while True:
            minutes = (time.monotonic() - started) / 60.0
            for name, (mean, amplitude, cycles, shift) in moving.items():
                angle = 2 * math.pi * cycles * minutes + shift
                await self.set(name, round(mean + amplitude * math.sin(angle), 3))
            await asyncio.sleep(period)
