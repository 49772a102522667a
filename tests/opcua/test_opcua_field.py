"""OPC-UA behaviour met in the field, against real asyncua servers: empty strings sent as null
variants, variables that read Bad during discovery, a server that goes away while its points
are read, and a password the server wants encrypted on an unsecured channel."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from asyncua import ua
from asyncua.crypto import security_policies
from helpers import free_port
from helpers.brokers import SourceRun, wait_until
from helpers.discovery import in_thread
from helpers.opcua_server import WAIT, SourceRunner, make_certificate, source_config

from bridge import cli
from bridge.api.server import ApiServer
from bridge.core.discovery import DiscoveryContext, StreamProgress
from bridge.core.model import Event, Quality, Reading
from bridge.core.source import SourceContext
from bridge.core.status import EndpointStatus
from bridge.demo.opcua_plant import PlantServer, ServerSecurity
from bridge.errors import ErrorCategory
from bridge.pipeline.supervisor import Backoff, supervise
from bridge.registry import load_config
from bridge.runtime import Runtime
from protocols.opcua.config import OpcuaSourceConfig
from protocols.opcua.discover import OpcuaDiscoverRequest, discover
from protocols.opcua.session import SessionClient, default_client
from protocols.opcua.source import OpcuaSource

FIELD_VARIABLES: dict[str, Any] = {
    "Batch.Id": ua.Variant(None, ua.VariantType.String),
    "Batch.Label": ua.Variant(None, ua.VariantType.ByteString),
    "Batch.Recipe": ua.Variant(ua.XmlElement(None), ua.VariantType.XmlElement),
    "Batch.Count": ua.Variant(3, ua.VariantType.Int32),
    "Sensor.Failed": 20.5,
    "Sensor.Temperature": 61.5,
}
"""Null variants of the three string-like types (how open62541 sends ""), a counter, and a
sensor that reads Bad."""
EMPTY = ("Batch.Id", "Batch.Label", "Batch.Recipe")


def _points(plant: PlantServer, names: Sequence[str]) -> list[dict[str, Any]]:
    return [{"name": name.replace(".", "_").lower(), "node": plant.node_id(name)}
            for name in names]


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_a_null_string_variant_is_the_empty_string(tmp_path: Path, mode: str) -> None:
    cycle = {"poll_interval": 0.05} if mode == "poll" else {}
    async with PlantServer(variables=FIELD_VARIABLES) as plant:
        config = source_config(plant.url, _points(plant, EMPTY), mode=mode, **cycle)
        async with SourceRunner.of(config, tmp_path) as runner:
            points = [f"plc.{name.replace('.', '_').lower()}" for name in EMPTY]
            await runner.wait_for(lambda: all(runner.has(point) for point in points))
            for point in points:
                event = runner.latest(point)
                assert (event.quality, event.value, event.reason) == (Quality.GOOD, "", None), (
                    point)


def _context(tmp_path: Path) -> DiscoveryContext:
    return DiscoveryContext(progress=StreamProgress(io.StringIO(), tty=False),
                            state_dir=tmp_path)


async def test_discovery_maps_empty_strings_and_variables_that_read_bad(tmp_path: Path) -> None:
    async with PlantServer(variables=FIELD_VARIABLES) as plant:
        await plant.set("Sensor.Failed", None, status=ua.StatusCodes.BadSensorFailure)
        result = await discover(OpcuaDiscoverRequest(url=plant.url, source_id="plc",
                                                     root=plant.node_id("Plant")),
                                _context(tmp_path))
        by_name = {item.name: item for item in result.items}
        assert by_name["Batch.Id"].type == "String"
        assert by_name["Batch.Recipe"].type == "XmlElement"
        failed = by_name["Sensor.Failed"]
        assert (failed.type, failed.extra["status"]) == ("Double", "BadSensorFailure")
        assert "status" not in by_name["Sensor.Temperature"].extra
        text = result.yaml
        listed = text[text.index("# Reading Bad during discovery"):]
        assert "2:Failed (" in listed
        assert "BadSensorFailure" in listed
        assert "add it by hand" not in text

        path = tmp_path / "plc.yaml"
        path.write_text(text, encoding="utf-8")
        assert cli.main(["validate", str(path)]) == 0
        async with SourceRun(path) as run:
            def settled() -> bool:
                latest = {event.point: event for event in run.events}
                return "plc.Sensor.Failed" in latest and "plc.Batch.Id" in latest
            await wait_until(settled, WAIT, "events of the generated points")
        latest = {event.point: event for event in run.events}
    assert (latest["plc.Sensor.Failed"].quality, latest["plc.Sensor.Failed"].reason) == (
        Quality.BAD, "BadSensorFailure")
    assert (latest["plc.Batch.Id"].quality, latest["plc.Batch.Id"].value) == (Quality.GOOD, "")


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_points_turn_bad_when_their_server_goes_away(tmp_path: Path, mode: str) -> None:
    cycle = {"poll_interval": 0.05} if mode == "poll" else {}
    port = free_port()  # picked once: the restarted server listens where the first did
    servers = [PlantServer(port=port, variables=FIELD_VARIABLES)]
    await servers[0].start()
    plant = servers[0]
    names = ("Sensor.Temperature", "Batch.Count")
    config = source_config(plant.url, _points(plant, names), mode=mode, **cycle)
    points = ["plc.sensor_temperature", "plc.batch_count"]
    try:
        async with SourceRunner.of(config, tmp_path, supervised=True) as runner:
            await runner.wait_for(lambda: all(runner.has(point, quality=Quality.GOOD)
                                              for point in points))
            await plant.stop()
            await runner.wait_for(lambda: all(runner.has(point, quality=Quality.BAD)
                                              for point in points))
            for point in points:
                reason = runner.latest(point).reason or ""
                assert reason.startswith("connection lost"), reason
            restarted = PlantServer(port=port, variables=FIELD_VARIABLES)
            servers.append(restarted)
            await restarted.start()
            await runner.wait_for(lambda: all(runner.has(point, quality=Quality.GOOD)
                                              for point in points))
    finally:
        for server in servers:
            await server.stop()


async def test_points_of_a_server_never_reached_are_bad_with_the_reason(tmp_path: Path
                                                                       ) -> None:
    config = source_config(f"opc.tcp://127.0.0.1:{free_port()}/",
                           [{"name": "x", "node": "ns=2;s=X"}], timeout=1)
    runner = SourceRunner.of(config, tmp_path)
    runner.start()
    error = await runner.failure()
    event = runner.latest("plc.x")
    assert (event.quality, event.reason) == (Quality.BAD, error.reason)
    assert error.reason.startswith("connect:")


async def test_the_api_shows_the_points_of_a_stopped_server_bad(tmp_path: Path) -> None:
    async with PlantServer(variables=FIELD_VARIABLES) as plant:
        path = tmp_path / "fieldbridge.yaml"
        path.write_text(
            "bridge:\n  id: edge-1\n  state_dir: state\n"
            "api:\n  host: 127.0.0.1\n  port: 0\n"
            f"sources:\n  - id: plc\n    protocol: opcua\n    url: {plant.url}\n"
            "    publishing_interval: 0.05\n    points:\n"
            f"      - name: temp\n        node: \"{plant.node_id('Sensor.Temperature')}\"\n",
            encoding="utf-8")
        runtime = Runtime(load_config(path))
        stored: list[Event] = []
        changed = asyncio.Event()

        def record(events: Sequence[Event]) -> None:
            stored.extend(events)
            changed.set()

        async def until_stored(quality: Quality) -> None:
            async with asyncio.timeout(WAIT):
                while not any(event.point == "plc.temp" and event.quality is quality
                              for event in stored):
                    changed.clear()
                    await changed.wait()

        runtime.router.add_listener(record)
        task = asyncio.create_task(runtime.run(services=[ApiServer]), name="test.runtime")
        try:
            await until_stored(Quality.GOOD)
            url = f"http://127.0.0.1:{runtime.api_port}"
            async with httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
                good = (await http.get("/v1/points/plc.temp")).json()
                await plant.stop()
                await until_stored(Quality.BAD)
                bad = (await http.get("/v1/points/plc.temp")).json()
        finally:
            runtime.stop()
            async with asyncio.timeout(WAIT):
                await task
    await asyncio.get_running_loop().shutdown_default_executor()
    assert (good["quality"], good["value"]) == ("good", 61.5)
    assert (bad["quality"], bad["value"]) == ("bad", None)
    assert bad["reason"].startswith("connection lost"), bad


PASSWORD = "correct horse battery staple"
SERVER_URI = "urn:fieldbridge:test:token-encrypting-plant"


@pytest.fixture
async def token_plant(tmp_path: Path) -> AsyncIterator[PlantServer]:
    """A server whose None endpoint wants the password encrypted with Basic256Sha256."""
    certificate, key = make_certificate(tmp_path / "pki", "server", SERVER_URI, server=True)
    security = ServerSecurity(certificate=certificate, private_key=key,
                              application_uri=SERVER_URI,
                              endpoints=[("Basic256Sha256", "SignAndEncrypt")],
                              allow_insecure=True)
    async with PlantServer(variables=FIELD_VARIABLES, users={"operator": PASSWORD},
                           security=security) as server:
        assert server.server is not None
        # Like open62541, send no certificate with CreateSession on the unsecured channel
        # (asyncua's server sends one): the client must take it from the endpoint description.
        for factory in server.server._policies:
            if factory.cls is security_policies.SecurityPolicyNone:
                factory.certificate = None
        yield server


async def test_a_password_is_encrypted_for_an_unsecured_endpoint_that_asks(
    token_plant: PlantServer, tmp_path: Path
) -> None:
    config = source_config(token_plant.url, _points(token_plant, ["Sensor.Temperature"]),
                           auth={"username": "operator", "password": PASSWORD})
    endpoints = await default_client(config).connect_and_get_server_endpoints()
    unsecured = next(endpoint for endpoint in endpoints
                     if endpoint.SecurityMode == ua.MessageSecurityMode.None_)
    (username,) = [token for token in unsecured.UserIdentityTokens
                   if token.TokenType == ua.UserTokenType.UserName]
    assert username.SecurityPolicyUri.endswith("#Basic256Sha256")

    async with SourceRunner.of(config, tmp_path) as runner:
        await runner.wait_for(lambda: runner.has("plc.sensor_temperature",
                                                 quality=Quality.GOOD, value=61.5))
    wrong = source_config(token_plant.url, _points(token_plant, ["Sensor.Temperature"]),
                          auth={"username": "operator", "password": "wrong"})
    refused = SourceRunner.of(wrong, tmp_path)
    refused.start()
    error = await refused.failure()
    assert error.category is ErrorCategory.AUTH
    assert "BadUserAccessDenied" in error.reason


async def test_discover_logs_in_with_an_encrypted_password(
    token_plant: PlantServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLANT_PASSWORD", PASSWORD)
    output = tmp_path / "out.yaml"
    status = await in_thread(cli.main, [
        "discover", "opcua", token_plant.url, "--root", token_plant.node_id("Sensor"),
        "--auth-username", "operator", "--auth-password", "${PLANT_PASSWORD}",
        "--output", str(output), "--state-dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert status == 0, error
    assert "Traceback" not in error
    assert "Temperature" in output.read_text()


async def test_an_internal_error_is_logged_with_its_traceback_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = 0
    retried = asyncio.Event()

    def broken(config: OpcuaSourceConfig) -> SessionClient:
        nonlocal attempts
        attempts += 1
        if attempts == 4:
            retried.set()
        raise AttributeError("'NoneType' object has no attribute 'public_key'")

    config = source_config(f"opc.tcp://127.0.0.1:{free_port()}/",
                           [{"name": "x", "node": "ns=2;s=X"}])
    source = OpcuaSource(config, [], bridge_id="test", state_dir=tmp_path,
                         client_factory=broken)
    status = EndpointStatus(name="plc", kind="source", protocol="opcua",
                            endpoint=source.endpoint)

    async def publish(readings: Sequence[Reading]) -> None:
        """Nothing is read: the client cannot even be made."""

    task = asyncio.create_task(supervise(
        source, SourceContext(status=status, publish=publish),
        Backoff(initial=0.01, maximum=0.02)), name="test.supervise")
    try:
        async with asyncio.timeout(WAIT):
            await retried.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    logged = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(logged) == 1, [record.getMessage() for record in logged]
    assert logged[0].exc_info is not None
    assert status.last_error == ("internal error: AttributeError: 'NoneType' object has no "
                                 "attribute 'public_key'")
