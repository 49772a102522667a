"""What the console stands on, without a browser: its files inside the package (and the
wheel), the page's weight, ``/docs`` from packaged assets, ``/v1/whoami`` and the status
stream ``/v1/status/stream``."""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.api import add_source, close_runtime, key_config, open_runtime, write_config

from bridge.api.app import create_app
from bridge.api.event_hub import StreamSettings
from bridge.api.routes.console import CONSOLE_DIRECTORY, CONSOLE_PACKAGE
from bridge.api.server import ApiServer
from bridge.core.counters import READINGS
from bridge.errors import ErrorCategory
from bridge.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
PAGE_BUDGET = 300_000
"""Bytes the console page may weigh in all: HTML, scripts, styles, icon."""
CONSOLE_FILES = ["index.html", "console.js", "console.css", "favicon.svg",
                 "vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css",
                 "vendor/uplot/LICENSE"]
READ_KEY = "console-read-key-0123456789"
WRITE_KEY = "console-write-key-0123456789"
SETTLE = 10.0


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    """A runtime with a source and read and write keys, its router running."""
    path = write_config(tmp_path, key_config(("dashboard", READ_KEY, ["read"]),
                                             ("operator", WRITE_KEY, ["read", "write"])))
    running, router = await open_runtime(path)
    add_source(running, "plc1").success()
    yield running
    await close_runtime(running, router)


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime.facade()))
    async with httpx.AsyncClient(transport=transport, base_url="http://fieldbridge.test") as http:
        yield http


# --- the files --------------------------------------------------------------------------------


def test_the_console_files_are_package_data() -> None:
    console = importlib.resources.files(CONSOLE_PACKAGE) / CONSOLE_DIRECTORY
    for name in CONSOLE_FILES:
        assert (console / name).is_file(), f"{name} is not in {CONSOLE_PACKAGE}"
    assert "MIT License" in (console / "vendor/uplot/LICENSE").read_text()


def test_a_built_wheel_ships_the_console_and_requires_the_docs_assets(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("bridge", "protocols", "mappings"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*_pb2.py*"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("fieldbridge-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(name).decode() for name in names
                        if name.endswith(".dist-info/METADATA"))
    for name in CONSOLE_FILES:
        assert f"bridge/api/console/{name}" in names
    # Compiled from the Sparkplug B schema by the build, not copied from the source tree.
    assert {"protocols/mqtt/sparkplug_b_pb2.py", "protocols/mqtt/sparkplug_b_pb2.pyi"} <= names
    assert re.search(r"^Requires-Dist: fastapi-offline", metadata, re.MULTILINE | re.IGNORECASE)


def test_the_page_names_no_other_host() -> None:
    console = importlib.resources.files(CONSOLE_PACKAGE) / CONSOLE_DIRECTORY
    page = (console / "index.html").read_text()
    for reference in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert not re.match(r"^[a-z]+:|^//", reference), reference
    script = (console / "console.js").read_text()
    # Only the SVG namespace, which is a name, not a request.
    assert set(re.findall(r"https?://[^\s\"'`]+", script)) == {"http://www.w3.org/2000/svg"}


async def test_the_page_weighs_under_its_budget(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(console/[^"]+)"', page.text)
    assert {"console/console.js", "console/console.css",
            "console/vendor/uplot/uPlot.iife.min.js"} <= set(assets)
    total = len(page.content)
    for asset in assets:
        response = await client.get(f"/{asset}")
        assert response.status_code == 200, asset
        total += len(response.content)
    assert total < PAGE_BUDGET, f"the console weighs {total} bytes"


async def test_the_page_is_open_but_its_data_needs_a_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/")).status_code == 200
    assert (await client.get("/console/console.js")).status_code == 200
    assert (await client.get("/v1/points")).status_code == 401


async def test_docs_are_served_from_packaged_assets(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200
    references = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", docs.text)
    assert references, docs.text
    for reference in references:
        assert reference.startswith("/"), f"/docs loads {reference} from elsewhere"
        if reference != "/openapi.json":
            assert (await client.get(reference)).status_code == 200, reference
    assert '"validatorUrl": null' in docs.text


# --- /v1/whoami -------------------------------------------------------------------------------


async def test_whoami_names_the_key_and_its_scopes(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v1/whoami")
    assert missing.status_code == 401
    unknown = await client.get("/v1/whoami", headers={"X-API-Key": "nope"})
    assert unknown.status_code == 401
    assert unknown.json()["error"]["message"] == "the API key is not known"
    reader = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {READ_KEY}"})
    assert reader.json() == {"name": "dashboard", "scopes": ["read"], "keys_required": True,
                             "bridge": "edge-1"}
    writer = await client.get("/v1/whoami", headers={"X-API-Key": WRITE_KEY})
    assert writer.json()["scopes"] == ["read", "write"]
    assert READ_KEY not in reader.text


async def test_whoami_without_keys_is_anonymous_with_every_scope(tmp_path: Path) -> None:
    running, router = await open_runtime(write_config(tmp_path))
    try:
        transport = httpx.ASGITransport(app=create_app(running.facade()))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            body = (await http.get("/v1/whoami")).json()
    finally:
        await close_runtime(running, router)
    assert body == {"name": "anonymous", "scopes": ["admin", "read", "write"],
                    "keys_required": False, "bridge": "edge-1"}


# --- /v1/status/stream ------------------------------------------------------------------------


async def messages(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The (event, data) of each SSE message, as they arrive."""
    name, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            data.append(line.partition(":")[2].strip())
        elif not line and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []


async def test_status_stream_sends_a_state_change_at_once(runtime: Runtime) -> None:
    settings = StreamSettings(status_check=0.05, status_refresh=60.0)
    async with ApiServer(runtime.facade(), streams=settings) as server, httpx.AsyncClient(
            base_url=str(server.url), timeout=SETTLE,
            headers={"X-API-Key": READ_KEY}) as http:
        refused = await http.get("/v1/status/stream", headers={"X-API-Key": "wrong"})
        assert refused.status_code == 401
        async with http.stream("GET", "/v1/status/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            stream = messages(response)
            async with asyncio.timeout(SETTLE):
                name, first = await anext(stream)
                assert name == "status"
                [source] = first["sources"]
                assert (source["id"], source["state"]) == ("plc1", "up")
                assert first["sinks"] == []
                loop = asyncio.get_running_loop()
                changed_at = loop.time()
                runtime.sources["plc1"].status.down("connection refused",
                                                    ErrorCategory.TRANSIENT)
                name, second = await anext(stream)
                # The counters-only refresh is a minute away: this one is the change.
                assert loop.time() - changed_at < 1.0
            [source] = second["sources"]
            assert source["state"] == "down"
            assert source["last_error"] == "connection refused"
            assert source["error_category"] == "transient"
            await stream.aclose()


async def test_status_stream_ends_when_the_server_stops(runtime: Runtime) -> None:
    server = ApiServer(runtime.facade())
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=str(server.url), timeout=SETTLE,
                                     headers={"X-API-Key": READ_KEY}) as http, http.stream(
                "GET", "/v1/status/stream") as response:
            stream = messages(response)
            await anext(stream)
            stopping = asyncio.create_task(server.stop())
            async with asyncio.timeout(SETTLE):
                async for _ in stream:
                    pass
                await stopping
    finally:
        await server.stop()


async def test_status_stream_refreshes_counters_without_repeating_itself(
    runtime: Runtime,
) -> None:
    settings = StreamSettings(status_check=0.02, status_refresh=0.1, keepalive=60.0)
    async with ApiServer(runtime.facade(), streams=settings) as server, httpx.AsyncClient(
            base_url=str(server.url), timeout=SETTLE,
            headers={"X-API-Key": READ_KEY}) as http, http.stream(
                "GET", "/v1/status/stream") as response:
        stream = messages(response)
        async with asyncio.timeout(SETTLE):
            _, first = await anext(stream)
            assert first["sources"][0]["counters"].get("readings", 0) == 0
            runtime.sources["plc1"].status.counters.add(READINGS, 5)
            _, second = await anext(stream)
        assert second["sources"][0]["counters"]["readings"] == 5
        assert second["sources"][0]["state"] == "up"
        # Nothing changes now: several refresh periods pass without a message.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await anext(stream)
        await stream.aclose()
