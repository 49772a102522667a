"""OPC-UA security against a real asyncua server that requires encryption and a user.

The server offers only SignAndEncrypt endpoints (Basic256Sha256 and both AES policies) and
accepts a username/password user or a trusted user certificate, never anonymous.
"""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from helpers.opcua_server import (
    VARIABLES,
    CertificateGate,
    SourceRunner,
    make_certificate,
    source_config,
)

from bridge.core.model import Quality
from bridge.demo.opcua_plant import PlantServer, ServerSecurity
from bridge.errors import ErrorCategory
from protocols.opcua.security import (
    CERTIFICATE_FILE,
    KEY_FILE,
    load_certificate,
    read_material,
    thumbprint,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVER_URI = "urn:fieldbridge:test:secure-plant"
PASSWORD = "correct horse battery staple"
ENCRYPTED = [("Basic256Sha256", "SignAndEncrypt"), ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"),
             ("Aes256_Sha256_RsaPss", "SignAndEncrypt")]
USER = {"username": "operator", "password": PASSWORD}
SECURE = {"policy": "Basic256Sha256", "mode": "SignAndEncrypt"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    make_certificate(directory, "server", SERVER_URI, server=True)
    make_certificate(directory, "other-server", SERVER_URI, server=True)
    make_certificate(directory, "user", "urn:fieldbridge:test:user", pem=True)
    return directory


@pytest.fixture(scope="module")
def gate() -> CertificateGate:
    return CertificateGate()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def plant(pki: Path, gate: CertificateGate) -> AsyncIterator[PlantServer]:
    security = ServerSecurity(certificate=pki / "server.der", private_key=pki / "server-key.pem",
                              application_uri=SERVER_URI, endpoints=ENCRYPTED,
                              certificate_check=gate.check)
    async with PlantServer(variables=VARIABLES, users={"operator": PASSWORD},
                           user_certificates=[pki / "user.crt"], security=security) as server:
        yield server


def temperature(plant: PlantServer) -> list[dict[str, Any]]:
    return [{"name": "temp", "node": plant.node_id("Boiler.Temperature")}]


async def connects(plant: PlantServer, state_dir: Path, **settings: Any) -> SourceRunner:
    """Run a source until its first good event arrives, then stop it."""
    config = source_config(plant.url, temperature(plant), **settings)
    async with SourceRunner.of(config, state_dir) as runner:
        await runner.wait_for(lambda: runner.has("plc.temp", quality=Quality.GOOD))
    return runner


async def refused(plant: PlantServer, state_dir: Path, **settings: Any) -> tuple[ErrorCategory,
                                                                               str]:
    """Run a source that cannot connect; the category and reason it failed with."""
    config = source_config(plant.url, temperature(plant), **settings)
    runner = SourceRunner.of(config, state_dir)
    runner.start()
    error = await runner.failure()
    return error.category, error.reason


@pytest.mark.parametrize(("policy", "mode"), ENCRYPTED)
async def test_connects_encrypted_with_a_user(
    plant: PlantServer, tmp_path: Path, policy: str, mode: str
) -> None:
    runner = await connects(plant, tmp_path, security={"policy": policy, "mode": mode},
                            auth=USER)
    assert runner.latest("plc.temp").value == VARIABLES["Boiler.Temperature"]
    assert runner.source.endpoint == f"{plant.url} ({policy}, {mode})"


async def test_wrong_password_is_an_auth_error(plant: PlantServer, tmp_path: Path) -> None:
    category, reason = await refused(plant, tmp_path, security=SECURE,
                                     auth={"username": "operator", "password": "wrong"})
    assert category is ErrorCategory.AUTH
    assert "BadUserAccessDenied" in reason
    assert "wrong" not in reason


async def test_anonymous_is_an_auth_error(plant: PlantServer, tmp_path: Path) -> None:
    category, reason = await refused(plant, tmp_path, security=SECURE)
    assert category is ErrorCategory.AUTH
    assert "BadIdentityTokenRejected" in reason


@pytest.mark.parametrize("security", [{}, {"policy": "Basic256Sha256", "mode": "Sign"}])
async def test_security_the_server_does_not_offer_is_a_config_error(
    plant: PlantServer, tmp_path: Path, security: dict[str, str]
) -> None:
    category, reason = await refused(plant, tmp_path, security=security, auth=USER)
    assert category is ErrorCategory.CONFIG
    assert "no endpoint with this security policy and mode" in reason


async def test_client_certificate_is_generated_once_and_reused(
    plant: PlantServer, gate: CertificateGate, tmp_path: Path
) -> None:
    directory = tmp_path / "opcua" / "plc"
    first = await connects(plant, tmp_path, security=SECURE, auth=USER)
    certificate, key = directory / CERTIFICATE_FILE, directory / KEY_FILE
    content, modified = certificate.read_bytes(), certificate.stat().st_mtime_ns
    generated = thumbprint(load_certificate(read_material(certificate)))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert first.status.details["certificate"]["thumbprint"] == generated
    second = await connects(plant, tmp_path, security=SECURE, auth=USER)
    assert certificate.read_bytes() == content
    assert certificate.stat().st_mtime_ns == modified
    assert second.status.details["certificate"]["thumbprint"] == generated
    assert gate.seen[-2:] == [generated, generated]
    assert gate.applications[-1] == "urn:fieldbridge:test:plc"


async def test_a_refused_client_certificate_is_an_auth_error(
    plant: PlantServer, gate: CertificateGate, tmp_path: Path
) -> None:
    runner = await connects(plant, tmp_path, security=SECURE, auth=USER)
    presented = runner.status.details["certificate"]["thumbprint"]
    gate.refused.add(presented)
    try:
        category, reason = await refused(plant, tmp_path, security=SECURE, auth=USER)
    finally:
        gate.refused.discard(presented)
    assert category is ErrorCategory.AUTH
    assert "BadCertificateUntrusted" in reason


async def test_a_configured_client_certificate_is_used(
    plant: PlantServer, gate: CertificateGate, tmp_path: Path
) -> None:
    uri = "urn:example:issued-by-it"
    certificate, key = make_certificate(tmp_path / "issued", "client", uri, pem=True)
    await connects(plant, tmp_path, auth=USER, security={
        **SECURE, "client_certificate": str(certificate), "private_key": str(key)})
    assert gate.seen[-1] == thumbprint(load_certificate(read_material(certificate)))
    assert gate.applications[-1] == uri
    assert not (tmp_path / "opcua").exists()


async def test_pinned_server_certificate(plant: PlantServer, pki: Path, tmp_path: Path) -> None:
    await connects(plant, tmp_path, auth=USER, security={
        **SECURE, "server_certificate": str(pki / "server.der")})
    category, reason = await refused(plant, tmp_path, auth=USER, security={
        **SECURE, "server_certificate": str(pki / "other-server.der")})
    assert category is ErrorCategory.AUTH
    assert "server_certificate" in reason


async def test_certificate_identity(plant: PlantServer, pki: Path, tmp_path: Path) -> None:
    await connects(plant, tmp_path, security=SECURE, auth={
        "certificate": str(pki / "user.crt"), "private_key": str(pki / "user.key")})
    stranger, stranger_key = make_certificate(tmp_path, "stranger", "urn:stranger", pem=True)
    category, reason = await refused(plant, tmp_path, security=SECURE, auth={
        "certificate": str(stranger), "private_key": str(stranger_key)})
    assert category is ErrorCategory.AUTH
    assert "BadUserAccessDenied" in reason


async def test_unreadable_certificate_file_is_a_config_error(
    plant: PlantServer, tmp_path: Path
) -> None:
    category, reason = await refused(plant, tmp_path, auth=USER, security={
        **SECURE, "client_certificate": str(tmp_path / "absent.der"),
        "private_key": str(tmp_path / "absent.pem")})
    assert category is ErrorCategory.CONFIG
    assert "absent.der" in reason
