"""Real Modbus peers for tests, in the test's event loop, on free loopback ports.

- ``ModbusTestServer``: a pymodbus server (Modbus TCP, or RTU frames over TCP) that records
  every request it receives;
- ``silent_server``: accepts connections and never answers (a hung device);
- ``garbage_server``: answers every request with bytes that are not Modbus;
- ``pty_pair``: a socat pty pair standing in for a serial line (a fixture);
- ``SourceRunner``: runs a ``ModbusSource`` with a collecting publish callback, maps what it
  publishes, and lets a test wait for a condition on the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import yaml
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

import helpers
from bridge.core.source import BuildContext, SourceUnit
from bridge.registry import load_config, protocols
from protocols.modbus import ModbusSource

WAIT = helpers.WAIT
"""Generous bound for anything a test waits for; normally reached in milliseconds."""


@dataclass(frozen=True)
class Request:
    """One request a test server received."""

    unit: int
    function_code: int
    address: int
    count: int


def device(
    unit: int,
    *,
    holding: Sequence[int] = (),
    input: Sequence[int] = (),
    coils: Sequence[bool] = (),
    discrete: Sequence[bool] = (),
    holes: Sequence[range] = (),
) -> SimDevice:
    """A device whose four tables hold the given values from address 0; beyond is invalid
    (bit tables round up to a multiple of 16 bits), and so are the holding registers in
    ``holes``: a read that touches one is answered with exception 2."""

    def registers(values: Sequence[int], holes: Sequence[range] = ()) -> list[SimData]:
        if not values:
            return [SimData(0, count=1, datatype=DataType.INVALID)]
        parts: list[SimData] = []
        start = 0
        for hole in sorted(holes, key=lambda hole: hole.start):
            if hole.start > start:
                parts.append(SimData(start, values=list(values[start:hole.start]),
                                     datatype=DataType.REGISTERS))
            parts.append(SimData(hole.start, count=len(hole), datatype=DataType.INVALID))
            start = hole.stop
        if start < len(values):
            parts.append(SimData(start, values=list(values[start:]),
                                 datatype=DataType.REGISTERS))
        return parts

    def bits(values: Sequence[bool]) -> list[SimData]:
        # Bits are stored 16 to a register: an unused bit table still holds 16 false bits.
        padded = list(values) + [False] * (-len(values) % 16 or (16 if not values else 0))
        return [SimData(0, values=padded, datatype=DataType.BITS)]

    return SimDevice(unit, simdata=(bits(coils), bits(discrete), registers(holding, holes),
                                    registers(input)))


class ModbusTestServer:
    """A pymodbus server serving ``devices`` on 127.0.0.1 and a free port."""

    def __init__(self, devices: Sequence[SimDevice], *, framer: FramerType = FramerType.SOCKET
                 ) -> None:
        self.devices = list(devices)
        self.framer = framer
        self.requests: list[Request] = []
        self.port = 0
        self._server: Any = None  # pymodbus' server classes are only partly annotated

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests.append(Request(pdu.dev_id, pdu.function_code, pdu.address, pdu.count))
        return pdu

    async def __aenter__(self) -> ModbusTestServer:
        self._server = ModbusTcpServer(self.devices, address=("127.0.0.1", 0),
                                       framer=self.framer, trace_pdu=self._trace)
        await self._server.serve_forever(background=True)
        self.port = self._server.transport.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop listening and close every client connection."""
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def set_registers(self, unit: int, address: int, values: Sequence[int]) -> None:
        """Change holding registers, as the device's own logic would."""
        await self._server.async_setValues(unit, 16, address, list(values))

    async def holding(self, unit: int, address: int, count: int = 1) -> list[int]:
        """Holding registers as the device holds them now."""
        values: list[int] = await self._server.async_getValues(unit, 3, address, count)
        return values

    async def coils(self, unit: int, address: int, count: int = 1) -> list[bool]:
        """Coils as the device holds them now."""
        values: list[bool] = await self._server.async_getValues(unit, 1, address, count)
        return values


@contextlib.asynccontextmanager
async def _stream_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A raw TCP server running ``handle`` per connection; yields its port.

    On exit it closes every connection and waits for the handlers to finish.
    """
    handlers: list[asyncio.Task[None]] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            await handle(reader, writer)
        except ConnectionError:
            pass  # the client hung up mid-write
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        if handlers:
            await asyncio.wait(handlers, timeout=WAIT)
        await server.wait_closed()


def silent_server() -> contextlib.AbstractAsyncContextManager[int]:
    """A TCP server that accepts, reads, and never answers (a hung device); yields its port."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1024):
            pass

    return _stream_server(swallow)


def garbage_server(answer: bytes) -> contextlib.AbstractAsyncContextManager[int]:
    """A TCP server answering every chunk it receives with ``answer``; yields its port."""

    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1024):
            writer.write(answer)
            await writer.drain()

    return _stream_server(babble)


def build_unit(tmp_path: Path, text: str, **variables: Any) -> SourceUnit:
    """Load a one-source config written as YAML text and build its source and mapper."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(text.format(**variables) if variables else text, encoding="utf-8")
    config = load_config(path)
    source = config.sources[0]
    return protocols()["modbus"].source_unit(
        source, config.points[source.id], BuildContext(bridge_id="test", state_dir=tmp_path))


def source_config(**settings: Any) -> str:
    """A one-source config as YAML text from keyword settings (a ``devices`` list included)."""
    source = {"id": "plc", "protocol": "modbus", **settings}
    return yaml.safe_dump({"sources": [source]}, sort_keys=False)


class SourceRunner(helpers.SourceRunner):
    """Runs one Modbus source in a task."""

    @property
    def source(self) -> ModbusSource:
        """The Modbus source under test."""
        source = self.unit.source
        assert isinstance(source, ModbusSource)
        return source


@dataclass(frozen=True)
class PtyPair:
    """Two connected pseudo terminals: what one writes, the other reads."""

    bridge_end: str
    device_end: str


@pytest.fixture(name="pty_pair")
def pty_pair_fixture() -> Iterator[PtyPair]:
    """A socat pty pair standing in for an RS-485 line; skipped without socat."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat is not installed: the serial RTU test needs a pty pair "
                    "(apt-get install socat)")
    process = subprocess.Popen(
        [socat, "-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"],
        stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        ends: list[str] = []
        for line in process.stderr:  # socat reports both ends before it starts relaying
            match = re.search(r"PTY is (\S+)", line)
            if match:
                ends.append(match.group(1))
            if len(ends) == 2 or "starting data transfer loop" in line:
                break
        assert len(ends) == 2, f"socat did not report two ptys: {ends}"
        yield PtyPair(bridge_end=ends[0], device_end=ends[1])
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()
