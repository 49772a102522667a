"""``fieldbridge demo`` as a user runs it: a separate process, from an empty directory."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bridge.demo.run import PORT_VARIABLE, demo_config_path

REPOSITORY = Path(__file__).resolve().parents[2]
STARTUP = 30.0
"""Seconds the demo may take to print its URL (a cold interpreter imports a lot)."""
EXIT = 10.0
"""Seconds the demo may take to exit after SIGINT."""
URL = re.compile(r"REST API: (http://127\.0\.0\.1:(\d+))/v1/points\b")


def demo_environment(tmp_path: Path) -> dict[str, str]:
    """The environment of a user's shell, with temporary files kept inside ``tmp_path``."""
    environment = dict(os.environ)
    environment.pop(PORT_VARIABLE, None)
    environment.pop("NOTIFY_SOCKET", None)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    environment["PYTHONDONTWRITEBYTECODE"] = "1"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    environment["TMPDIR"] = str(temporary)
    return environment


class Demo:
    """A running ``python -m bridge demo --port 0``."""

    def __init__(self, process: asyncio.subprocess.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr
        self.output: list[str] = []

    async def base_url(self) -> str:
        """Read stdout until the end of the demo's banner; return the API's base URL."""
        assert self.process.stdout is not None
        base = None
        async with asyncio.timeout(STARTUP):
            while True:
                line = (await self.process.stdout.readline()).decode()
                if not line:
                    pytest.fail(f"the demo exited before its banner:\n{self.diagnostics()}")
                self.output.append(line)
                match = URL.search(line)
                if match:
                    base = match.group(1)
                if line.startswith("Press Ctrl-C"):
                    assert base is not None, self.diagnostics()
                    return base

    def diagnostics(self) -> str:
        """What the demo printed so far, for a failure message."""
        return "".join(self.output) + self.stderr.read_text(errors="replace")

    async def kill(self) -> None:
        """Make sure the process is gone (after a failed test)."""
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def interrupt(self) -> int:
        """Ctrl-C: send SIGINT and wait for the exit status."""
        self.process.send_signal(signal.SIGINT)
        async with asyncio.timeout(EXIT):
            return await self.process.wait()


async def start_demo(tmp_path: Path, *arguments: str) -> Demo:
    """Start ``python -m bridge demo --port 0 ARGUMENTS`` from the empty ``tmp_path/cwd``."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as errors:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "demo", "--port", "0", *arguments,
            cwd=workdir, env=demo_environment(tmp_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=errors)
    return Demo(process, stderr)


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    running = await start_demo(tmp_path)
    try:
        yield running
    finally:
        await running.kill()


def values(page: dict[str, object]) -> dict[str, object]:
    """Point id to value, from a ``/v1/points`` response."""
    items = page["items"]
    assert isinstance(items, list)
    return {item["id"]: item["value"] for item in items}


async def test_demo_serves_moving_points_and_stops_on_ctrl_c(
    demo: Demo, tmp_path: Path
) -> None:
    base = await demo.base_url()
    banner = "".join(demo.output)
    assert demo.output[0] == f"Console: {base}/\n", "the console's URL comes first"
    assert f"curl -s {base}/v1/points/boiler.supply_temp" in banner
    assert f"docs:     {base}/docs" in banner
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as client:
        # The demo is another process with nothing to await on, so these loops poll the API
        # briefly, bounded by a deadline. The first poll of the device may still be on its
        # way: wait for every point to have a value.
        deadline = time.monotonic() + STARTUP
        while True:
            response = await client.get("/v1/points", params={"source": "plant"})
            assert response.status_code == 200, response.text
            first = values(response.json())
            if first and all(value is not None for value in first.values()):
                break
            assert time.monotonic() < deadline, f"points without values: {first}"
            await asyncio.sleep(0.2)
        assert {"boiler.supply_temp", "boiler.return_temp", "boiler.pressure",
                "boiler.energy", "boiler.pump_running", "boiler.mode"} <= first.keys()
        # The simulator moves every half second and the demo polls every second.
        while True:
            second = values((await client.get("/v1/points", params={"source": "plant"})).json())
            if second != first:
                break
            assert time.monotonic() < deadline + STARTUP, "the values never changed"
            await asyncio.sleep(0.25)
        # The banner's count is what the API serves (it said 11 and served 14).
        served = (await client.get("/v1/points")).json()["items"]
        assert f"Fieldbridge demo: {len(served)} points of a simulated plant (" in banner
        assert "3 of opcua-plant, disabled (add --opcua)" in banner
        one = (await client.get("/v1/points/boiler.supply_temp")).json()
        assert one["unit"] == "degC"
        assert isinstance(one["value"], float)
        assert (await client.get("/docs")).status_code == 200

    assert await demo.interrupt() == 0, demo.diagnostics()
    assert list((tmp_path / "cwd").iterdir()) == [], "the demo wrote into the current directory"
    assert list((tmp_path / "tmp").iterdir()) == [], "the demo left its temporary files"


async def test_demo_with_opcua_bridges_the_opcua_server_too(tmp_path: Path) -> None:
    demo = await start_demo(tmp_path, "--opcua")
    try:
        base = await demo.base_url()
        async with httpx.AsyncClient(base_url=base, timeout=5.0) as client:
            deadline = time.monotonic() + STARTUP
            while True:
                page = (await client.get("/v1/points", params={"source": "opcua-plant"})).json()
                found = values(page)
                if found and all(value is not None for value in found.values()):
                    break
                assert time.monotonic() < deadline, f"OPC-UA points without values: {found}"
                await asyncio.sleep(0.2)
            assert set(found) == {"opcua.boiler_temperature", "opcua.pump_speed",
                                  "opcua.boiler_running"}
            assert found["opcua.boiler_running"] is True
            source = (await client.get("/v1/sources/opcua-plant")).json()
            assert source["state"] == "up"
        assert await demo.interrupt() == 0, demo.diagnostics()
    finally:
        await demo.kill()


async def test_demo_keeps_its_store_in_the_given_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    demo = await start_demo(tmp_path, "--state-dir", str(state))
    try:
        await demo.base_url()
        assert await demo.interrupt() == 0, demo.diagnostics()
    finally:
        await demo.kill()
    assert (state / "fieldbridge.db").is_file()
    assert list((tmp_path / "cwd").iterdir()) == []


async def test_demo_configuration_validates_without_its_variable(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "validate", str(demo_config_path()),
        cwd=tmp_path, env=demo_environment(tmp_path), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(STARTUP):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert "ok (2 sources, 14 points" in stdout.decode()


def test_demo_configuration_is_found_with_its_profiles() -> None:
    path = demo_config_path()
    assert path.name == "demo.yaml"
    assert (path.parent / "profiles" / "demo-plant.yaml").is_file()
