"""Real OPC-UA peers for tests, in the test's event loop, on free loopback ports.

- ``PlantServer`` (from ``bridge.demo.opcua_plant``) is the server; ``VARIABLES`` is the
  address space the tests use;
- ``make_certificate``: a self-signed application certificate and key, as files;
- ``ServerRecorder``: what a server was asked (Read batches, monitored item requests);
- ``CertificateGate``: a server's client certificate check that records and can refuse;
- ``SourceRunner``: runs an ``OpcuaSource`` (alone, or under the supervisor) with a collecting
  publish callback and lets a test wait for a condition on the mapped events;
- ``settle_tasks``: fail when a test leaves tasks running.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

import helpers
from bridge.core.source import BuildContext
from bridge.demo.opcua_plant import PlantServer
from protocols.opcua import OpcuaSource, OpcuaSourceConfig, build
from protocols.opcua.config import source_points
from protocols.opcua.security import thumbprint

WAIT = helpers.WAIT
"""Generous bound for anything a test waits for; normally reached in milliseconds."""

VARIABLES: Mapping[str, Any] = {
    "Boiler.Temperature": 62.5,
    "Boiler.Pressure": 1.8,
    "Boiler.Running": True,
    "Boiler.Mode": "auto",
    "Boiler.Setpoint": 600.0,
    "Pump.Speed": 1450.0,
    "Pump.Starts": ua.Variant(12, ua.VariantType.Int32),
    "Pump.State": ua.Variant(1, ua.VariantType.Int32),
    "Sensor.Flaky": 5.0,
    "Sensor.Locked": 0.0,
    "Sensor.Curve": [1.0, 2.0, 3.0],
}


def make_certificate(
    directory: Path, name: str, application_uri: str, *, server: bool = False,
    pem: bool = False,
) -> tuple[Path, Path]:
    """A self-signed application certificate and its key, written as ``name``.der/.pem
    (or both PEM, with non-PEM file names, when ``pem``); returns (certificate, key)."""
    key = cert_gen.generate_private_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(application_uri), x509.DNSName("localhost"),
        x509.DNSName(socket.gethostname())]
    certificate = cert_gen.generate_self_signed_app_certificate(
        key, application_uri, {}, names, extended=[usage], days=30)
    directory.mkdir(parents=True, exist_ok=True)
    if pem:
        certificate_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    else:
        certificate_path, key_path = directory / f"{name}.der", directory / f"{name}-key.pem"
        certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return certificate_path, key_path


@dataclass
class CertificateGate:
    """A server's client certificate check: records every certificate, refuses some."""

    seen: list[str] = field(default_factory=list)
    """SHA-1 thumbprints of the client certificates shown, in order."""
    applications: list[str] = field(default_factory=list)
    """The ApplicationUri each client gave with its certificate."""
    refused: set[str] = field(default_factory=set)
    """Thumbprints refused with BadCertificateUntrusted."""

    async def check(self, certificate: x509.Certificate, application: Any) -> None:
        """asyncua's certificate validator hook (called on CreateSession)."""
        presented = thumbprint(certificate)
        self.seen.append(presented)
        self.applications.append(application.ApplicationUri)
        if presented in self.refused:
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)


@dataclass
class ServerRecorder:
    """Watches one server: the Read batches and monitored item requests it was sent."""

    plant: PlantServer
    reads: list[list[str]] = field(default_factory=list)
    """NodeIds of each external Read of plant nodes, in order."""
    monitored: list[ua.MonitoredItemCreateRequest] = field(default_factory=list)

    def attach(self) -> None:
        """Start recording (callbacks stay registered for the server's life)."""
        server = self.plant.server
        assert server is not None
        server.subscribe_server_callback(CallbackType.PreRead, self._on_read)
        server.subscribe_server_callback(CallbackType.ItemSubscriptionCreated, self._on_monitor)

    def clear(self) -> None:
        """Forget what was recorded so far."""
        self.reads.clear()
        self.monitored.clear()

    def _on_read(self, event: ServerItemCallback, dispatcher: object) -> None:
        if not event.is_external:
            return
        nodes = [item.NodeId for item in event.request_params.NodesToRead]
        if all(node.NamespaceIndex == self.plant.namespace for node in nodes):
            self.reads.append([node.to_string() for node in nodes])

    def _on_monitor(self, event: ServerItemCallback, dispatcher: object) -> None:
        if event.is_external:
            self.monitored.extend(event.request_params.ItemsToCreate)


def source_config(url: str, points: Sequence[dict[str, Any]], **settings: Any
                  ) -> OpcuaSourceConfig:
    """A validated source ``plc`` for the server at ``url`` with these points and settings."""
    raw: dict[str, Any] = {"id": "plc", "protocol": "opcua", "url": url,
                           "publishing_interval": 0.05, **settings, "points": list(points)}
    return OpcuaSourceConfig.model_validate(raw)


class SourceRunner(helpers.SourceRunner):
    """Runs one OPC-UA source in a task (``supervised``: under ``supervise``)."""

    @classmethod
    def of(cls, config: OpcuaSourceConfig, state_dir: Path, *, supervised: bool = False
           ) -> SourceRunner:
        """A runner for ``config``, built as the runtime builds it."""
        points = source_points(config, ("sources", 0))
        unit = build(config, points, BuildContext(bridge_id="test", state_dir=state_dir))
        return cls(unit, supervised=supervised)

    @property
    def source(self) -> OpcuaSource:
        """The OPC-UA source under test."""
        source = self.unit.source
        assert isinstance(source, OpcuaSource)
        return source


async def settle_tasks(before: set[asyncio.Task[Any]]) -> None:
    """Fail unless every task started since ``before`` ends (servers finish closing
    connections a few loop turns after the client went)."""
    current = asyncio.current_task()
    started = [task for task in asyncio.all_tasks() if task not in before and task is not current]
    if started:
        await asyncio.wait(started, timeout=WAIT)
    left = [task.get_name() + ": " + repr(task.get_coro()) for task in started if not task.done()]
    assert not left, f"tasks left running: {left}"


class FreezingProxy:
    """A TCP proxy to a server that can stop forwarding while keeping both connections open:
    a pulled cable or a hung server, which only a keep-alive can notice."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.frozen = False
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        """The proxy's endpoint URL."""
        return f"opc.tcp://127.0.0.1:{self.port}/"

    async def __aenter__(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for writer in self._writers),
                             return_exceptions=True)
        await self._server.wait_closed()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                         ) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port)
        self._writers += [writer, upstream_writer]
        for source, target in ((reader, upstream_writer), (upstream_reader, writer)):
            pipe = asyncio.create_task(self._pipe(source, target), name="proxy-pipe")
            self._pipes.add(pipe)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self.frozen:
                writer.write(data)
                await writer.drain()
        writer.close()
