"""Requests to one BACnet device: properties read with ReadPropertyMultiple in batches that
fit the device's APDU, or with ReadProperty one by one, and the answers as results.

bacpypes3 raises a device's Error, Reject and Abort answers as ``BaseException``s; they are
caught here and turned into a result's error (a property the device refuses), a
``DeviceGone`` (no answer at all), or a smaller batch (an answer too long to send).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bacpypes3.apdu import AbortPDU, ErrorRejectAbortNack
from bacpypes3.app import Application
from bacpypes3.basetypes import ErrorType
from bacpypes3.pdu import Address
from bacpypes3.primitivedata import ObjectIdentifier, PropertyIdentifier

PROPERTY_BYTES = 24
"""What one property costs in a ReadPropertyMultiple answer, at most for the scalar values
points read (identifiers, tags and a value of up to 8 bytes), rounded up."""
HEADER_BYTES = 16
SEGMENTS = 16
"""Segments a batch may take when the device sends segmented answers; a device that accepts
fewer says so with an abort, and the batch is split."""
MAX_BATCH = 512


class DeviceGone(Exception):  # noqa: N818 - a condition, not a failure of the bridge
    """The device did not answer (no I-Am, or a request timed out)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Item:
    """One property of one object."""

    object: ObjectIdentifier
    property: PropertyIdentifier

    def __str__(self) -> str:
        return f"{self.object[0]},{self.object[1]} {self.property}"


@dataclass(frozen=True)
class Result:
    """A property's value, or why the device did not give it."""

    value: Any = None
    error: str | None = None


def batch_size(max_apdu: int, segmentation: str) -> int:
    """Properties per ReadPropertyMultiple for a device's max APDU and segmentation."""
    budget = max(max_apdu, 50) - HEADER_BYTES
    if segmentation in ("segmented-both", "segmented-transmit"):
        budget *= SEGMENTS
    return max(1, min(MAX_BATCH, budget // PROPERTY_BYTES))


def refusal(error: BaseException) -> str:
    """What a device's Error, Reject or Abort says, as a reason."""
    code = getattr(error, "errorCode", None)
    if code is not None:
        return str(code)
    reason = getattr(error, "apduAbortRejectReason", None)
    return str(reason) if reason is not None else type(error).__name__


def _no_answer(error: BaseException) -> bool:
    return isinstance(error, AbortPDU) and str(error.apduAbortRejectReason) == "no-response"


def _too_long(error: BaseException) -> bool:
    return isinstance(error, AbortPDU) and str(error.apduAbortRejectReason) in (
        "segmentation-not-supported", "buffer-overflow", "apdu-too-long")


class DeviceReader:
    """Reads properties of one device at its current address, counting requests."""

    def __init__(self, app: Application, *, timeout: float, retries: int) -> None:
        self.app = app
        self.limit = timeout * (retries + 1) + 1.0
        """The longest a request can take before bacpypes3 gives up on it, and a second."""
        self.requests = 0

    async def call(self, address: Address, request: Any) -> Any:
        """Await one request, counted, bounded in time (``DeviceGone`` past it)."""
        self.requests += 1
        try:
            async with asyncio.timeout(self.limit):
                return await request
        except TimeoutError as exc:
            raise DeviceGone(f"no answer from {address} within {self.limit:g} s") from exc

    async def read_one(self, address: Address, item: Item) -> Result:
        """One property with ReadProperty."""
        try:
            value = await self.call(address, self.app.read_property(
                address, item.object, item.property))
        except ErrorRejectAbortNack as error:
            if _no_answer(error):
                raise DeviceGone(f"no answer from {address}") from None
            return Result(error=refusal(error))
        if isinstance(value, ErrorRejectAbortNack):
            return Result(error=refusal(value))
        if isinstance(value, str) and value.startswith("-no "):
            return Result(error="unknown property type")
        return Result(value=value)

    async def read(self, address: Address, items: Sequence[Item], *, multiple: bool,
                   per_request: int) -> dict[Item, Result]:
        """Every item's result; ReadPropertyMultiple in batches when ``multiple``."""
        results: dict[Item, Result] = {}
        if not multiple:
            for item in items:
                results[item] = await self.read_one(address, item)
            return results
        for start in range(0, len(items), per_request):
            results.update(await self._read_batch(address, items[start:start + per_request]))
        return results

    async def _read_batch(self, address: Address, items: Sequence[Item]) -> dict[Item, Result]:
        grouped: dict[ObjectIdentifier, list[PropertyIdentifier]] = {}
        for item in items:
            grouped.setdefault(item.object, []).append(item.property)
        parameters: list[Any] = []
        for object_id, properties in grouped.items():
            parameters.extend((object_id, list(properties)))
        try:
            answers = await self.call(address, self.app.read_property_multiple(
                address, parameters))
        except ErrorRejectAbortNack as error:
            if _no_answer(error):
                raise DeviceGone(f"no answer from {address}") from None
            if _too_long(error) and len(items) > 1:
                half = len(items) // 2
                first = await self._read_batch(address, items[:half])
                return first | await self._read_batch(address, items[half:])
            # A device without ReadPropertyMultiple, or one that refuses the whole request
            # for one bad property: read one by one to know which.
            return {item: await self.read_one(address, item) for item in items}
        results = {item: Result(error="missing from the answer") for item in items}
        for object_id, property_id, _index, value in answers or ():
            item = Item(object_id, property_id)
            if isinstance(value, ErrorType):
                results[item] = Result(error=str(value.errorCode))
            elif value is None:
                results[item] = Result(error="unknown property type")
            else:
                results[item] = Result(value=value)
        return results
