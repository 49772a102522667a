"""A real EtherNet/IP Logix peer for tests: cpppo's simulator in a child process on a free
loopback port, which a test can pause (a controller that stops answering) and resume.

cpppo serves atomic tags and arrays of them by symbolic name, and CIP attribute reads; it
does not serve the tag list upload nor structures (UDTs), which the tests cover with a fake
client (``FakeClient``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

import helpers
from bridge.core.source import BuildContext, SourceUnit
from bridge.registry import load_config, protocols
from protocols.logix import build
from protocols.logix.client import Declared, TagResult
from protocols.logix.config import CipAttribute, LogixSourceConfig

TAGS: dict[str, str] = {
    "Flag": "BOOL", "Small": "SINT", "Count": "INT", "Total": "DINT", "Big": "LINT",
    "Speed": "REAL", "Precise": "LREAL", "Name": "STRING", "Temps": "REAL[8]",
    "Program:Main.Step": "DINT",
}
"""The simulator's tags: every atomic type, an array and a program-scoped tag."""


class LogixSimulator:
    """cpppo's ``enip`` server as a child process; ``async with`` starts and ends it."""

    def __init__(self, tags: Mapping[str, str] = TAGS, port: int | None = None) -> None:
        self.tags = dict(tags)
        self.port = port if port is not None else helpers.free_port()
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the simulator and wait until it accepts connections."""
        definitions = [f"{name}={type_name}" for name, type_name in self.tags.items()]
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cpppo.server.enip", "--address",
            f"127.0.0.1:{self.port}", *definitions,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        async with asyncio.timeout(helpers.WAIT):
            while True:
                if self._process.returncode is not None:
                    raise RuntimeError(f"cpppo exited with {self._process.returncode}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.05)  # the child is still importing: poll its port
                    continue
                writer.close()
                await writer.wait_closed()
                return

    def pause(self) -> None:
        """Stop answering (SIGSTOP): connections stay open, requests get no reply."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Answer again (SIGCONT)."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    async def stop(self) -> None:
        """End the child process and reap it."""
        process, self._process = self._process, None
        if process is None:
            return
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        async with asyncio.timeout(helpers.WAIT):
            await process.wait()

    async def __aenter__(self) -> LogixSimulator:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, traceback: TracebackType | None) -> None:
        await self.stop()


def source_yaml(port: int, points: Sequence[Mapping[str, Any]], **settings: Any) -> str:
    """A one-source config as YAML text."""
    source = {"id": "plc", "protocol": "logix", "host": "127.0.0.1", "port": port,
              "interval": "100ms", "timeout": "500ms", **settings, "points": list(points)}
    return yaml.safe_dump({"sources": [source]}, sort_keys=False)


def build_unit(tmp_path: Path, text: str, client: FakeClient | None = None) -> SourceUnit:
    """Load a one-source config written as YAML text and build its source and mapper (with
    ``client`` instead of pycomm3's when given)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    source = config.sources[0]
    context = BuildContext(bridge_id="test", state_dir=tmp_path)
    if client is None:
        return protocols()["logix"].source_unit(source, config.points[source.id], context)
    return build(source, config.points[source.id], context, client_factory=client.factory)


@dataclass
class FakeClient:
    """A counting ``LogixClient`` holding tag values (a dict value is a structure)."""

    values: dict[str, Any] = field(default_factory=dict)
    database: dict[str, dict[str, Any]] | None = None
    size: int = 4002
    reads: list[list[str]] = field(default_factory=list)
    writes: list[tuple[str, Any]] = field(default_factory=list)
    declared: dict[str, Declared] = field(default_factory=dict)
    opened: int = 0

    @property
    def connection_size(self) -> int:
        """The granted size."""
        return self.size

    def open(self) -> None:
        """Count the connection."""
        self.opened += 1

    def close(self) -> None:
        """Nothing to close."""

    def tag_database(self) -> dict[str, dict[str, Any]] | None:
        """The configured database."""
        return self.database

    def declare(self, tags: Mapping[str, Declared]) -> None:
        """Remember what was declared."""
        self.declared.update(tags)

    def _value(self, request: str) -> TagResult:
        path, _, count = request.partition("{")
        value: Any = self.values
        for part in path.replace("[", ".[").split("."):
            if part.startswith("["):
                index = int(part[1:-1])
                if not isinstance(value, list) or index >= len(value):
                    return TagResult(request, None, "Access beyond end of the object")
                if count:
                    return TagResult(request, value[index:index + int(count[:-1])])
                value = value[index]
            elif isinstance(value, dict) and part in value:
                value = value[part]
            else:
                return TagResult(request, None, f"Tag doesn't exist - {part}")
        return TagResult(request, value)

    def read_tags(self, requests: Sequence[str]) -> list[TagResult]:
        """Values from ``values``."""
        self.reads.append(list(requests))
        return [self._value(request) for request in requests]

    def write_tag(self, tag: str, value: Any) -> str | None:
        """Record the write."""
        self.writes.append((tag, value))
        return None

    def read_attribute(self, attribute: CipAttribute, type_name: str) -> TagResult:
        """Values under ``str(attribute)``."""
        return self._value(str(attribute))

    def identity(self) -> dict[str, Any]:
        """A fixed identity."""
        return {"product_name": "1756-L83E/B"}

    def factory(self, config: LogixSourceConfig) -> FakeClient:
        """A ``ClientFactory`` handing out this client."""
        return self
