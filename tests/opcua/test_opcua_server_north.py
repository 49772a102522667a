"""The OPC-UA server serving bridged points, browsed, read, subscribed and written by a real
asyncua client; the points come from a Modbus source polling a pymodbus device."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import cert_gen
from asyncua.ua.uaerrors import UaError
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers import WAIT, free_port
from helpers.brokers import wait_on
from helpers.modbus_servers import ModbusTestServer, device

from bridge.core.model import Quality
from bridge.core.status import ConnectionState
from bridge.errors import ServerError
from bridge.registry import load_config
from bridge.runtime import Runtime

UNIT = 1
PASSWORD = "correct horse"
USERS = [{"name": "operator", "sha256": hashlib.sha256(PASSWORD.encode()).hexdigest(),
          "role": "write"},
         {"name": "viewer", "sha256": hashlib.sha256(PASSWORD.encode()).hexdigest()}]
SOURCE_POINTS = [
    {"name": "temp", "address": 40001, "scale": 0.1, "unit": "degC",
     "description": "Boiler supply"},
    {"name": "setpoint", "address": 40002, "writable": True},
    {"name": "run", "table": "coil", "address": 0},
]


def write_config(tmp_path: Path, source_port: int, server_port: int, **server: Any) -> Path:
    """One Modbus source and one OPC-UA server."""
    document = {
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "api": {"enabled": False},
        "sources": [{"id": "plc", "protocol": "modbus", "host": "127.0.0.1",
                     "port": source_port, "timeout": "200ms", "retries": 0,
                     "devices": [{"id": "boiler", "unit": UNIT, "interval": "50ms",
                                  "points": SOURCE_POINTS}]}],
        "servers": [{"id": "north", "protocol": "opcua", "port": server_port,
                     "allow_none": True, "anonymous": True, "users": USERS, **server}],
    }
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class North:
    """A running runtime serving OPC-UA, its device, and the server's URL."""

    runtime: Runtime
    device: ModbusTestServer
    url: str
    changed: asyncio.Event
    tmp_path: Path

    async def until(self, condition: Any, what: str) -> None:
        """Wait until ``condition()`` holds, checked after stored events and state changes."""
        await wait_on(self.changed, condition, WAIT, lambda: what)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **server: Any) -> AsyncIterator[North]:
    """The device, and the runtime serving its points over OPC-UA."""
    async with ModbusTestServer([device(UNIT, holding=[215, 40], coils=[True])]) as plc:
        port = free_port()
        runtime = Runtime(load_config(write_config(tmp_path, plc.port, port, **server)))
        changed = asyncio.Event()
        runtime.router.add_listener(lambda events: changed.set())
        runtime.watch_states(changed.set)
        task = asyncio.create_task(runtime.run(), name="test.runtime")
        try:
            await asyncio.wait_for(runtime.ready.wait(), WAIT)
            north = North(runtime, plc, f"opc.tcp://127.0.0.1:{port}/fieldbridge", changed,
                          tmp_path)
            await north.until(lambda: all(
                (event := runtime.router.latest.get(f"boiler.{point['name']}")) is not None
                and event.quality is Quality.GOOD for point in SOURCE_POINTS), "good points")
            yield north
        finally:
            runtime.stop()
            await task


@contextlib.asynccontextmanager
async def connected(url: str, *, user: str | None = None) -> AsyncIterator[Client]:
    """An asyncua client session, anonymous or as ``user``."""
    client = Client(url, timeout=5)
    if user is not None:
        client.set_user(user)
        client.set_password(PASSWORD)
    await client.connect()
    try:
        yield client
    finally:
        await client.disconnect()


async def variable_value(client: Client, point_id: str) -> ua.DataValue:
    """The point's variable's DataValue."""
    index = await client.get_namespace_index("urn:fieldbridge:points")
    node = client.get_node(ua.NodeId(ua.String(point_id), ua.Int16(index)))
    return await node.read_attribute(ua.AttributeIds.Value, None, False)


async def test_address_space_types_units_and_values(tmp_path: Path) -> None:
    async with running(tmp_path) as north, connected(north.url) as client:
        index = await client.get_namespace_index("urn:fieldbridge:points")
        plc = await client.nodes.objects.get_child([f"{index}:plc"])
        boiler = await plc.get_child([f"{index}:boiler"])
        names = {(await child.read_browse_name()).Name for child in await boiler.get_children()}
        assert names == {"boiler.temp", "boiler.setpoint", "boiler.run"}
        temp = await boiler.get_child([f"{index}:boiler.temp"])
        assert await temp.read_data_type() == ua.NodeId(ua.ObjectIds.Double)
        run = await boiler.get_child([f"{index}:boiler.run"])
        assert await run.read_data_type() == ua.NodeId(ua.ObjectIds.Boolean)
        description = await temp.read_description()
        assert description.Text == "boiler.temp from plc/boiler in degC"
        units = await temp.get_child(["0:EngineeringUnits"])
        assert (await units.read_value()).DisplayName.Text == "degC"
        value = await temp.read_data_value()
        assert value.Value.Value == pytest.approx(21.5)
        assert value.StatusCode.is_good()
        event = north.runtime.router.latest["boiler.temp"]
        assert value.SourceTimestamp.timestamp() == pytest.approx(event.ts, abs=0.001)
        assert (await run.read_value()) is True


async def test_a_source_going_down_turns_values_bad(tmp_path: Path) -> None:
    async with running(tmp_path) as north, connected(north.url) as client:
        codes: asyncio.Queue[int] = asyncio.Queue()

        class Handler:
            def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
                codes.put_nowait(data.monitored_item.Value.StatusCode.value)

        subscription = await client.create_subscription(20, Handler())
        index = await client.get_namespace_index("urn:fieldbridge:points")
        node = client.get_node(ua.NodeId(ua.String("boiler.temp"), ua.Int16(index)))
        await subscription.subscribe_data_change(node)
        assert await asyncio.wait_for(codes.get(), WAIT) == ua.StatusCodes.Good
        await north.device.stop()
        async with asyncio.timeout(WAIT):
            while await codes.get() != ua.StatusCodes.BadNoCommunication:
                pass
        assert north.runtime.sources["plc"].status.state is ConnectionState.DOWN
        value = await variable_value(client, "boiler.temp")
        assert value.StatusCode.value == ua.StatusCodes.BadNoCommunication
        await subscription.delete()


async def test_subscriptions_receive_changes(tmp_path: Path) -> None:
    async with running(tmp_path) as north, connected(north.url) as client:
        received: asyncio.Queue[Any] = asyncio.Queue()

        class Handler:
            def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
                received.put_nowait(value)

        subscription = await client.create_subscription(20, Handler())
        index = await client.get_namespace_index("urn:fieldbridge:points")
        node = client.get_node(ua.NodeId(ua.String("boiler.temp"), ua.Int16(index)))
        await subscription.subscribe_data_change(node)
        assert await asyncio.wait_for(received.get(), WAIT) == pytest.approx(21.5)
        await north.device.set_registers(UNIT, 0, [230])
        async with asyncio.timeout(WAIT):
            while await received.get() != pytest.approx(23.0):
                pass
        await subscription.delete()


async def test_writes_accepted_refused_and_audited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(tmp_path) as north:
        with caplog.at_level(logging.INFO, logger="bridge.audit"):
            async with connected(north.url, user="operator") as client:
                index = await client.get_namespace_index("urn:fieldbridge:points")
                setpoint = client.get_node(ua.NodeId(ua.String("boiler.setpoint"),
                                                     ua.Int16(index)))
                await setpoint.write_value(ua.Variant(55, ua.VariantType.Int64))
                assert await north.device.holding(UNIT, 1) == [55]
                temp = client.get_node(ua.NodeId(ua.String("boiler.temp"), ua.Int16(index)))
                with pytest.raises(UaError, match=r"BadNotWritable|BadUserAccessDenied"):
                    await temp.write_value(ua.Variant(1.0, ua.VariantType.Double))
                with pytest.raises(UaError, match="BadOutOfRange"):
                    await setpoint.write_value(ua.Variant(70000, ua.VariantType.Int64))
            async with connected(north.url, user="viewer") as client:
                setpoint = client.get_node(ua.NodeId(ua.String("boiler.setpoint"),
                                                     ua.Int16(index)))
                with pytest.raises(UaError, match="BadUserAccessDenied"):
                    await setpoint.write_value(ua.Variant(56, ua.VariantType.Int64))
        audit = [record.getMessage() for record in caplog.records
                 if record.name == "bridge.audit"]
        assert any(message.startswith("write: opcua server north user operator, point "
                                      "boiler.setpoint, value 55") for message in audit), audit
        assert await north.device.holding(UNIT, 1) == [55]


async def test_the_port_is_bound_while_every_source_is_down(tmp_path: Path) -> None:
    port = free_port()
    runtime = Runtime(load_config(write_config(tmp_path, free_port(), port)))
    task = asyncio.create_task(runtime.run(), name="test.runtime")
    try:
        await asyncio.wait_for(runtime.ready.wait(), WAIT)
        async with connected(f"opc.tcp://127.0.0.1:{port}/fieldbridge") as client:
            value = await variable_value(client, "boiler.temp")
            # No value yet: waiting for the first, or the source already found down.
            assert value.StatusCode.value in (ua.StatusCodes.BadWaitingForInitialData,
                                              ua.StatusCodes.BadNoCommunication)
        (entry,) = runtime.facade().servers()
        assert (entry["state"], entry["port"]) == ("up", port)
    finally:
        runtime.stop()
        await task


async def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runtime = Runtime(load_config(write_config(tmp_path, free_port(), port)))
        with pytest.raises(ServerError, match=rf"server 'north' cannot listen on "
                           rf"opcua://127.0.0.1:{port}"):
            await runtime.run()


def client_certificate(directory: Path) -> tuple[Path, Path]:
    """A client application certificate and key."""
    key = cert_gen.generate_private_key()
    certificate = cert_gen.generate_self_signed_app_certificate(
        key, "test client", {}, [x509.UniformResourceIdentifier("urn:test:client")],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "client.der").write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    (directory / "client.pem").write_bytes(cert_gen.dump_private_key_as_pem(key))
    return directory / "client.der", directory / "client.pem"


@pytest.mark.parametrize(("policy", "mode"), [
    ("Basic256Sha256", "Sign"), ("Aes256Sha256RsaPss", "Sign"),
    ("Aes256Sha256RsaPss", "SignAndEncrypt")])
async def test_each_security_mode_serves_a_trusted_client(
    tmp_path: Path, policy: str, mode: str
) -> None:
    certificate, key = client_certificate(tmp_path / "client")
    async with running(tmp_path, allow_none=False) as north:
        server_dir = tmp_path / "state" / "opcua-server" / "north"
        digest = hashlib.sha1(certificate.read_bytes()).hexdigest()
        shutil.copy(certificate, server_dir / "pki" / "trusted" / f"{digest}.der")
        with pytest.raises((UaError, ConnectionError, TimeoutError, OSError)):
            async with connected(north.url, user="viewer"):
                pass  # SecurityPolicy None is not offered
        client = Client(north.url, timeout=5)
        client.application_uri = "urn:test:client"
        await client.set_security_string(
            f"{policy},{mode},{certificate},{key},{server_dir / 'server.der'}")
        client.set_user("viewer")
        client.set_password(PASSWORD)
        await client.connect()
        try:
            value = await variable_value(client, "boiler.temp")
            assert value.Value.Value == pytest.approx(21.5)
        finally:
            await client.disconnect()


async def test_an_untrusted_certificate_is_refused_until_trusted(tmp_path: Path) -> None:
    certificate, key = client_certificate(tmp_path / "client")
    async with running(tmp_path, allow_none=False) as north:
        server_dir = tmp_path / "state" / "opcua-server" / "north"
        assert (server_dir / "server.der").is_file()

        async def attempt() -> None:
            client = Client(north.url, timeout=5)
            client.application_uri = "urn:test:client"
            await client.set_security_string(
                f"Basic256Sha256,SignAndEncrypt,{certificate},{key},{server_dir / 'server.der'}")
            client.set_user("viewer")
            client.set_password(PASSWORD)
            await client.connect()
            try:
                value = await variable_value(client, "boiler.temp")
                assert value.Value.Value == pytest.approx(21.5)
            finally:
                await client.disconnect()

        with pytest.raises((UaError, ConnectionError, TimeoutError, OSError)):
            await attempt()
        (rejected,) = (server_dir / "pki" / "rejected").iterdir()
        shutil.move(rejected, server_dir / "pki" / "trusted" / rejected.name)
        await attempt()
        counters = north.runtime.servers["north"].status.counters
        assert counters["certificates_rejected"] == 1
