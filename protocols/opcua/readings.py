"""OPC-UA values on their way in: a node's DataValue as a reading (quality from its status
code, time from its timestamps), the nodes that cannot be served, and the hand-over of
readings in batches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from asyncua import ua

from bridge.core.model import Quality, Reading
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ErrorCategory
from protocols.opcua.mapping import variant_value

UNAVAILABLE_STATUSES = frozenset({
    "BadNodeIdUnknown", "BadNodeIdInvalid", "BadNotReadable", "BadUserAccessDenied",
    "BadAttributeIdInvalid", "BadNotSupported", "BadFilterNotAllowed",
    "BadMonitoredItemFilterUnsupported", "BadMonitoredItemFilterInvalid",
    "BadDeadbandFilterInvalid", "BadIndexRangeNoData", "BadNoMatch", "BadBrowseNameInvalid",
    "BadNotFound",
})
"""Statuses that say a node cannot be served as configured (rather than a bad value)."""


def quality_of(status: ua.StatusCode | None) -> tuple[Quality, str | None]:
    """Good → good, Uncertain → uncertain, Bad → bad; the status name is the reason."""
    if status is None or status.value == 0:
        return Quality.GOOD, None
    if status.is_bad():
        return Quality.BAD, status.name
    if status.is_uncertain():
        return Quality.UNCERTAIN, status.name
    return Quality.GOOD, None


def timestamp_of(moment: datetime | None) -> float | None:
    """POSIX seconds of an OPC-UA DateTime; the null DateTime (year 1601) means none."""
    if moment is None or moment.year <= 1601:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def reading_of(source_id: str, address: str, data: ua.DataValue | None,
               received_at: float) -> Reading:
    """A reading from a node's DataValue: value, source time, quality from its status."""
    if data is None:
        return Reading(source=source_id, address=address, value=None,
                       received_at=received_at, quality=Quality.BAD, reason="no value")
    quality, reason = quality_of(data.StatusCode)
    value = variant_value(data.Value)
    ts = timestamp_of(data.SourceTimestamp) or timestamp_of(data.ServerTimestamp)
    return Reading(source=source_id, address=address,
                   value=None if quality is Quality.BAD else value,
                   received_at=received_at, ts=ts, quality=quality, reason=reason)


_Item = TypeVar("_Item")


def chunked(items: Sequence[_Item], size: int) -> list[Sequence[_Item]]:
    """``items`` in consecutive slices of at most ``size``."""
    return [items[start:start + size] for start in range(0, len(items), size)]


@dataclass
class NodeHealth:
    """Nodes that cannot be served as configured; the source is degraded while there are any."""

    problems: dict[str, str] = field(default_factory=dict)

    def note(self, reading: Reading) -> None:
        """Track a node's availability from what a reading says about it."""
        if reading.quality is Quality.BAD and reading.reason in UNAVAILABLE_STATUSES:
            self.problems[str(reading.address)] = reading.reason
        else:
            self.problems.pop(str(reading.address), None)

    def report(self, status: EndpointStatus, total: int) -> None:
        """Move the status to degraded or up as the problems say, recording changes only."""
        if not self.problems:
            status.details.pop("unavailable", None)
            status.success()
            return
        listed = [f"{address} ({reason})" for address, reason in self.problems.items()]
        shown = ", ".join(listed[:3]) + (", ..." if len(listed) > 3 else "")
        summary = f"{len(listed)} of {total} nodes unavailable: {shown}"
        if status.state is not ConnectionState.DEGRADED or status.last_error != summary:
            status.details["unavailable"] = listed
            status.degraded(summary, ErrorCategory.CONFIG)
        status.last_success = time.time()


class PendingReadings:
    """Readings collected without awaiting and handed over in batches to one publishing task."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._readings: list[Reading] = []
        self._ready = asyncio.Event()
        self._room = asyncio.Event()

    async def put(self, reading: Reading) -> None:
        """Add a reading; waits only when ``limit`` readings are already waiting."""
        while len(self._readings) >= self._limit:
            self._room.clear()
            await self._room.wait()
        self._readings.append(reading)
        self._ready.set()

    async def take(self) -> list[Reading]:
        """Everything collected since the last call, once there is something."""
        await self._ready.wait()
        self._ready.clear()
        readings, self._readings = self._readings, []
        self._room.set()
        return readings
