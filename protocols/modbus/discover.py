"""Modbus discovery: find the unit ids that answer and the addresses they can read.

For every unit id asked for, one read at the start of the range tells whether the unit
answers at all (a data answer, or an exception that only a present unit gives). For every
table of an answering unit, the range is read in requests as large as the protocol allows; a
request refused with an address exception (2, or 3) is narrowed down: the longest readable
run from its start is found by doubling, then halving, the count, and the address after it is
a hole. Each hole costs one request, each readable run a few. Requests are paced to ``rate``
per second and each waits ``timeout`` (repeated once), so a scan is safe on a live bus.

What registers mean cannot be read from them: the result is a skeleton, each readable
register a ``uint16`` point and each readable bit a ``bool``, with the number of requests the
source's planner would need to poll them all.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from bridge.config.models import Duration, Identifier
from bridge.config.validation import field_error
from bridge.core.discovery import (
    DiscoveredItem,
    Discovery,
    DiscoveryContext,
    DiscoveryRequest,
    DiscoverySpec,
    render_yaml,
)
from bridge.errors import ConnectorError, ErrorCategory
from protocols.modbus.config import (
    ADDRESS_SPACE,
    BIT_TABLES,
    MAX_BITS,
    MAX_REGISTERS,
    TABLES,
    ModbusSourceConfig,
    SerialSettings,
    Table,
)
from protocols.modbus.mapping import PROTOCOL
from protocols.modbus.planner import Span, plan
from protocols.modbus.source import ClientHooks, ModbusClient, create_client

HOLE_CODES = frozenset({2, 3})
"""Illegal data address, and illegal data value (which some devices give for the same)."""
ABSENT_CODES = frozenset({4, 10, 11})
"""What a gateway (10, 11) or pymodbus' own server (4) answers for a unit that is not there."""
ILLEGAL_FUNCTION = 1
MAX_SILENCE = 3
"""Unanswered requests in a row after which a unit is given up (the scan is then partial)."""
MAX_GAP = 0
"""The generated source reads only what the scan found readable: the holes between blocks
refuse reads, so no request may read through them."""
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_numbers(text: str, *, low: int, high: int, what: str) -> list[int]:
    """``"1-3,5"`` as ``[1, 2, 3, 5]``; ``ValueError`` for anything outside ``low..high``."""
    numbers: list[int] = []
    for part in text.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise ValueError(f"{part.strip()!r} is not a {what} or a range such as 1-3")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if not low <= first <= last <= high:
            raise ValueError(f"{part.strip()} is outside {low}-{high} (or backwards)")
        numbers.extend(number for number in range(first, last + 1) if number not in numbers)
    return numbers


class ModbusDiscoverRequest(DiscoveryRequest):
    """What to scan, and how to connect: the source's own transport settings."""

    host: str | None = Field(
        default=None, description="Host name or address; required for tcp and rtu-over-tcp.")
    port: int = Field(default=502, ge=1, le=65535, description="TCP port.")
    transport: Literal["tcp", "rtu-over-tcp", "rtu"] = Field(
        default="tcp", description="`tcp`, `rtu-over-tcp` or `rtu` (a local serial line).")
    serial: SerialSettings | None = Field(
        default=None, description="Serial line settings; required for rtu.")
    units: str = Field(
        default="1", description="Unit ids to try, e.g. `1`, `1-3,7` or `0-247`.")
    tables: str = Field(
        default="holding,input,coil,discrete",
        description="Tables to scan, comma-separated: `holding`, `input`, `coil`, `discrete`.")
    range: str = Field(
        default="0-999", description="0-based addresses to scan in each table, e.g. `0-999` "
        "(Modicon 40001-41000 for holding registers).")
    rate: float = Field(
        default=20.0, gt=0, le=1000, description="At most this many requests a second.")
    timeout: Duration = Field(
        default=1.0, gt=0, le=30, description="Wait this long for each answer (a request "
        "without one is repeated once).")
    source_id: Identifier = Field(default="modbus", description="The id of the generated "
                                  "source.")

    @field_validator("units")
    @classmethod
    def _units(cls, value: str) -> str:
        parse_numbers(value, low=0, high=247, what="unit id")
        return value

    @field_validator("tables")
    @classmethod
    def _tables(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in TABLES]
        if unknown or not names:
            raise ValueError(f"expected tables among {', '.join(TABLES)}; got {value!r}")
        return value

    @field_validator("range")
    @classmethod
    def _range(cls, value: str) -> str:
        match = _RANGE.match(value)
        if match is None or match.group(2) is None:
            raise ValueError("expected a range of 0-based addresses such as 0-999")
        parse_numbers(value, low=0, high=ADDRESS_SPACE - 1, what="address")
        return value

    @model_validator(mode="after")
    def _connection(self) -> ModbusDiscoverRequest:
        self.source_config()  # the source's own checks: host or serial, unit 0 on a bus
        if self.transport != "tcp" and 0 in self.unit_ids:
            raise field_error("units", "unit 0 is the broadcast address on a serial bus: "
                              "it gets no answer", self.units)
        return self

    @property
    def unit_ids(self) -> list[int]:
        """The unit ids to try, in order."""
        return parse_numbers(self.units, low=0, high=247, what="unit id")

    @property
    def table_names(self) -> list[Table]:
        """The tables to scan, in the protocol's order."""
        names = {name.strip() for name in self.tables.split(",")}
        return [table for table in TABLES if table in names]

    @property
    def bounds(self) -> tuple[int, int]:
        """The first address and one past the last."""
        first, _, last = self.range.partition("-")
        return int(first), int(last) + 1

    def source_config(self, devices: list[dict[str, Any]] | None = None) -> ModbusSourceConfig:
        """The source these settings describe (with ``devices``)."""
        raw: dict[str, Any] = {"id": self.source_id, "protocol": PROTOCOL,
                               "transport": self.transport, "timeout": self.timeout,
                               "retries": 0, "devices": devices or []}
        if self.transport == "rtu":
            raw["serial"] = self.serial
        else:
            raw.update(host=self.host, port=self.port, serial=self.serial)
        return ModbusSourceConfig.model_validate(raw)


def _target(text: str) -> dict[str, Any]:
    if text.startswith(("/", "COM")):
        return {"transport": "rtu", "serial": {"port": text}}
    host, colon, port = text.rpartition(":")
    if colon and port.isdigit() and (not host.count(":") or host.startswith("[")):
        return {"host": host.strip("[]"), "port": port}
    return {"host": text.strip("[]")}


@dataclass(frozen=True)
class _Answer:
    ok: bool = False
    code: int | None = None
    silent: bool = False
    reason: str | None = None


class _TableUnsupportedError(Exception):
    pass


class _SilentError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Pacer:
    """Spaces request starts at least ``1 / rate`` seconds apart."""

    rate: float
    _next: float = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        if now < self._next:
            await asyncio.sleep(self._next - now)
            now = time.monotonic()
        self._next = max(now, self._next) + 1.0 / self.rate


@dataclass
class _UnitScan:
    unit: int
    runs: dict[Table, list[tuple[int, int]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(end - start for runs in self.runs.values() for start, end in runs)


def _call(client: ModbusClient, table: Table, unit: int, start: int, count: int
          ) -> Awaitable[ModbusPDU]:
    if table == "holding":
        return client.read_holding_registers(start, count=count, device_id=unit)
    if table == "input":
        return client.read_input_registers(start, count=count, device_id=unit)
    if table == "coil":
        return client.read_coils(start, count=count, device_id=unit)
    return client.read_discrete_inputs(start, count=count, device_id=unit)


class _Scanner:
    def __init__(self, request: ModbusDiscoverRequest, client: ModbusClient,
                 context: DiscoveryContext, endpoint: str) -> None:
        self.request = request
        self.client = client
        self.context = context
        self.endpoint = endpoint
        self.pacer = _Pacer(request.rate)
        self.requests = 0
        self.found = 0
        self.stopped: str | None = None
        self.silence = 0

    async def read(self, table: Table, unit: int, start: int, count: int) -> _Answer:
        """One request, repeated once without an answer."""
        reason = "no answer"
        for _ in range(2):
            await self.pacer.wait()
            self.requests += 1
            try:
                response = await _call(self.client, table, unit, start, count)
            except ConnectionException as exc:
                raise ConnectorError(self.endpoint, f"connection lost: {exc.string}",
                                     ErrorCategory.TRANSIENT) from exc
            except ModbusIOException as exc:
                reason = "no answer" if "No response" in exc.string else exc.string
                continue
            except ModbusException as exc:
                reason = f"not a Modbus answer: {exc.string}"
                continue
            self.silence = 0
            if response.isError():
                return _Answer(code=int(response.exception_code))
            return _Answer(ok=True)
        self.silence += 1
        return _Answer(silent=True, reason=f"{reason} after {self.request.timeout:g} s, twice")

    async def absent(self, unit: int) -> str | None:
        """Why ``unit`` does not answer, or ``None`` when it does."""
        first, _ = self.request.bounds
        for table in self.request.table_names:
            answer = await self.read(table, unit, first, 1)
            if answer.silent:
                return answer.reason
            if answer.code in ABSENT_CODES:
                return f"device exception {answer.code}"
            if answer.code != ILLEGAL_FUNCTION:
                return None
        return "illegal function for every table"

    async def readable(self, table: Table, unit: int, start: int, size: int,
                       try_whole: bool) -> int:
        """How many addresses from ``start`` (at most ``size``) read in one request."""
        failing: int | None = None
        """The smallest count known to fail."""
        if try_whole:
            if await self._ok(table, unit, start, size):
                return size
            failing = size
        good, step = 0, 1
        while failing is None or step < failing:
            count = min(step, size)
            if await self._ok(table, unit, start, count):
                good = count
                if count == size:
                    return size
                step *= 2
            else:
                failing = count
        assert failing is not None  # the loop ends on a failing count or returns
        while failing - good > 1:
            middle = (good + failing) // 2
            if await self._ok(table, unit, start, middle):
                good = middle
            else:
                failing = middle
        return good

    async def _ok(self, table: Table, unit: int, start: int, count: int) -> bool:
        answer = await self.read(table, unit, start, count)
        if answer.silent:
            raise _SilentError(answer.reason or "no answer")
        if answer.code == ILLEGAL_FUNCTION:
            raise _TableUnsupportedError
        return answer.ok

    async def scan_table(self, scan: _UnitScan, table: Table) -> None:
        first, end = self.request.bounds
        limit = MAX_BITS if table in BIT_TABLES else MAX_REGISTERS
        runs: list[tuple[int, int]] = []
        scan.runs[table] = runs
        position, after_hole = first, False
        while position < end:
            self.stopped = self.stopped or self.context.budget.why_stopped(self.found)
            if self.stopped is not None:
                return
            size = min(limit, end - position)
            try:
                good = await self.readable(table, scan.unit, position, size, not after_hole)
            except _TableUnsupportedError:
                scan.notes.append(f"{table}: the unit does not serve this table (illegal "
                                  "function)")
                return
            except _SilentError as silent:
                scan.notes.append(f"{table} {position}-{position + size - 1}: {silent.reason}; "
                                  "not scanned")
                if self.silence >= MAX_SILENCE:
                    raise
                position += size
                after_hole = False
                continue
            if good:
                if runs and runs[-1][1] == position:
                    runs[-1] = (runs[-1][0], position + good)
                else:
                    runs.append((position, position + good))
                self.found += good
            after_hole = good < size
            position += good + (1 if after_hole else 0)
            self.context.progress.update(position - first, end - first,
                                         f"unit {scan.unit} {table}: {self.found} readable, "
                                         f"{self.requests} requests")


async def discover(request: ModbusDiscoverRequest, context: DiscoveryContext,
                   client_factory: Callable[[ModbusSourceConfig, ClientHooks], ModbusClient]
                   = create_client) -> Discovery:
    """Scan the units and tables asked for and write a skeleton source.

    Raises ``ConnectorError`` when the connection cannot be opened; a failure after that
    returns what was found, partial.
    """
    config = request.source_config()
    endpoint = config.endpoint()
    hooks = ClientHooks(packet=lambda sending, data: data, pdu=lambda sending, pdu: pdu,
                        connect=lambda connected: None)
    client = client_factory(config, hooks)
    if not await client.connect():
        client.close()
        raise ConnectorError(endpoint, "cannot connect", ErrorCategory.TRANSIENT)
    scanner = _Scanner(request, client, context, endpoint)
    scans: list[_UnitScan] = []
    absent: list[tuple[int, str]] = []
    error: str | None = None
    try:
        for unit in request.unit_ids:
            if scanner.stopped is not None:
                break
            context.progress.update(0, None, f"unit {unit}: does it answer?")
            reason = await scanner.absent(unit)
            if reason is not None:
                absent.append((unit, reason))
                continue
            scan = _UnitScan(unit)
            scans.append(scan)
            try:
                for table in request.table_names:
                    await scanner.scan_table(scan, table)
            except _SilentError as silent:
                scan.notes.append(f"gave up after {MAX_SILENCE} unanswered requests: "
                                  f"{silent.reason}")
                error = f"unit {unit} stopped answering"
    except ConnectorError as exc:
        if not scans:
            raise
        error = exc.reason
    finally:
        client.close()
    if not scans and scanner.stopped is None:
        reasons = sorted({reason for _, reason in absent})
        raise ConnectorError(endpoint, f"no unit answered (units {request.units}): "
                             f"{'; '.join(reasons)}", ErrorCategory.TRANSIENT)
    return _result(request, context, scanner, scans, [unit for unit, _ in absent], error)


def _device_points(scan: _UnitScan) -> tuple[list[dict[str, Any]], list[Span]]:
    points: list[dict[str, Any]] = []
    spans: list[Span] = []
    for table, runs in scan.runs.items():
        for start, end in runs:
            for address in range(start, end):
                point: dict[str, Any] = {"name": f"{table}_{address}", "table": table,
                                         "address": address}
                if table not in BIT_TABLES:
                    point["type"] = "uint16"
                points.append(point)
                spans.append(Span(table, address, 1))
    return points, spans


def _describe_runs(scan: _UnitScan) -> list[str]:
    lines = []
    for table, runs in scan.runs.items():
        if runs:
            blocks = ", ".join(f"{start}-{end - 1}" if end - start > 1 else str(start)
                               for start, end in runs)
            lines.append(f"  {table}: {blocks}")
    return lines


def _result(request: ModbusDiscoverRequest, context: DiscoveryContext, scanner: _Scanner,
            scans: list[_UnitScan], absent: list[int], error: str | None) -> Discovery:
    first, end = request.bounds
    moment = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    endpoint = request.source_config().endpoint()
    header = [
        f"Generated by {context.command or 'fieldbridge discover modbus'} on {moment}",
        f"from {endpoint}: units {request.units}, tables {', '.join(request.table_names)}, "
        f"addresses {first}-{end - 1}; {scanner.requests} requests at most "
        f"{request.rate:g}/s.",
        "",
        "A SKELETON: registers do not say what they mean. Types, byte and word order, "
        "scaling, units",
        "and meaning cannot be inferred from them: every readable register is listed as a "
        "uint16 and",
        "every readable bit as a bool. Replace them with the device's register map (a profile "
        "under",
        "mappings/) where you have one; merge neighbours into int32, float32 or strings where "
        "the",
        "manual says so. The source reads with max_gap 0: its requests never read through "
        "the holes.",
        "",
    ]
    devices: list[dict[str, Any]] = []
    items: list[DiscoveredItem] = []
    warnings: list[str] = []
    for scan in scans:
        device_id = f"unit-{scan.unit}"
        points, spans = _device_points(scan)
        requests = len(plan(spans, max_gap=MAX_GAP))
        header.append(f"unit {scan.unit}: {len(points)} readable addresses; polling them all "
                      f"takes {requests} requests.")
        header.extend(_describe_runs(scan))
        header.extend(f"  note: {note}" for note in scan.notes)
        warnings.extend(f"unit {scan.unit}: {note}" for note in scan.notes
                        if "illegal function" not in note)
        if points:
            devices.append({"id": device_id, "unit": scan.unit, "interval": "5s",
                            "points": points})
        for point in points:
            table, address = point["table"], point["address"]
            items.append(DiscoveredItem(
                name=f"{device_id}.{point['name']}", address=f"{table}:{address}",
                type=point.get("type", "bool"), writable=False,
                extra={"device": device_id, "unit_id": scan.unit, "table": table,
                       "offset": address, "requests": requests}))
    if absent:
        header.append(f"No answer from unit{'s' if len(absent) > 1 else ''} "
                      f"{_compact(absent)}.")
    if scanner.stopped is not None:
        warnings.append(scanner.stopped)
    if error is not None:
        warnings.append(error)
    partial = error is not None or scanner.stopped is not None or any(
        "not scanned" in note for scan in scans for note in scan.notes)
    if partial:
        header.insert(0, "PARTIAL: the scan did not cover everything; " + "; ".join(
            warnings or ["see the notes"]))
    document: dict[str, Any] = {}
    if devices:
        document["sources"] = [{**_connection(request), "devices": devices}]
    else:
        header.append("Nothing readable was found: there is no source to write.")
    context.progress.finish(f"{len(items)} readable addresses on {len(devices)} units, "
                            f"{scanner.requests} requests" + (" (partial)" if partial else ""))
    return Discovery(protocol=PROTOCOL, yaml=render_yaml(document, header=header),
                     items=items, partial=partial, warnings=warnings, error=error)


def _connection(request: ModbusDiscoverRequest) -> dict[str, Any]:
    section: dict[str, Any] = {"id": request.source_id, "protocol": PROTOCOL}
    if request.transport != "tcp":
        section["transport"] = request.transport
    if request.transport == "rtu" and request.serial is not None:
        section["serial"] = request.serial.model_dump(mode="json", exclude_defaults=True)
    else:
        section["host"] = request.host
        if request.port != 502:
            section["port"] = request.port
    section["timeout"] = f"{request.timeout:g}s"
    section["max_gap"] = MAX_GAP
    return section


def _compact(numbers: list[int]) -> str:
    parts: list[str] = []
    start = previous = numbers[0]
    for number in [*numbers[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ", ".join(parts)



SPEC = DiscoverySpec(
    request_model=ModbusDiscoverRequest,
    run=discover,
    target=_target,
    target_name="HOST[:PORT]",
    summary="scan a Modbus device for answering units and readable addresses and write a "
    "skeleton source (HOST[:PORT], or a serial port such as /dev/ttyUSB0 for RTU)",
)
