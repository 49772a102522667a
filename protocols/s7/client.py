"""The S7 client seam: python-snap7's asyncio client behind a small interface, and what its
failures mean.

The source and discovery talk to an ``S7Client`` made by a ``ClientFactory``, so unit tests
can hand in a small fake; the real one wraps ``snap7.async_client.AsyncClient``. Failures
come out as two kinds:

- ``RefusedError``: the PLC answered and refused the request (an address it does not have, a
  DB that does not exist, access it does not allow): the connection is fine, only what was
  asked for is ``bad``;
- ``ConnectorError``: the connection is gone or never came up (refused, timed out, closed,
  garbled): the supervisor reconnects with backoff.

A refusal for access reasons (protection level, PUT/GET not permitted) says how to permit it.

Imports python-snap7, ``bridge.errors`` and the S7 config and address modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from snap7.async_client import AsyncClient
from snap7.error import S7Error, S7ProtocolError
from snap7.type import Area as SnapArea
from snap7.type import Block as SnapBlock

from bridge.errors import ConnectorError, ErrorCategory
from protocols.s7.address import Area
from protocols.s7.config import S7SourceConfig

PUT_GET_HINT = ("the PLC refuses access: on an S7-1200/1500 enable 'Permit access with "
                "PUT/GET communication from remote partner' in the CPU's protection settings, "
                "turn off 'Optimized block access' for the DBs read, and check the protection "
                "level")
_ACCESS_WORDS = ("not allowed", "protection level", "not permitted", "not implemented",
                 "password", "class=0x81", "class=0x87")
"""How a refusal for access reasons reads: the return codes' texts, and the header error
classes of the application relationship (0x81, PUT/GET off) and of access (0x87)."""

logger = logging.getLogger(__name__)


class _QuietSnap7(logging.Filter):
    """Let python-snap7 log only while this module debugs: it logs every connection and
    failure at INFO or WARNING, and those reach the source's status (logged once) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return logger.isEnabledFor(logging.DEBUG)


for _name in ("snap7.async_client", "snap7.client_base", "snap7.s7protocol",
              "snap7.connection"):
    logging.getLogger(_name).addFilter(_QuietSnap7())


AREAS: dict[Area, SnapArea] = {"DB": SnapArea.DB, "M": SnapArea.MK, "I": SnapArea.PE,
                               "Q": SnapArea.PA, "T": SnapArea.TM, "C": SnapArea.CT}


class RefusedError(Exception):
    """The PLC answered and refused one request; ``reason`` says why."""

    def __init__(self, reason: str, category: ErrorCategory = ErrorCategory.DEVICE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category


@dataclass(frozen=True)
class Identity:
    """What a CPU says about itself; a field it would not say is ``None``."""

    order_code: str | None = None
    module_name: str | None = None
    module_type: str | None = None
    serial_number: str | None = None
    plant_id: str | None = None
    state: str | None = None
    notes: list[str] = field(default_factory=list)
    """What could not be read, and why."""


class S7Client(Protocol):
    """The requests the source and discovery make of a PLC."""

    async def connect(self) -> int:
        """Open the connection; the negotiated PDU size."""
        ...

    async def read(self, area: Area, db: int, start: int, count: int) -> bytes:
        """``count`` units (bytes, or timers/counters) of an area from ``start``."""
        ...

    async def write(self, area: Area, db: int, start: int, data: bytes) -> None:
        """Write bytes (or timer/counter words) at ``start``."""
        ...

    async def identity(self) -> Identity:
        """The CPU's order code, module name and state, as far as it tells."""
        ...

    async def data_blocks(self) -> list[int]:
        """The DB numbers; ``RefusedError`` when the PLC does not list its blocks."""
        ...

    async def block_size(self, db: int) -> int | None:
        """The size of a DB in bytes, ``None`` when the PLC does not say."""
        ...

    async def close(self) -> None:
        """Close the connection; never raises."""
        ...


ClientFactory = Callable[[S7SourceConfig], S7Client]


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        text = value.split(b"\0", 1)[0].decode("latin-1").strip()
        return text or None
    return str(value).strip() or None if value is not None else None


def access_reason(reason: str) -> str:
    """``reason``, with how to permit access when it is about access."""
    lowered = reason.lower()
    if any(word in lowered for word in _ACCESS_WORDS) or "accessing the object" in lowered:
        return f"{reason}; {PUT_GET_HINT}"
    return reason


class SnapClient:
    """``S7Client`` over python-snap7's asyncio client."""

    def __init__(self, config: S7SourceConfig) -> None:
        self.config = config
        self.endpoint = config.endpoint()
        self._client = AsyncClient()

    def _lost(self, exc: BaseException) -> ConnectorError:
        if isinstance(exc, TimeoutError):
            return ConnectorError(self.endpoint, f"no answer within {self.config.timeout:g} s",
                                  ErrorCategory.TRANSIENT)
        if isinstance(exc, S7ProtocolError):
            return ConnectorError(self.endpoint, f"not an S7 answer: {exc}",
                                  ErrorCategory.PROTOCOL)
        reason = str(exc) or type(exc).__name__
        return ConnectorError(self.endpoint, reason, ErrorCategory.TRANSIENT)

    async def connect(self) -> int:
        """Connect with the configured TSAPs and PDU size; the PDU size the PLC granted."""
        local, remote = self.config.tsaps
        client = self._client
        client.local_tsap = local
        client.set_connection_type(remote >> 8)
        client.pdu_length = self.config.pdu_size
        try:
            async with asyncio.timeout(self.config.timeout):
                await client.connect(self.config.host, (remote & 0xFF) >> 5, remote & 0x1F,
                                     self.config.port)
        except S7ProtocolError as exc:
            if _is_refusal(exc):
                raise ConnectorError(self.endpoint, access_reason(
                    f"the PLC refused the S7 connection: {_short(exc)}"),
                    ErrorCategory.AUTH) from exc
            raise self._lost(exc) from exc
        except (S7Error, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            if "COTP" in str(exc):
                # A PLC answers a connection request it will not serve with a disconnect.
                raise ConnectorError(
                    self.endpoint, f"the PLC refused the ISO connection ({exc}): check rack "
                    "and slot (or the TSAPs) and the connection type; if they are right, "
                    f"{PUT_GET_HINT}", ErrorCategory.AUTH) from exc
            raise self._lost(exc) from exc
        return client.get_pdu_length()

    async def read(self, area: Area, db: int, start: int, count: int) -> bytes:
        """One read request; ``RefusedError`` when the PLC refuses it."""
        try:
            async with asyncio.timeout(self.config.timeout):
                return bytes(await self._client.read_area(AREAS[area], db, start, count))
        except S7ProtocolError as exc:
            if _is_refusal(exc):
                raise RefusedError(access_reason(_short(exc))) from exc
            raise self._lost(exc) from exc
        except (S7Error, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise self._lost(exc) from exc

    async def write(self, area: Area, db: int, start: int, data: bytes) -> None:
        """One write request; ``RefusedError`` when the PLC refuses it."""
        try:
            async with asyncio.timeout(self.config.timeout):
                await self._client.write_area(AREAS[area], db, start, bytearray(data))
        except S7ProtocolError as exc:
            if _is_refusal(exc):
                raise RefusedError(access_reason(_short(exc))) from exc
            raise self._lost(exc) from exc
        except (S7Error, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise self._lost(exc) from exc

    async def identity(self) -> Identity:
        """Order code, module name and state; each that the PLC refuses is a note."""
        notes: list[str] = []
        order_code = module_name = module_type = serial = plant = state = None
        client = self._client
        try:
            async with asyncio.timeout(self.config.timeout):
                order = await client.get_order_code()
            order_code = _text(order.OrderCode)
            version = f"{order.V1}.{order.V2}.{order.V3}"
            if order_code and version != "0.0.0":
                order_code = f"{order_code} (firmware V{version})"
        except (S7Error, TimeoutError) as exc:
            notes.append(f"order code not readable: {_short(exc)}")
        try:
            async with asyncio.timeout(self.config.timeout):
                info = await client.get_cpu_info()
            module_name = _text(info.ModuleName)
            module_type = _text(info.ModuleTypeName)
            serial = _text(info.SerialNumber)
            plant = _text(info.ASName)
        except (S7Error, TimeoutError) as exc:
            notes.append(f"module identity not readable: {_short(exc)}")
        try:
            async with asyncio.timeout(self.config.timeout):
                raw_state = await client.get_cpu_state()
            state = {"S7CpuStatusRun": "RUN", "S7CpuStatusStop": "STOP"}.get(
                raw_state, raw_state.removeprefix("S7CpuStatus").upper())
        except (S7Error, TimeoutError) as exc:
            notes.append(f"CPU state not readable: {_short(exc)}")
        return Identity(order_code, module_name, module_type, serial, plant, state, notes)

    async def data_blocks(self) -> list[int]:
        """The DB numbers the PLC lists."""
        try:
            async with asyncio.timeout(self.config.timeout):
                numbers = await self._client.list_blocks_of_type(SnapBlock.DB, 0x2000)
        except (S7Error, TimeoutError) as exc:
            raise RefusedError(access_reason(_short(exc))) from exc
        return sorted(int(number) for number in numbers)

    async def block_size(self, db: int) -> int | None:
        """The DB's MC7 (work memory) size, ``None`` when the PLC does not say."""
        try:
            async with asyncio.timeout(self.config.timeout):
                info = await self._client.get_block_info(SnapBlock.DB, db)
        except (S7Error, TimeoutError):
            return None
        size = int(info.MC7Size)
        return size if size > 0 else None

    async def close(self) -> None:
        """Disconnect, ignoring a connection that is already gone."""
        with contextlib.suppress(S7Error, OSError):
            await self._client.disconnect()


def _is_refusal(exc: S7ProtocolError) -> bool:
    """Whether the PLC answered with a refusal (an item's return code, or an error class in
    the answer's header), rather than with something that is not an S7 answer."""
    text = str(exc)
    return "operation failed" in text or "error (class=0x" in text


def _short(exc: BaseException) -> str:
    """The message of a snap7 error without its generic prefix."""
    text = str(exc) or type(exc).__name__
    for prefix in ("Read operation failed: ", "Write operation failed: "):
        text = text.removeprefix(prefix)
    return text


def create_client(config: S7SourceConfig) -> S7Client:
    """The real client."""
    return SnapClient(config)
