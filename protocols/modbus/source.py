"""The Modbus source: one client connection, a poll task per device.

Devices sharing the connection take turns through one lock: a serial bus carries one
request at a time, and a TCP gateway is safest used the same way. Separate sources poll
concurrently.

Per request the client waits ``timeout`` and repeats ``retries`` times. What can go wrong
and what follows:

- an exception response (illegal address, say): that block's points turn ``bad``, the device
  is ``degraded`` and keeps being polled;
- no answer: the rest of the device's cycle is skipped, its points turn ``bad``, the device
  is ``down``; it comes back ``up`` by itself when it answers again;
- bytes that are not a Modbus answer: as no answer, with the ``protocol`` category;
- the connection closes or cannot be opened: every point turns ``bad`` and ``run`` raises
  ``ConnectorError`` so that the supervisor reconnects with backoff.

pymodbus logs every failed request; those records are dropped unless this module's logger
is enabled for DEBUG, since the status already reports each state change once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from bridge.core.aio import raise_if_cancelling
from bridge.core.model import Quality, Reading, Value
from bridge.core.source import Source, SourceContext
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory, WriteError
from protocols.modbus.config import BIT_TABLES, ModbusSourceConfig
from protocols.modbus.mapping import PROTOCOL, BlockAddress, PointLocation
from protocols.modbus.planner import Block

logger = logging.getLogger(__name__)

_EXCEPTIONS = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
_GATEWAY_NO_TARGET = frozenset({10, 11})


class _QuietPymodbus(logging.Filter):
    """Let pymodbus log only while this module debugs: failures reach the status instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return logger.isEnabledFor(logging.DEBUG)


logging.getLogger("pymodbus.logging").addFilter(_QuietPymodbus())


class ModbusClient(Protocol):
    """What the source uses of a Modbus client; pymodbus' async clients provide it."""

    @property
    def connected(self) -> bool:
        """Whether the transport is open."""
        ...

    async def connect(self) -> bool:
        """Open the transport; ``False`` when it cannot be opened."""
        ...

    def close(self) -> None:
        """Close the transport."""
        ...

    def read_coils(
        self, address: int, *, count: int = ..., device_id: int = ...,
        no_response_expected: bool = ...,
    ) -> Awaitable[ModbusPDU]:
        """Function code 1."""
        ...

    def read_discrete_inputs(
        self, address: int, *, count: int = ..., device_id: int = ...,
        no_response_expected: bool = ...,
    ) -> Awaitable[ModbusPDU]:
        """Function code 2."""
        ...

    def read_holding_registers(
        self, address: int, *, count: int = ..., device_id: int = ...,
        no_response_expected: bool = ...,
    ) -> Awaitable[ModbusPDU]:
        """Function code 3."""
        ...

    def read_input_registers(
        self, address: int, *, count: int = ..., device_id: int = ...,
        no_response_expected: bool = ...,
    ) -> Awaitable[ModbusPDU]:
        """Function code 4."""
        ...

    def write_coil(
        self, address: int, value: bool, *, device_id: int = ...,
        no_response_expected: bool = ...,
    ) -> Awaitable[ModbusPDU]:
        """Function code 5."""
        ...

    def write_register(
        self, address: int, value: int, *, device_id: int = ...,
        no_response_expected: bool = ...,
    ) -> Awaitable[ModbusPDU]:
        """Function code 6."""
        ...

    def write_registers(
        self, address: int, values: Sequence[int], *, device_id: int = ...,
        no_response_expected: bool = ...,
    ) -> Awaitable[ModbusPDU]:
        """Function code 16."""
        ...


@dataclass(frozen=True)
class ClientHooks:
    """Callbacks a client calls for traffic and connection changes (pymodbus' trace hooks)."""

    packet: Callable[[bool, bytes], bytes]
    pdu: Callable[[bool, ModbusPDU], ModbusPDU]
    connect: Callable[[bool], None]


ClientFactory = Callable[[ModbusSourceConfig, ClientHooks], ModbusClient]


def create_client(config: ModbusSourceConfig, hooks: ClientHooks) -> ModbusClient:
    """A pymodbus async client for the configured transport.

    Its own reconnecting is off (the supervisor reconnects); its ``retries`` and ``timeout``
    apply per request.
    """
    if config.serial is not None:
        serial = config.serial
        return AsyncModbusSerialClient(
            serial.port,
            framer=FramerType.RTU,
            baudrate=serial.baudrate,
            bytesize=serial.bytesize,
            parity=serial.parity,
            stopbits=serial.stopbits,
            name=config.id,
            reconnect_delay=0.0,
            timeout=config.timeout,
            retries=config.retries,
            trace_packet=hooks.packet,
            trace_pdu=hooks.pdu,
            trace_connect=hooks.connect,
        )
    return AsyncModbusTcpClient(
        config.host or "",
        port=config.port,
        framer=FramerType.SOCKET if config.transport == "tcp" else FramerType.RTU,
        name=config.id,
        reconnect_delay=0.0,
        timeout=config.timeout,
        retries=config.retries,
        trace_packet=hooks.packet,
        trace_pdu=hooks.pdu,
        trace_connect=hooks.connect,
    )


@dataclass(frozen=True)
class DevicePlan:
    """One device as the source polls it: its unit id, interval and blocks."""

    id: str
    unit: int
    interval: float
    blocks: tuple[Block, ...]


FailureKind = Literal["exception", "gateway", "timeout", "garbled"]


@dataclass(frozen=True, slots=True)
class _Outcome:
    """The result of one block request: values, or why there are none."""

    values: tuple[int, ...] | tuple[bool, ...] | None
    failure: FailureKind | None = None
    reason: str | None = None


_CATEGORY: dict[FailureKind, ErrorCategory] = {
    "exception": ErrorCategory.DEVICE,
    "gateway": ErrorCategory.DEVICE,
    "timeout": ErrorCategory.TRANSIENT,
    "garbled": ErrorCategory.PROTOCOL,
}
_SKIPS_CYCLE: frozenset[FailureKind] = frozenset({"gateway", "timeout", "garbled"})
"""Failures that say the device is not answering: the rest of its cycle is not requested."""


def next_deadline(previous: float, interval: float, now: float) -> tuple[float, int]:
    """The next poll deadline on the grid ``previous + k * interval``, and cycles missed.

    Deadlines advance by whole intervals from the first one, so the schedule never drifts;
    a cycle that overran skips the deadlines already past instead of polling back to back.
    """
    deadline = previous + interval
    if now <= deadline:
        return deadline, 0
    missed = math.ceil((now - deadline) / interval)
    return deadline + missed * interval, missed


def _read_call(block: Block, unit: int) -> Callable[[ModbusClient], Awaitable[ModbusPDU]]:
    """The client call reading ``block`` from ``unit``."""
    table, start, count = block.table, block.start, block.count
    if table == "holding":
        return lambda client: client.read_holding_registers(start, count=count, device_id=unit)
    if table == "input":
        return lambda client: client.read_input_registers(start, count=count, device_id=unit)
    if table == "coil":
        return lambda client: client.read_coils(start, count=count, device_id=unit)
    return lambda client: client.read_discrete_inputs(start, count=count, device_id=unit)


async def _await(answer: Awaitable[ModbusPDU]) -> ModbusPDU:
    """A client call as a coroutine, so it can run as a task."""
    return await answer


def _consume(task: asyncio.Task[ModbusPDU]) -> None:
    """Retrieve the outcome of an abandoned request so asyncio does not report it."""
    if not task.cancelled():
        task.exception()


@dataclass
class _Connection:
    """One open client, its request lock, and what its traffic hooks observed."""

    endpoint: str
    source_id: str
    attempts: int
    client: ModbusClient | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failure: asyncio.Future[ConnectorError] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    received: bool = False
    """Bytes arrived during the current request."""
    decoded: bool = False
    """A Modbus frame was decoded during the current request."""
    garbled: bool = False
    """Bytes arrived that never decoded; explains a connection the client then dropped."""

    def hooks(self) -> ClientHooks:
        """The client callbacks feeding this connection."""
        return ClientHooks(packet=self._packet, pdu=self._pdu, connect=self._connect)

    def _packet(self, sending: bool, data: bytes) -> bytes:
        if not sending and data:
            self.received = True
        return data

    def _pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.decoded = True
        return pdu

    def _connect(self, connected: bool) -> None:
        if connected:
            return
        if self.garbled or (self.received and not self.decoded):
            self.fail("connection closed after an answer that is not Modbus",
                      ErrorCategory.PROTOCOL)
        else:
            self.fail("connection closed", ErrorCategory.TRANSIENT)

    def fail(self, reason: str, category: ErrorCategory) -> None:
        """The connection is unusable: the first failure wins."""
        if not self.failure.done():
            self.failure.set_result(ConnectorError(self.endpoint, reason, category))

    async def read(self, block: Block, unit: int) -> _Outcome:
        """Read one block; raise ``ConnectorError`` when the connection is gone."""
        async with self.lock:
            answer = await self._execute(_read_call(block, unit))
        if isinstance(answer, _Outcome):
            return answer
        values: tuple[int, ...] | tuple[bool, ...]
        if block.table in BIT_TABLES:
            values = tuple(bool(bit) for bit in answer.bits[:block.count])
        else:
            values = tuple(answer.registers[:block.count])
        if len(values) != block.count:
            return self._garbled(f"short answer: {len(values)} of {block.count} values")
        return _Outcome(values)

    async def write(self, target: PointLocation, unit: int, payload: list[int] | bool
                    ) -> _Outcome:
        """Write a point's registers or bit; raise ``ConnectorError`` when the connection is
        gone. A bit inside a register is read, changed and written back while the lock keeps
        other requests of this connection out."""
        start = target.span.start
        async with self.lock:
            if isinstance(payload, bool) and target.bit is None:
                answer = await self._execute(
                    lambda client: client.write_coil(start, payload, device_id=unit))
            elif isinstance(payload, bool):
                answer = await self._execute(
                    lambda client: client.read_holding_registers(start, count=1,
                                                                 device_id=unit))
                if isinstance(answer, _Outcome):
                    return answer
                if not answer.registers:
                    return self._garbled("short answer: 0 of 1 values")
                mask = 1 << (target.bit or 0)
                current = answer.registers[0]
                changed = current | mask if payload else current & ~mask
                answer = await self._execute(
                    lambda client: client.write_register(start, changed, device_id=unit))
            elif len(payload) == 1:
                answer = await self._execute(
                    lambda client: client.write_register(start, payload[0], device_id=unit))
            else:
                answer = await self._execute(
                    lambda client: client.write_registers(start, payload, device_id=unit))
        return answer if isinstance(answer, _Outcome) else _Outcome(())

    async def _execute(self, call: Callable[[ModbusClient], Awaitable[ModbusPDU]]
                       ) -> ModbusPDU | _Outcome:
        """One request, the lock held: the answer, or an ``_Outcome`` saying why there is
        none. Raises ``ConnectorError`` when the connection is gone."""
        if self.failure.done():
            raise self.failure.result()
        client = self.client
        if client is None or not client.connected:
            self.fail("connection closed", ErrorCategory.TRANSIENT)
            raise self.failure.result()
        self.received = self.decoded = False
        request = asyncio.create_task(_await(call(client)),
                                      name=f"modbus[{self.source_id}].request")
        request.add_done_callback(_consume)
        try:
            await asyncio.wait((request, self.failure), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            request.cancel()
            raise
        if not request.done():
            request.cancel()
            raise self.failure.result()
        raise_if_cancelling()
        try:
            response = request.result()
        except ConnectionException as exc:
            self.fail(f"connection lost: {exc.string}", ErrorCategory.TRANSIENT)
            raise self.failure.result() from exc
        except ModbusIOException as exc:
            if self.failure.done():
                raise self.failure.result() from exc
            # pymodbus 3.16 says "No response received after N retries" after its retries.
            if "No response" not in exc.string:
                return self._garbled(f"unexpected answer: {exc.string}")
            if self.received and not self.decoded:
                return self._garbled("answer is not Modbus")
            return _Outcome(None, "timeout", f"timeout after {self.attempts} attempts")
        except ModbusException as exc:
            return self._garbled(f"unexpected answer: {exc.string}")
        if response.isError():
            code = response.exception_code
            name = _EXCEPTIONS.get(code, "unknown exception")
            kind: FailureKind = "gateway" if code in _GATEWAY_NO_TARGET else "exception"
            return _Outcome(None, kind, f"device exception: {name} ({code})")
        return response

    def _garbled(self, reason: str) -> _Outcome:
        self.garbled = True
        return _Outcome(None, "garbled", f"protocol error: {reason}")


class ModbusSource(Source):
    """Polls the devices of one Modbus connection and publishes one reading per block."""

    def __init__(
        self,
        config: ModbusSourceConfig,
        devices: Sequence[DevicePlan],
        *,
        locations: Mapping[str, PointLocation] | None = None,
        client_factory: ClientFactory = create_client,
    ) -> None:
        super().__init__(source_id=config.id, protocol=PROTOCOL, endpoint=config.endpoint())
        self.config = config
        self.devices = tuple(devices)
        self._locations = dict(locations or {})
        self._client_factory = client_factory
        self._connection: _Connection | None = None
        self._units = {plan.id: plan.unit for plan in self.devices}
        self._failing: dict[str, None] = {}
        """Devices now degraded or down, oldest first (kept as they change: a poll must not
        walk every device of the connection)."""

    def device_endpoints(self) -> dict[str, str]:
        """Each device as ``<endpoint>?unit=<id>``."""
        return {plan.id: f"{self.endpoint}?unit={plan.unit}" for plan in self.devices}

    async def run(self, context: SourceContext) -> None:
        """Connect, then poll every device until cancelled or the connection fails."""
        connection = _Connection(self.endpoint, self.id, self.config.retries + 1)
        client = self._client_factory(self.config, connection.hooks())
        connection.client = client
        for device, endpoint in self.device_endpoints().items():
            context.status.child(device, endpoint)
        try:
            connected = await client.connect()
            raise_if_cancelling()
            if not connected:
                reason = self._connect_failure()
                await self._all_bad(context, reason, ErrorCategory.TRANSIENT)
                raise ConnectorError(self.endpoint, reason, ErrorCategory.TRANSIENT)
            context.status.up()
            self._connection = connection
            error = await self._serve(context, connection)
            await self._all_bad(context, error.reason, error.category)
            raise error
        finally:
            self._connection = None
            client.close()

    def _connect_failure(self) -> str:
        if self.config.serial is not None:
            port = self.config.serial.port
            if not os.path.exists(port):
                return f"serial port {port} does not exist"
            return f"cannot open serial port {port}"
        return f"cannot connect to {self.config.host}:{self.config.port}"

    async def _serve(self, context: SourceContext, connection: _Connection) -> ConnectorError:
        """Poll until the connection fails; return why."""
        tasks: list[asyncio.Task[None]] = []
        polled = [plan for plan in self.devices if plan.blocks]
        async with asyncio.TaskGroup() as group:
            for index, plan in enumerate(polled):
                # Devices sharing the connection poll at evenly spread phases of their
                # interval instead of all at once: each request finds the line free, so a
                # device's poll does not wait behind the others' (jitter).
                phase = plan.interval * index / len(polled)
                tasks.append(group.create_task(
                    self._poll(plan, connection, context, phase),
                    name=f"modbus[{self.id}/{plan.id}].poll"))
            try:
                error = await connection.failure
            finally:
                for task in tasks:
                    task.cancel()
        return error

    async def _poll(
        self, plan: DevicePlan, connection: _Connection, context: SourceContext,
        phase: float = 0.0,
    ) -> None:
        """Poll one device on a fixed grid: deadlines advance by the interval, never drift.

        The first cycle runs at once; from the second on, the grid is shifted by ``phase``
        (0 <= phase < interval).
        """
        status = context.status.child(plan.id)
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        first = True
        while True:
            try:
                readings, failure = await self._cycle(plan, connection, context.status, status)
            except ConnectorError:
                return  # connection.failure carries it to run()
            await context.publish(readings)
            self._report(context.status, status, failure)
            now = loop.time()
            if first:
                # Onto the shifted grid; a first cycle longer than the phase is no overrun.
                deadline, _ = next_deadline(deadline + phase - plan.interval, plan.interval,
                                            now)
                first = False
            else:
                deadline, missed = next_deadline(deadline, plan.interval, now)
                if missed:
                    status.counters["overruns"] += missed
                    context.status.counters["overruns"] += missed
            await asyncio.sleep(deadline - now)

    async def _cycle(
        self,
        plan: DevicePlan,
        connection: _Connection,
        source_status: EndpointStatus,
        status: EndpointStatus,
    ) -> tuple[list[Reading], _Outcome | None]:
        """Read every block of a device once; the worst failure decides its state."""
        readings: list[Reading] = []
        worst: _Outcome | None = None
        for block in plan.blocks:
            address = BlockAddress(plan.id, block.table, block.start, block.count)
            if worst is not None and worst.failure in _SKIPS_CYCLE:
                readings.append(Reading(self.id, address, None, time.time(),
                                        quality=Quality.BAD, reason=worst.reason))
                continue
            outcome = await self._request(connection, block, plan.unit, source_status, status)
            if outcome.values is not None:
                readings.append(Reading(self.id, address, outcome.values, time.time()))
                continue
            readings.append(Reading(self.id, address, None, time.time(),
                                    quality=Quality.BAD, reason=outcome.reason))
            if worst is None or (outcome.failure in _SKIPS_CYCLE
                                 and worst.failure not in _SKIPS_CYCLE):
                worst = outcome
        for counters in (status.counters, source_status.counters):
            counters["cycles"] += 1
        return readings, worst

    @staticmethod
    async def _request(
        connection: _Connection,
        block: Block,
        unit: int,
        source_status: EndpointStatus,
        status: EndpointStatus,
    ) -> _Outcome:
        """One counted request."""
        counted = (status.counters, source_status.counters)
        for counters in counted:
            counters["requests"] += 1
        outcome = await connection.read(block, unit)
        if outcome.failure is None:
            name = "responses"
        elif outcome.failure in ("exception", "gateway"):
            name = "exceptions"
        elif outcome.failure == "timeout":
            name = "timeouts"
        else:
            name = "protocol_errors"
        for counters in counted:
            counters[name] += 1
        return outcome

    def _report(
        self,
        source_status: EndpointStatus,
        status: EndpointStatus,
        failure: _Outcome | None,
    ) -> None:
        """Move the device's state, then the source's (degraded while a device fails)."""
        if failure is None:
            status.success()
        else:
            reason = failure.reason or "failed"
            category = _CATEGORY[failure.failure or "exception"]
            if failure.failure in _SKIPS_CYCLE:
                status.down(reason, category)
            else:
                status.degraded(reason, category)
        failing = self._failing
        if status.state in (ConnectionState.DEGRADED, ConnectionState.DOWN):
            failing.setdefault(status.name)
        else:
            failing.pop(status.name, None)
        if not failing:
            if source_status.state is not ConnectionState.UP:
                source_status.up()
        elif source_status.state is ConnectionState.UP:
            name = next(iter(failing))
            child = source_status.children[name]
            source_status.degraded(f"device {name}: {child.last_error}",
                                   child.error_category or ErrorCategory.DEVICE)

    async def _all_bad(
        self, context: SourceContext, reason: str, category: ErrorCategory
    ) -> None:
        """Every point turns bad, every device down: the connection is gone."""
        now = time.time()
        readings = [
            Reading(self.id, BlockAddress(plan.id, block.table, block.start, block.count),
                    None, now, quality=Quality.BAD, reason=reason)
            for plan in self.devices for block in plan.blocks
        ]
        for plan in self.devices:
            context.status.child(plan.id).down(reason, category)
            self._failing.setdefault(plan.id)
        if readings:
            await context.publish(readings)

    async def read(self, point_id: str) -> list[Reading]:
        """Read one point's registers now, between poll requests."""
        location = self._locations.get(point_id)
        if location is None:
            raise WriteError(point_id, f"no such point in source {self.id}",
                             ErrorCategory.CONFIG)
        connection = self._connection
        if connection is None:
            raise WriteError(point_id, f"source {self.id} is not connected",
                             ErrorCategory.TRANSIENT)
        span = location.span
        block = Block(span.table, span.start, span.count)
        address = BlockAddress(location.device, block.table, block.start, block.count)
        try:
            outcome = await connection.read(block, self._units[location.device])
        except ConnectorError as exc:
            raise WriteError(point_id, exc.reason, exc.category) from exc
        if outcome.values is None:
            return [Reading(self.id, address, None, time.time(), quality=Quality.BAD,
                            reason=outcome.reason)]
        return [Reading(self.id, address, outcome.values, time.time())]

    async def write(self, point_id: str, value: Value) -> None:
        """Write a value to a writable point: the inverse of its enum or scale is written.

        Raises ``WriteError``: ``config`` for an unknown or read-only point or a value it
        cannot hold, ``device`` when the device refuses, ``transient`` when it is unreachable.
        """
        location = self._locations.get(point_id)
        if location is None:
            raise WriteError(point_id, f"no such point in source {self.id}",
                             ErrorCategory.CONFIG)
        if location.encode is None:
            raise WriteError(point_id, "the point is read-only (its config does not say "
                             "`writable: true`)", ErrorCategory.CONFIG)
        try:
            payload = location.encode(value)
        except ValueError as exc:
            raise WriteError(point_id, str(exc), ErrorCategory.CONFIG) from None
        connection = self._connection
        if connection is None:
            raise WriteError(point_id, f"source {self.id} is not connected",
                             ErrorCategory.TRANSIENT)
        try:
            outcome = await connection.write(location, self._units[location.device], payload)
        except ConnectorError as exc:
            raise WriteError(point_id, exc.reason, exc.category) from exc
        if outcome.failure is not None:
            raise WriteError(point_id, outcome.reason or "write failed",
                             _CATEGORY[outcome.failure])
