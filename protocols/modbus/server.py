"""The Modbus TCP server: serves the latest value of bridged points from a register map.

pymodbus's ``ModbusTcpServer`` frames the protocol; the datastore it calls is this module's
``RegisterMap``, which answers each request from the runtime's latest events: registers are
encoded by the Modbus source's own encoder, an address outside the map answers exception 02,
a bad or stale point (or one whose source is down) answers as its entry's ``when_bad`` says,
and a write goes through the runtime's audited write path, whose outcome decides the reply.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler

from bridge.config.models import ServerBase
from bridge.core.codec import compile_register_decoder
from bridge.core.counters import (
    CLIENTS,
    CLIENTS_REFUSED,
    EXCEPTION_0B,
    EXCEPTION_02,
    EXCEPTION_03,
    EXCEPTION_04,
    EXCEPTIONS,
    REQUESTS,
    WRITES,
    WRITES_FAILED,
    CounterSpec,
)
from bridge.core.model import Event, Value
from bridge.core.server import Server, ServerView, servable
from bridge.core.sink import BridgeView
from bridge.core.source import BuildContext
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ErrorCategory, NotWritableError, ServerError, WriteError
from protocols.modbus.config import BIT_TABLES, Table
from protocols.modbus.mapping import Encoder, compile_encoder
from protocols.modbus.server_config import ModbusServerConfig, ServedRegister

logger = logging.getLogger(__name__)

TABLE_OF_FUNCTION: dict[int, Table] = {
    1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input",
    3: "holding", 6: "holding", 16: "holding", 22: "holding", 23: "holding",
}
"""The table each function code reads or writes."""

WRITE_FUNCTIONS = frozenset({5, 6, 15, 16, 22, 23})
ECHO_FUNCTIONS = frozenset({5, 6})
"""Single writes whose answer echoes the value written (pymodbus reads it back)."""


_EXCEPTION_COUNTERS: dict[ExcCodes, CounterSpec] = {
    ExcCodes.ILLEGAL_ADDRESS: EXCEPTION_02, ExcCodes.ILLEGAL_VALUE: EXCEPTION_03,
    ExcCodes.DEVICE_FAILURE: EXCEPTION_04, ExcCodes.GATEWAY_NO_RESPONSE: EXCEPTION_0B}
"""The counter of each exception code the server answers with."""


class _RefusedError(Exception):
    """A request answered with a Modbus exception code."""

    def __init__(self, code: ExcCodes) -> None:
        super().__init__(code.name)
        self.code = code


@dataclass
class _Entry:
    """A compiled map entry: where it sits, how its point's value becomes registers."""

    config: ServedRegister
    encode: Encoder
    words: int
    last_good: list[int] | bool | None = None
    """What was served for the last good value (``when_bad: last``)."""

    def payload(self, value: Value) -> list[int] | bool:
        """The registers (or bit) of ``value``; ``ValueError``/``WriteError`` when it does
        not fit the entry's type."""
        return self.encode(value)


@dataclass
class _Unit:
    """One unit id's map: per table, each address to its entry and word position in it."""

    cells: dict[str, dict[int, list[tuple[_Entry, int]]]] = field(default_factory=dict)


class RegisterMap(ModbusServerContext):
    """The datastore pymodbus calls: answers every request from the bridge's latest values."""

    def __init__(self, config: ModbusServerConfig, status: EndpointStatus) -> None:
        # pymodbus's own initializer builds simulated memory this map does not have.
        self.old_simulator = True
        self.simdevices = []
        self.server_id = config.id
        self.status = status
        self.bridge: BridgeView | None = None
        self.units: dict[int, _Unit] = {}
        self._echo: dict[tuple[int, int, int], list[int] | list[bool]] = {}
        for unit_config in config.units:
            unit = _Unit()
            for entry_config in unit_config.registers:
                register = entry_config.register
                entry = _Entry(entry_config, compile_encoder(entry_config.point, register),
                               register.count)
                cells = unit.cells.setdefault(entry_config.table, {})
                for position in range(register.count):
                    cells.setdefault(register.start + position, []).append((entry, position))
            self.units[unit_config.unit] = unit

    def device_ids(self) -> list[int]:
        """The unit ids served."""
        return list(self.units)

    async def async_getValues(  # noqa: N802 (pymodbus's name)
            self, device_id: int, func_code: int, address: int,
            count: int = 1) -> list[int] | list[bool] | ExcCodes:
        """The registers or bits a read asks for, or the exception code that answers it."""
        echo = self._echo.pop((device_id, func_code, address), None)
        if echo is not None:
            return echo
        self.status.counters.add(REQUESTS)
        try:
            return self._read(device_id, TABLE_OF_FUNCTION[func_code], address, count)
        except _RefusedError as refused:
            return self._refuse(refused.code)

    async def async_setValues(  # noqa: N802 (pymodbus's name)
            self, device_id: int, func_code: int, address: int,
            values: Sequence[int] | Sequence[bool]) -> ExcCodes | None:
        """Write what a client sent through the audited write path; ``None`` when written."""
        self.status.counters.add(REQUESTS)
        try:
            await self._write(device_id, TABLE_OF_FUNCTION[func_code], address, list(values))
        except _RefusedError as refused:
            return self._refuse(refused.code)
        if func_code in ECHO_FUNCTIONS:
            self._echo[device_id, func_code, address] = list(values)
        return None

    def _refuse(self, code: ExcCodes) -> ExcCodes:
        self.status.counters.add(EXCEPTIONS)
        self.status.counters.add(_EXCEPTION_COUNTERS[code])
        return code

    def _cells(self, device_id: int, table: str, address: int,
               count: int) -> list[list[tuple[_Entry, int]]]:
        unit = self.units.get(device_id)
        if unit is None:
            raise _RefusedError(ExcCodes.GATEWAY_NO_RESPONSE)
        cells = unit.cells.get(table, {})
        found = []
        for position in range(address, address + count):
            cell = cells.get(position)
            if cell is None:
                raise _RefusedError(ExcCodes.ILLEGAL_ADDRESS)
            found.append(cell)
        return found

    def _read(self, device_id: int, table: str, address: int,
              count: int) -> list[int] | list[bool]:
        cells = self._cells(device_id, table, address, count)
        served: dict[int, list[int] | bool] = {}
        now = time.time()
        if table in BIT_TABLES:
            bits: list[bool] = []
            for cell in cells:
                entry = cell[0][0]
                bits.append(bool(self._served(entry, served, now)))
            return bits
        words: list[int] = []
        for cell in cells:
            word = 0
            for entry, position in cell:
                payload = self._served(entry, served, now)
                if entry.config.bit is not None:
                    word |= (1 << entry.config.bit) if payload else 0
                elif isinstance(payload, list):
                    word = payload[position]
            words.append(word)
        return words

    def _served(self, entry: _Entry, served: dict[int, list[int] | bool],
                now: float) -> list[int] | bool:
        """What ``entry`` answers now, computed once per request."""
        known = served.get(id(entry))
        if known is not None:
            return known
        payload = self._payload(entry, now)
        served[id(entry)] = payload
        return payload

    def _payload(self, entry: _Entry, now: float) -> list[int] | bool:
        config = entry.config
        event = self._event(config.point)
        if servable(event, config.stale_after, now) and self._source_up(config.point):
            assert event is not None
            assert event.value is not None
            try:
                payload = entry.payload(event.value)
            except (ValueError, WriteError):
                raise _RefusedError(ExcCodes.DEVICE_FAILURE) from None
            entry.last_good = payload
            return payload
        if config.when_bad == "last" and entry.last_good is not None:
            return entry.last_good
        if config.when_bad == "sentinel" and config.sentinel is not None:
            try:
                return entry.payload(config.sentinel)
            except (ValueError, WriteError):
                raise _RefusedError(ExcCodes.DEVICE_FAILURE) from None
        raise _RefusedError(ExcCodes.DEVICE_FAILURE)

    def _event(self, point_id: str) -> Event | None:
        if self.bridge is None:
            return None
        return self.bridge.latest().get(point_id)

    def _source_up(self, point_id: str) -> bool:
        """Whether the point's source (and device) is not down: a value read before a
        connection was lost is not current."""
        if self.bridge is None:
            return False
        point = self.bridge.points().get(point_id)
        if point is None:
            return True  # an event-only point: its events tell
        status = self.bridge.sources().get(point.source)
        if status is None or status.state is ConnectionState.DOWN:
            return False
        device = status.children.get(point.device) if point.device is not None else None
        return device is None or device.state is not ConnectionState.DOWN

    async def _write(self, device_id: int, table: str, address: int,
                     values: list[int] | list[bool]) -> None:
        cells = self._cells(device_id, table, address, len(values))
        writes: list[tuple[_Entry, list[int] | list[bool]]] = []
        position = 0
        while position < len(cells):
            entry, offset = cells[position][0]
            if not entry.config.writable:
                raise _RefusedError(ExcCodes.ILLEGAL_ADDRESS)
            if offset != 0 or position + entry.words > len(cells):
                raise _RefusedError(ExcCodes.ILLEGAL_VALUE)  # a part of a value
            writes.append((entry, values[position:position + entry.words]))
            position += entry.words
        for entry, raw in writes:
            await self._write_entry(device_id, entry, raw)

    async def _write_entry(self, device_id: int, entry: _Entry,
                           raw: list[int] | list[bool]) -> None:
        config = entry.config
        register = config.register
        try:
            if config.table in BIT_TABLES:
                value: Value = bool(raw[0])
            else:
                value = compile_register_decoder(register.data_type, register.byte_order,
                                                 length=register.length)(raw)
                if isinstance(value, int | float) and not isinstance(value, bool) and (
                        config.scale != 1.0 or config.offset != 0.0):
                    value = value * config.scale + config.offset
        except ValueError:
            raise _RefusedError(ExcCodes.ILLEGAL_VALUE) from None
        if self.bridge is None:
            raise _RefusedError(ExcCodes.DEVICE_FAILURE)
        self.status.counters.add(WRITES)
        try:
            await self.bridge.write(config.point, value,
                                    f"modbus server {self.server_id} unit {device_id}")
        except NotWritableError:
            raise _RefusedError(ExcCodes.ILLEGAL_ADDRESS) from None
        except WriteError as exc:
            self.status.counters.add(WRITES_FAILED)
            code = (ExcCodes.ILLEGAL_VALUE if exc.category is ErrorCategory.CONFIG
                    else ExcCodes.DEVICE_FAILURE)
            raise _RefusedError(code) from None
        except KeyError:
            raise _RefusedError(ExcCodes.ILLEGAL_ADDRESS) from None


class _Listener(ModbusTcpServer):
    """pymodbus's TCP server with the client networks and the connection cap applied."""

    def __init__(self, context: RegisterMap, config: ModbusServerConfig,
                 status: EndpointStatus) -> None:
        super().__init__(context, address=(config.host, config.port))
        self.networks = config.allowed_networks
        self.max_connections = config.max_connections
        self.status = status

    def callback_new_connection(self) -> ServerRequestHandler:
        """A handler that admits or refuses the client once its address is known."""
        return _Connection(  # type: ignore[no-untyped-call]
            self, self.trace_packet, self.trace_pdu, self.trace_connect)


class _Connection(ServerRequestHandler):
    """One client connection: refused at once when its address or the cap says so."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the client, or close the connection and count it as refused."""
        listener: _Listener = self.server
        status = listener.status
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else None
        admitted = len(listener.active_connections) <= listener.max_connections
        if admitted and listener.networks and host is not None:
            address = ipaddress.ip_address(host.split("%")[0])
            admitted = any(address in network for network in listener.networks)
        if not admitted:
            status.counters.add(CLIENTS_REFUSED)
            listener.active_connections.pop(self.unique_id, None)
            transport.close()
            return
        status.counters.add(CLIENTS)
        super().connection_made(transport)

    def callback_disconnected(self, exc: Exception | None) -> None:
        """The client left."""
        super().callback_disconnected(exc)


class ModbusServer(Server):
    """The Modbus TCP server of one ``servers:`` entry."""

    def __init__(self, config: ModbusServerConfig) -> None:
        super().__init__(config)
        self.config = config
        self._listener: _Listener | None = None
        self._map: RegisterMap | None = None

    @property
    def port(self) -> int | None:
        """The port while it serves."""
        return self.config.port if self._listener is not None else None

    async def start(self, bridge: ServerView, status: EndpointStatus) -> None:
        """Bind the port and serve; ``ServerError`` when it cannot be bound."""
        registers = RegisterMap(self.config, status)
        registers.bridge = bridge
        listener = _Listener(registers, self.config, status)
        if not await listener.listen():
            await listener.shutdown()  # type: ignore[no-untyped-call]
            raise ServerError(self.id, self.endpoint, _bind_problem(self.config))
        self._listener, self._map = listener, registers
        logger.info("modbus server %s listening on %s", self.id, self.endpoint)

    async def stop(self) -> None:
        """Close every connection and the listener."""
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.shutdown()  # type: ignore[no-untyped-call]

    def details(self) -> dict[str, Any]:
        """Connected clients and the units served."""
        listener = self._listener
        return {"connected_clients": len(listener.active_connections) if listener else 0,
                "units": [unit.unit for unit in self.config.units]}


def _bind_problem(config: ModbusServerConfig) -> str:
    """Why the address cannot be bound, as the system says it (pymodbus only logs it)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host, config.port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return "the address cannot be bound"


def build_server(config: ServerBase, context: BuildContext) -> Server:
    """The server of one configured Modbus ``servers:`` entry."""
    if not isinstance(config, ModbusServerConfig):
        raise TypeError(f"server {config.id} is not a Modbus server")
    return ModbusServer(config)


__all__ = ["ModbusServer", "RegisterMap", "build_server"]
