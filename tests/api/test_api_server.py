"""The API's authentication by key and scope, and the real HTTP server: binding, TLS, stopping
with clients connected, and the runtime serving it."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers.api import (
    ADMIN_KEY,
    READ_KEY,
    WRITE_KEY,
    add_point,
    close_runtime,
    error_of,
    key_config,
    open_runtime,
    parse_exposition,
    sample,
    write_config,
)

from bridge.api import server as api_server
from bridge.api.app import create_app
from bridge.api.server import ApiServer, api_services
from bridge.errors import ApiServerError
from bridge.registry import load_config
from bridge.runtime import Runtime

# --- authentication ---------------------------------------------------------------------------


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an API with a read key, a write-only key and an admin key."""
    path = write_config(tmp_path, key_config(
        ("dashboard", READ_KEY, ["read"]), ("writer", WRITE_KEY, ["write"]),
        ("ops", ADMIN_KEY, ["admin"])))
    runtime, router = await open_runtime(path)
    add_point(runtime, "boiler.supply_temp", "plc1", "boiler")
    transport = httpx.ASGITransport(app=create_app(runtime.facade()))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http
    await close_runtime(runtime, router)


@pytest.mark.parametrize("path", ["/v1/points", "/v1/points/boiler.supply_temp",
                                  "/v1/points/boiler.supply_temp/history", "/v1/sources",
                                  "/metrics"])
async def test_a_key_is_required(secured: httpx.AsyncClient, path: str) -> None:
    missing = await secured.get(path)
    assert missing.status_code == 401
    assert error_of(missing)["code"] == "unauthenticated"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    unknown = await secured.get(path, headers={"Authorization": "Bearer not-a-key"})
    assert unknown.status_code == 401
    assert error_of(unknown)["message"] == "the API key is not known"
    for headers in ({"Authorization": f"Bearer {READ_KEY}"}, {"X-API-Key": READ_KEY},
                    {"authorization": f"bearer {ADMIN_KEY}"}, {"x-api-key": ADMIN_KEY}):
        allowed = await secured.get(path, headers=headers)
        assert allowed.status_code == 200, (headers, allowed.text)


async def test_a_key_without_the_scope_is_forbidden(
    secured: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = await secured.get("/v1/points", headers={"X-API-Key": WRITE_KEY})
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "forbidden"
    assert "writer" in error["message"]
    assert "'read'" in error["hint"]
    await secured.get("/v1/points", headers={"Authorization": f"Bearer {READ_KEY}x"})
    for key in (READ_KEY, WRITE_KEY, ADMIN_KEY):
        assert key not in caplog.text
        assert key not in response.text
    metrics = parse_exposition((await secured.get(
        "/metrics", headers={"X-API-Key": ADMIN_KEY})).text)
    assert sample(metrics, "fieldbridge_api_auth_failures_total", reason="forbidden") == 1
    assert sample(metrics, "fieldbridge_api_auth_failures_total", reason="unauthenticated") == 1


@pytest.mark.parametrize("path", ["/health/live", "/openapi.json", "/docs"])
async def test_health_and_docs_stay_open(secured: httpx.AsyncClient, path: str) -> None:
    assert (await secured.get(path)).status_code == 200


async def test_a_malformed_authorization_header_falls_back_to_the_api_key_header(
    secured: httpx.AsyncClient,
) -> None:
    response = await secured.get("/v1/points", headers={
        "Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": READ_KEY})
    assert response.status_code == 200


# --- the real server --------------------------------------------------------------------------


async def test_real_server_on_a_free_port(plant: Runtime) -> None:
    server = ApiServer(plant.facade())
    await server.start()
    try:
        assert server.port is not None
        assert server.port != 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=server.url) as http:
            live = await http.get("/health/live")
            point = await http.get("/v1/points/boiler.supply_temp")
        assert live.status_code == 200
        assert point.json()["value"] == 71.5
        assert "server" not in point.headers
        assert [task.get_name() for task in asyncio.all_tasks()].count("api") == 1
    finally:
        port = server.port
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 2
    assert "api" not in [task.get_name() for task in asyncio.all_tasks()]
    assert server.port is None
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{port}/health/live")


async def test_stop_while_a_client_keeps_its_connection_open(plant: Runtime) -> None:
    server = ApiServer(plant.facade())
    await server.start()
    assert server.url is not None
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/health/live")).status_code == 200
        # The keep-alive connection is still open here.
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 2


async def test_stop_ends_long_responses_through_the_closing_event(plant: Runtime) -> None:
    server = ApiServer(plant.facade())
    waiting = asyncio.Event()

    @server.app.get("/test/stream")
    async def stream() -> dict[str, bool]:
        waiting.set()
        await server.context.closing.wait()
        return {"closed": True}

    await server.start()
    assert server.url is not None
    async with httpx.AsyncClient(base_url=server.url) as http:
        request = asyncio.create_task(http.get("/test/stream"))
        await asyncio.wait_for(waiting.wait(), 5)
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 1
        response = await request
    assert response.json() == {"closed": True}


async def test_stop_cancels_a_request_that_does_not_end(plant: Runtime) -> None:
    server = ApiServer(plant.facade())
    waiting = asyncio.Event()

    @server.app.get("/test/hang")
    async def hang() -> None:
        waiting.set()
        await asyncio.Event().wait()

    await server.start()
    assert server.url is not None
    async with httpx.AsyncClient(base_url=server.url) as http:
        request = asyncio.create_task(http.get("/test/hang"))
        await asyncio.wait_for(waiting.wait(), 5)
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < ApiServer.STOP_TIMEOUT
        assert (await request).status_code == 500


def test_every_resolved_address_is_bound_on_one_port(monkeypatch: pytest.MonkeyPatch) -> None:
    def loopbacks(host: str | None, port: int, **_: object) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", port, 0, 0)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", loopbacks)
    sockets = api_server._bind("loopback", 0)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1
        assert sockets[0].getsockname()[0] == "127.0.0.1"
        # Without IPv6 the second address is skipped rather than failing the start.
        assert [sock.family for sock in sockets][:1] == [socket.AF_INET]
        assert all(sock.proto == socket.IPPROTO_TCP for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


async def test_an_unknown_host_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path).read_text().replace("127.0.0.1", "no-such-host.invalid")
    (tmp_path / "unknown.yaml").write_text(config)
    with pytest.raises(ApiServerError, match=r"no-such-host\.invalid:0: cannot resolve"):
        await ApiServer(Runtime(load_config(tmp_path / "unknown.yaml")).facade()).start()


async def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path).read_text().replace("port: 0", f"port: {port}")
        (tmp_path / "busy.yaml").write_text(config)
        runtime = Runtime(load_config(tmp_path / "busy.yaml"))
        with pytest.raises(ApiServerError, match=rf"127\.0\.0\.1:{port}: .*in use") as caught:
            await ApiServer(runtime.facade()).start()
    assert (caught.value.host, caught.value.port) == ("127.0.0.1", port)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fieldbridge test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "api.crt", directory / "api.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    path = write_config(tmp_path, f"  tls: {{cert: {cert}, key: {key}}}\n")
    runtime = Runtime(load_config(path))
    async with ApiServer(runtime.facade()) as server:
        assert server.url is not None
        assert server.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(base_url=server.url, verify=context) as http:
            assert (await http.get("/health/live")).status_code == 200
    assert server.port is None


async def test_an_unreadable_certificate_is_a_clear_error(tmp_path: Path) -> None:
    cert = tmp_path / "missing.crt"
    path = write_config(tmp_path, f"  tls: {{cert: {cert}, key: {cert}}}\n")
    with pytest.raises(ApiServerError, match=r"cannot load TLS certificate .*missing\.crt"):
        await ApiServer(Runtime(load_config(path)).facade()).start()


async def test_the_runtime_serves_the_api(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.runtime")
    config = load_config(write_config(tmp_path))
    runtime = Runtime(config)
    running = asyncio.create_task(runtime.run(services=api_services(config)), name="runtime")
    try:
        await asyncio.wait_for(runtime.ready.wait(), 5)
        assert runtime.api_port
        assert f"API on port {runtime.api_port}" in caplog.text
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.api_port}") as http:
            response = await http.get("/health/ready")
        assert response.status_code == 200
        assert response.json()["status"] == "ready"
    finally:
        runtime.stop()
        await asyncio.wait_for(running, 5)
    assert runtime.api_port is None


async def test_a_busy_port_stops_the_runtime_before_it_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path).read_text().replace("port: 0", f"port: {port}")
        (tmp_path / "busy.yaml").write_text(config)
        runtime = Runtime(load_config(tmp_path / "busy.yaml"))
        # A plain error, not an exception group: nothing has started yet.
        with pytest.raises(ApiServerError, match=rf"127\.0\.0\.1:{port}: .*in use"):
            await runtime.run(services=[ApiServer])
    assert not runtime.ready.is_set()
    assert not runtime.store.is_open


def test_a_disabled_api_is_not_served(tmp_path: Path) -> None:
    assert api_services(load_config(write_config(tmp_path))) == [ApiServer]
    assert api_services(load_config(write_config(tmp_path, "  enabled: false\n"))) == []

