"""The Modbus scan: which units answer, and which addresses of their tables read.

For every unit id asked for, one read at the start of the range tells whether the unit
answers at all (a data answer, or an exception that only a present unit gives). For every
table of an answering unit, the range is read in requests as large as the protocol allows; a
request refused with an address exception (2, or 3) is narrowed down: the longest readable
run from its start is found by doubling, then halving, the count, and the address after it is
a hole. Each hole costs one request, each readable run a few. Requests are paced to ``rate``
per second and each waits ``timeout`` (repeated once), so a scan is safe on a live bus.

Imports pymodbus, ``bridge.core.discovery``, ``bridge.errors`` and the Modbus config and
client.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from bridge.core.discovery import DiscoveryContext
from bridge.errors import ConnectorError, ErrorCategory
from protocols.modbus.client import ModbusClient
from protocols.modbus.config import BIT_TABLES, MAX_BITS, MAX_REGISTERS, Table

ABSENT_CODES = frozenset({4, 10, 11})
"""What a gateway (10, 11) or pymodbus' own server (4) answers for a unit that is not there."""
ILLEGAL_FUNCTION = 1
MAX_SILENCE = 3
"""Unanswered requests in a row after which a unit is given up (the scan is then partial)."""


@dataclass(frozen=True)
class ScanSettings:
    """What to scan and how fast: units, tables, the address range, the pace and the wait."""

    units: Sequence[int]
    tables: Sequence[Table]
    first: int
    end: int
    """One past the last address."""
    rate: float
    """At most this many requests a second."""
    timeout: float

    @property
    def addresses(self) -> int:
        """Addresses to scan in all: every table of every unit."""
        return len(self.units) * len(self.tables) * (self.end - self.first)

    def request_bounds(self) -> tuple[int, int]:
        """The fewest and the most requests the scan may take when every unit answers.

        The fewest: one request to find each unit, then the range of each table in requests
        as large as the protocol allows. The most: each address of the range a hole (one
        request each), and every table probed before a unit is found.
        """
        span = self.end - self.first
        fewest = sum(math.ceil(span / (MAX_BITS if table in BIT_TABLES else MAX_REGISTERS))
                     for table in self.tables)
        units = len(self.units)
        return units * (1 + fewest), units * (len(self.tables) + len(self.tables) * span)


@dataclass(frozen=True)
class _Answer:
    """What one request got: data, an exception code, or silence (with why)."""

    ok: bool = False
    code: int | None = None
    silent: bool = False
    reason: str | None = None


class TableUnsupportedError(Exception):
    """The unit answers a table's reads with illegal function: it does not serve it."""


class SilentError(Exception):
    """A request went unanswered, twice."""

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
class UnitScan:
    """What the scan of one unit found: readable runs per table, and notes."""

    unit: int
    runs: dict[Table, list[tuple[int, int]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Readable addresses found."""
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


class Scanner:
    """Reads paced requests through one client and keeps count of what they found."""

    def __init__(self, settings: ScanSettings, client: ModbusClient,
                 context: DiscoveryContext, endpoint: str) -> None:
        self.settings = settings
        self.client = client
        self.context = context
        self.endpoint = endpoint
        self.pacer = _Pacer(settings.rate)
        self.requests = 0
        self.found = 0
        self.scanned = 0
        """Addresses scanned so far, over every unit and table (the progress)."""
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
        return _Answer(silent=True, reason=f"{reason} after {self.settings.timeout:g} s, twice")

    async def absent(self, unit: int) -> str | None:
        """Why ``unit`` does not answer, or ``None`` when it does."""
        first = self.settings.first
        for table in self.settings.tables:
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
            raise SilentError(answer.reason or "no answer")
        if answer.code == ILLEGAL_FUNCTION:
            raise TableUnsupportedError
        return answer.ok

    def skip(self, addresses: int) -> None:
        """Count ``addresses`` as scanned without reading them (a unit that is absent)."""
        self.scanned += addresses

    def report(self, note: str) -> None:
        """Tell the progress how far the whole scan is."""
        self.context.progress.update(
            self.scanned, self.settings.addresses,
            f"{note} ({self.found} readable, {self.requests} requests)")

    async def scan_table(self, scan: UnitScan, table: Table) -> None:
        """Find the readable runs of one table of a unit that answers."""
        first, end = self.settings.first, self.settings.end
        base = self.scanned
        try:
            await self._scan_table(scan, table, first, end)
        finally:
            self.scanned = base + (end - first)

    async def _scan_table(self, scan: UnitScan, table: Table, first: int, end: int) -> None:
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
            except TableUnsupportedError:
                scan.notes.append(f"{table}: the unit does not serve this table (illegal "
                                  "function)")
                return
            except SilentError as silent:
                scan.notes.append(f"{table} {position}-{position + size - 1}: {silent.reason}; "
                                  "not scanned")
                if self.silence >= MAX_SILENCE:
                    raise
                position += size
                self.scanned += size
                after_hole = False
                continue
            if good:
                if runs and runs[-1][1] == position:
                    runs[-1] = (runs[-1][0], position + good)
                else:
                    runs.append((position, position + good))
                self.found += good
            after_hole = good < size
            advance = good + (1 if after_hole else 0)
            position += advance
            self.scanned += advance
            self.report(f"unit {scan.unit} {table}")

