"""Connectors as plugins: a distribution installed beside Fieldbridge is found and used.

The distributions under ``tests/plugins/`` are built and installed into a temporary target
with pip, as a user installs a third-party connector; the daemon then runs with that target
on its path, in a process of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import httpx
import pytest

from bridge.registry import ENTRY_POINT_GROUP, ProtocolSpec, discover

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
WITHIN = 20.0


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test distributions, built from copies (no build output in the tree) and installed
    into a target directory."""
    base = tmp_path_factory.mktemp("plugins")
    sources = []
    for name in ("fieldbridge-tick", "fieldbridge-jsonl", "fieldbridge-faulty"):
        copy = base / "src" / name
        shutil.copytree(PLUGINS / name, copy)
        sources.append(str(copy))
    target = base / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(target), *sources],
        check=True, capture_output=True, timeout=120)
    return target


def _environment(plugin_path: Path) -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(plugin_path), *filter(None, [environment.get("PYTHONPATH")])])
    return environment


CONFIG = """\
bridge:
  id: plugged
  state_dir: state
api:
  port: 0
sources:
  - id: plant
    protocol: tick
    interval: 20ms
    points:
      - name: count
        step: 2
        unit: pcs
sinks:
  - id: file
    protocol: jsonl
    path: events.jsonl
"""


def _validate(plugin_path: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "validate", str(config)], cwd=ROOT, text=True,
        capture_output=True, env=_environment(plugin_path), timeout=60)


def test_validate_accepts_a_plugin_source_and_a_sink_only_plugin(
        plugin_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    result = _validate(plugin_path, config)
    assert result.returncode == 0, result.stderr
    assert "ok (1 sources, 1 points, 0 profiles, 1 sinks)" in result.stdout


def test_broken_and_clashing_plugins_are_reported_by_distribution(
        plugin_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    result = _validate(plugin_path, config)
    assert result.returncode == 0
    assert re.search(r"connector 'exploding' from distribution 'fieldbridge-faulty' failed to "
                     r"load .*ModuleNotFoundError", result.stderr), result.stderr
    assert ("connector 'modbus' from distribution 'fieldbridge-faulty' registers protocol "
            "'modbus', which distribution 'fieldbridge' already provides") in result.stderr
    # The built-in Modbus connector is the one in use: the demo (Modbus) still validates.
    demo = _validate(plugin_path, ROOT / "mappings" / "demo.yaml")
    assert demo.returncode == 0, demo.stderr


def test_a_config_using_a_plugin_that_failed_to_load_names_it(
        plugin_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("sources:\n  - id: boom\n    protocol: exploding\n")
    result = _validate(plugin_path, config)
    assert result.returncode == 2
    assert (f"error: {config}:3: sources[0].protocol: protocol 'exploding' is not available: "
            "connector 'exploding' from distribution 'fieldbridge-faulty' failed to load"
            ) in result.stderr, result.stderr


@dataclass
class Daemon:
    """A daemon process and the port its API listens on."""

    process: asyncio.subprocess.Process
    port: int


@asynccontextmanager
async def _daemon(plugin_path: Path, config: Path) -> AsyncIterator[Daemon]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", "-c", str(config), cwd=config.parent,
        env=_environment(plugin_path), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    try:
        port = None
        async with asyncio.timeout(WITHIN):
            while port is None:
                line = (await process.stderr.readline()).decode()
                assert line, "the daemon exited before it was ready"
                if match := re.search(r"ready: .*API on port (\d+)", line):
                    port = int(match.group(1))
        drain = asyncio.create_task(process.stderr.read(), name="test.daemon.stderr")
        try:
            yield Daemon(process, port)
        finally:
            if process.returncode is None:
                process.terminate()
            async with asyncio.timeout(WITHIN):
                await process.wait()
            await drain
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_run_bridges_a_plugin_source_into_a_plugin_sink(
        plugin_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    async with (_daemon(plugin_path, config) as daemon,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.port}") as client):
        async with asyncio.timeout(WITHIN):
            while True:
                point = (await client.get("/v1/points/plant.count")).json()
                if point.get("value") is not None and point["value"] >= 10:
                    break
                await asyncio.sleep(0.05)
        assert point["unit"] == "pcs"
        assert point["quality"] == "good"
        sources = (await client.get("/v1/sources")).json()["items"]
        assert [(entry["id"], entry["protocol"], entry["state"]) for entry in sources] == [
            ("plant", "tick", "up")]
    assert daemon.process.returncode == 0
    events = [json.loads(line) for line in
              (tmp_path / "events.jsonl").read_text().splitlines()]
    values = [event["value"] for event in events]
    assert len(values) >= 5
    assert values == [2.0 * index for index in range(len(values))]
    assert {(event["point"], event["protocol"], event["bridge"]) for event in events} == {
        ("plant.count", "tick", "plugged")}


README_SINK = PLUGINS / "fieldbridge-jsonl" / "fieldbridge_jsonl" / "__init__.py"


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_the_readme_shows_the_complete_sink_the_plugin_test_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", _readme_section("Writing a connector"),
                        flags=re.DOTALL)
    shown = README_SINK.read_text(encoding="utf-8")
    assert shown in blocks
    assert len(shown.splitlines()) < 60


# --- discovery, without installing anything ---------------------------------------------------


def _entry(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def test_the_built_in_connectors_are_registered_as_entry_points() -> None:
    found = discover()
    assert {"modbus", "opcua", "mqtt", "amqp"} <= set(found.protocols)
    assert {found.distributions[name] for name in ("modbus", "opcua", "mqtt", "amqp")} == {
        "fieldbridge"}
    assert all(isinstance(spec, ProtocolSpec) for spec in found.protocols.values())


def test_an_entry_point_that_is_not_a_protocol_spec_is_left_out() -> None:
    found = discover([_entry("odd", "os:sep"), _entry("mqtt", "protocols.mqtt:SPEC")])
    assert set(found.protocols) == {"mqtt"}
    assert [str(problem) for problem in found.problems] == [
        "connector 'odd' from distribution '(unknown distribution)' points at os:sep, which is "
        "a str, not a ProtocolSpec"]
    assert found.catalog().unavailable == {"odd": str(found.problems[0])}


def test_an_entry_point_whose_name_differs_from_its_spec_is_left_out() -> None:
    found = discover([_entry("mqtt2", "protocols.mqtt:SPEC")])
    assert found.protocols == {}
    assert "registers entry point 'mqtt2' for a ProtocolSpec named 'mqtt'" in str(
        found.problems[0])


def test_a_protocol_spec_provides_a_source_a_sink_or_both() -> None:
    with pytest.raises(ValueError, match="provides neither a source nor a sink"):
        ProtocolSpec(name="empty")
    with pytest.raises(ValueError, match="a source needs both"):
        ProtocolSpec(name="half", build=lambda source, points, context: None)  # type: ignore[arg-type,return-value]
