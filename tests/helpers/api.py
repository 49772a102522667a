"""Builders for API tests: keys, configurations, a runtime with points added by hand, events
fed through its router, the structured error of a response, the Prometheus exposition parsed.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bridge.config.models import PointBase, ReportSpec, ResolvedPoint
from bridge.core.model import Event, Quality, Reading, new_event_id
from bridge.core.source import Source, SourceContext, SourceUnit
from bridge.core.status import EndpointStatus
from bridge.inventory import RunningSource
from bridge.registry import load_config
from bridge.runtime import Runtime

READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"


ADMIN_KEY = "admin-key-0123456789abcdef"
NOW = float(int(time.time()))
"""Whole seconds, so ISO 8601 round trips are exact."""


def write_config(tmp_path: Path, api: str = "") -> Path:
    """A configuration without sources; ``api`` is extra YAML under ``api:``."""
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(
        "bridge:\n  id: edge-1\n  state_dir: state\n"
        f"api:\n  host: 127.0.0.1\n  port: 0\n{api}"
        "sources: []\n")
    return path


def key_config(*keys: tuple[str, str, Sequence[str]]) -> str:
    """YAML for ``api.keys``."""
    lines = ["  keys:\n"]
    for name, key, scopes in keys:
        digest = hashlib.sha256(key.encode()).hexdigest()
        lines.append(f"    - {{name: {name}, sha256: {digest}, scopes: [{', '.join(scopes)}]}}\n")
    return "".join(lines)


class IdleSource(Source):
    """A source that never connects: the API only reads its status."""

    async def run(self, context: SourceContext) -> None:
        await asyncio.Event().wait()


class NoMapper:
    """Maps nothing."""

    def map(self, reading: Reading) -> list[Event]:
        return []


def add_source(runtime: Runtime, source_id: str, *, enabled: bool = True) -> EndpointStatus:
    """Register a fake source with the runtime, as the config would have."""
    status = EndpointStatus(name=source_id, kind="source", protocol="modbus",
                            endpoint=f"tcp://{source_id}.plant:502")
    source = IdleSource(source_id=source_id, protocol="modbus", endpoint=status.endpoint)
    runtime.sources[source_id] = RunningSource(SourceUnit(source, NoMapper()), status, enabled)
    return status


def add_point(
    runtime: Runtime,
    point_id: str,
    source: str,
    device: str | None,
    *,
    unit: str | None = None,
    writable: bool = False,
    tags: dict[str, str] | None = None,
) -> None:
    """Register a configured point with the runtime."""
    name = point_id.rsplit(".", 1)[-1]
    runtime.points[point_id] = ResolvedPoint(
        id=point_id, source=source, device=device,
        spec=PointBase(name=name, unit=unit, description=f"the {name}", writable=writable),
        tags=tags or {}, report=ReportSpec(), path=("sources", 0))


def make_event(
    point: str,
    value: float | bool | str | None,
    *,
    ts: float,
    source: str = "plc1",
    quality: Quality = Quality.GOOD,
    unit: str | None = None,
) -> Event:
    """An event as a mapping would produce it."""
    return Event(id=new_event_id(), source=source, point=point, value=value, unit=unit,
                 quality=quality, ts=ts, received_at=ts + 0.01, protocol="modbus",
                 bridge="edge-1", tags={}, reason=None if quality is Quality.GOOD else "stale")


async def feed(runtime: Runtime, events: Sequence[Event]) -> None:
    """Submit events through the router and wait until they are stored."""
    stored = asyncio.Event()
    remove = runtime.router.add_listener(
        lambda batch: stored.set() if runtime.router.pending == 0 else None)
    try:
        await runtime.router.submit(events)
        await asyncio.wait_for(stored.wait(), 5)
    finally:
        remove()


async def open_runtime(path: Path) -> tuple[Runtime, asyncio.Task[None]]:
    """A runtime with its store open and its router running."""
    runtime = Runtime(load_config(path))
    runtime.store.open()
    return runtime, asyncio.create_task(runtime.router.run(), name="router")


async def close_runtime(runtime: Runtime, router: asyncio.Task[None]) -> None:
    """Stop the router and close the store."""
    router.cancel()
    await asyncio.gather(router, return_exceptions=True)
    runtime.store.close()


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The structured error of a response, checked for shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert isinstance(error.get("hint"), str)
    return error


SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')


LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """Families of a text exposition, checking the format as Prometheus reads it."""
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"family {name} appears twice"
            families[name] = {"help": help_text, "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current, f"TYPE of {name} without its HELP first"
            assert kind in ("counter", "gauge", "untyped")
            families[name]["type"] = kind
        else:
            match = SAMPLE.match(line)
            assert match is not None, f"not a sample line: {line!r}"
            assert match["name"] == current, f"sample {line!r} outside its family"
            labels = dict(LABEL.findall(match["labels"] or ""))
            value = float(match["value"])
            families[match["name"]]["samples"].append((labels, value))
    for name, family in families.items():
        assert family["type"] is not None, name
        if family["type"] == "counter":
            assert name.endswith("_total"), name
    return families


def sample(families: dict[str, dict[str, Any]], name: str, **labels: str) -> float:
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    values = [value for found, value in families[name]["samples"]
              if labels.items() <= found.items()]
    assert len(values) == 1, (name, labels, families[name]["samples"])
    return float(values[0])
