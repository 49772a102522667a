"""The Modbus client wrapper: pymodbus clients, one request at a time, failures translated.

``create_client`` makes a pymodbus async client for the configured transport. A ``Connection``
holds one open client and its request lock, runs each request as a task that a dropped
connection interrupts, and turns what pymodbus answers or raises into an ``Outcome`` (values,
or a failure kind and reason) or a ``ConnectorError`` once the connection is unusable.

pymodbus logs every failed request; those records are dropped unless this module's logger
is enabled for DEBUG, since the status already reports each state change once.

Imports pymodbus, ``bridge.core`` and ``bridge.errors``, and the Modbus config and planner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import serial
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from bridge.core.aio import raise_if_cancelling
from bridge.errors import ConnectorError, ErrorCategory
from protocols.modbus.config import BIT_TABLES, ModbusSourceConfig
from protocols.modbus.mapping import PointLocation
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



def _driver_errors() -> tuple[type[BaseException], ...]:
    """What pyserial raises when the port driver refuses a setting (parity E on a pty, say):
    on POSIX a ``termios.error`` escapes it as it is."""
    errors: tuple[type[BaseException], ...] = (ValueError, serial.SerialException)
    try:
        import termios
    except ImportError:  # Windows has no termios
        return errors
    return (*errors, termios.error)


_DRIVER_ERRORS = _driver_errors()


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


FailureKind = Literal["exception", "gateway", "timeout", "garbled"]


async def open_client(client: ModbusClient, config: ModbusSourceConfig) -> None:
    """Open the client's transport, or raise ``ConnectorError`` saying why it cannot be.

    A serial setting the port driver refuses is a ``config`` error, not a crash: pymodbus'
    serial transport opens the port and only then sets its last options, so when the driver
    refuses one the open port (and its exclusive lock) is left behind in the failed call's
    frames, and every later attempt would find the port locked. It is closed here.
    """
    endpoint = config.endpoint()
    try:
        connected = await client.connect()
    except _DRIVER_ERRORS as exc:
        _close_ports(exc)
        settings = config.serial
        if settings is None:
            raise ConnectorError(endpoint, f"cannot connect: {exc}",
                                 ErrorCategory.CONFIG) from exc
        described = (f"{settings.baudrate} baud, {settings.bytesize} data bits, parity "
                     f"{settings.parity}, {settings.stopbits} stop bits")
        raise ConnectorError(
            endpoint, f"serial port {settings.port} refuses the settings ({described}): "
            f"{_strerror(exc)}", ErrorCategory.CONFIG) from exc
    raise_if_cancelling()
    if not connected:
        raise ConnectorError(endpoint, _connect_failure(config), ErrorCategory.TRANSIENT)


def _strerror(exc: BaseException) -> str:
    """The driver's reason without its errno tuple: ``Invalid argument``."""
    arguments = exc.args
    if len(arguments) == 2 and isinstance(arguments[1], str):
        return arguments[1]
    return str(exc) or type(exc).__name__


def _close_ports(exc: BaseException) -> None:
    """Close every serial port the failed call left open in its frames."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        for value in frame.f_locals.values():
            port = getattr(value, "sync_serial", value)
            if isinstance(port, serial.SerialBase):
                port.close()


def _connect_failure(config: ModbusSourceConfig) -> str:
    """Why a transport did not open, as far as can be told."""
    if config.serial is not None:
        port = config.serial.port
        if not os.path.exists(port):
            return f"serial port {port} does not exist"
        return f"cannot open serial port {port}"
    return f"cannot connect to {config.host}:{config.port}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one block request: values, or why there are none."""

    values: tuple[int, ...] | tuple[bool, ...] | None
    failure: FailureKind | None = None
    reason: str | None = None
    code: int | None = None
    """The exception code of an exception answer."""


FAILURE_CATEGORY: dict[FailureKind, ErrorCategory] = {
    "exception": ErrorCategory.DEVICE,
    "gateway": ErrorCategory.DEVICE,
    "timeout": ErrorCategory.TRANSIENT,
    "garbled": ErrorCategory.PROTOCOL,
}
SKIPS_CYCLE: frozenset[FailureKind] = frozenset({"gateway", "timeout", "garbled"})
"""Failures that say the device is not answering: the rest of its cycle is not requested."""


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
class Connection:
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

    async def read(self, block: Block, unit: int) -> Outcome:
        """Read one block; raise ``ConnectorError`` when the connection is gone."""
        async with self.lock:
            answer = await self._execute(_read_call(block, unit))
        if isinstance(answer, Outcome):
            return answer
        values: tuple[int, ...] | tuple[bool, ...]
        if block.table in BIT_TABLES:
            values = tuple(bool(bit) for bit in answer.bits[:block.count])
        else:
            values = tuple(answer.registers[:block.count])
        if len(values) != block.count:
            return self._garbled(f"short answer: {len(values)} of {block.count} values")
        return Outcome(values)

    async def write(self, target: PointLocation, unit: int, payload: list[int] | bool
                    ) -> Outcome:
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
                if isinstance(answer, Outcome):
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
        return answer if isinstance(answer, Outcome) else Outcome(())

    async def _execute(self, call: Callable[[ModbusClient], Awaitable[ModbusPDU]]
                       ) -> ModbusPDU | Outcome:
        """One request, the lock held: the answer, or an ``Outcome`` saying why there is
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
            return Outcome(None, "timeout", f"timeout after {self.attempts} attempts")
        except ModbusException as exc:
            return self._garbled(f"unexpected answer: {exc.string}")
        if response.isError():
            code = response.exception_code
            name = _EXCEPTIONS.get(code, "unknown exception")
            kind: FailureKind = "gateway" if code in _GATEWAY_NO_TARGET else "exception"
            return Outcome(None, kind, f"device exception: {name} ({code})", code)
        return response

    def _garbled(self, reason: str) -> Outcome:
        self.garbled = True
        return Outcome(None, "garbled", f"protocol error: {reason}")
