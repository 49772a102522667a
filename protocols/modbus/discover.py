"""Modbus discovery: the request (what to scan, how to connect) and the skeleton source it
writes from what the scan (``protocols.modbus.scan``) found.

What registers mean cannot be read from them: the result is a skeleton, each readable
register a ``uint16`` point and each readable bit a ``bool``, with the number of requests the
source's planner would need to poll them all. Before the scan starts, the progress is told
how many requests it will take and how long that is at the chosen rate.

Imports pymodbus' client (through ``protocols.modbus.client``), ``bridge.config``,
``bridge.core.discovery``, ``bridge.errors`` and the Modbus config, mapping, planner and scan.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

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
from protocols.modbus.client import ClientHooks, ModbusClient, create_client, open_client
from protocols.modbus.config import (
    ADDRESS_SPACE,
    BIT_TABLES,
    TABLES,
    ModbusSourceConfig,
    SerialSettings,
    Table,
)
from protocols.modbus.mapping import PROTOCOL
from protocols.modbus.planner import Span, plan
from protocols.modbus.scan import MAX_SILENCE, Scanner, ScanSettings, SilentError, UnitScan

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

    def scan_settings(self) -> ScanSettings:
        """What the scan covers and how fast it goes."""
        first, end = self.bounds
        return ScanSettings(units=self.unit_ids, tables=self.table_names, first=first,
                            end=end, rate=self.rate, timeout=self.timeout)

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
    try:
        await open_client(client, config)
    except ConnectorError:
        client.close()
        raise
    settings = request.scan_settings()
    context.progress.announce(describe_estimate(settings))
    scanner = Scanner(settings, client, context, endpoint)
    scans: list[UnitScan] = []
    absent: list[tuple[int, str]] = []
    error: str | None = None
    try:
        for unit in request.unit_ids:
            if scanner.stopped is not None:
                break
            scanner.report(f"unit {unit}: does it answer?")
            reason = await scanner.absent(unit)
            if reason is not None:
                absent.append((unit, reason))
                scanner.skip(len(settings.tables) * (settings.end - settings.first))
                continue
            scan = UnitScan(unit)
            scans.append(scan)
            try:
                for table in request.table_names:
                    await scanner.scan_table(scan, table)
            except SilentError as silent:
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


def _duration(seconds: float) -> str:
    """``seconds`` as a person reads it: ``0.9 s``, ``42 s``, ``3 min 20 s``, ``1 h 5 min``."""
    if seconds < 10:
        return f"{seconds:.1g} s" if seconds < 1 else f"{seconds:.0f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    hours, rest = divmod(whole, 3600)
    minutes, rest_seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min {rest_seconds} s" if rest_seconds else f"{minutes} min"


def describe_estimate(settings: ScanSettings) -> str:
    """How many requests the scan takes and how long that is at its rate, said up front."""
    fewest, most = settings.request_bounds()
    units = len(settings.units)
    what = (f"{units} unit{'s' if units != 1 else ''} x {len(settings.tables)} "
            f"table{'s' if len(settings.tables) != 1 else ''} x "
            f"{settings.end - settings.first} addresses")
    return (f"scanning {what}: {fewest} requests if every address reads, up to about {most} "
            f"if none does; at {settings.rate:g} requests/s that is "
            f"{_duration(fewest / settings.rate)} to {_duration(most / settings.rate)} (an "
            f"unanswered request waits {settings.timeout:g} s, twice)")


def _device_points(scan: UnitScan) -> tuple[list[dict[str, Any]], list[Span]]:
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


def _describe_runs(scan: UnitScan) -> list[str]:
    lines = []
    for table, runs in scan.runs.items():
        if runs:
            blocks = ", ".join(f"{start}-{end - 1}" if end - start > 1 else str(start)
                               for start, end in runs)
            lines.append(f"  {table}: {blocks}")
    return lines


def _result(request: ModbusDiscoverRequest, context: DiscoveryContext, scanner: Scanner,
            scans: list[UnitScan], absent: list[int], error: str | None) -> Discovery:
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
