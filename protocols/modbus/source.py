"""The Modbus source: one client connection, a poll task per device.

Devices sharing the connection take turns through one lock: a serial bus carries one
request at a time, and a TCP gateway is safest used the same way. Separate sources poll
concurrently.

Per request the client waits ``timeout`` and repeats ``retries`` times. What can go wrong
and what follows:

- an exception response: that block's points turn ``bad``, the device is ``degraded`` and
  keeps being polled; an illegal address (2, or 3) in a block of several points first splits
  the block, so that only the refused points turn ``bad``, and the device's plan learns the
  hole (``protocols.modbus.holes``);
- no answer: the rest of the device's cycle is skipped, its points turn ``bad``, the device
  is ``down``; it comes back ``up`` by itself when it answers again;
- bytes that are not a Modbus answer: as no answer, with the ``protocol`` category;
- the connection closes or cannot be opened: every point turns ``bad`` and ``run`` raises
  ``ConnectorError`` so that the supervisor reconnects with backoff.

The requests themselves, and what their failures mean, are the client wrapper's
(``protocols.modbus.client``).

Imports ``bridge.core``, ``bridge.errors`` and the Modbus config, mapping, planner, holes
and client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence

from bridge.core.counters import (
    CYCLES,
    EXCEPTIONS,
    OVERRUNS,
    PROTOCOL_ERRORS,
    REQUESTS,
    RESPONSES,
    TIMEOUTS,
    CounterSpec,
)
from bridge.core.model import Quality, Reading, Value
from bridge.core.source import Source, SourceContext
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory, ReadError, WriteError
from protocols.modbus.client import (
    FAILURE_CATEGORY,
    SKIPS_CYCLE,
    ClientFactory,
    Connection,
    FailureKind,
    Outcome,
    create_client,
    open_client,
)
from protocols.modbus.config import ModbusSourceConfig
from protocols.modbus.holes import HOLE_CODES, DevicePlan, describe
from protocols.modbus.mapping import PROTOCOL, BlockAddress, PointLocation
from protocols.modbus.planner import Block

logger = logging.getLogger(__name__)

_FAILURE_COUNTERS: dict[FailureKind, CounterSpec] = {
    "exception": EXCEPTIONS, "gateway": EXCEPTIONS, "timeout": TIMEOUTS,
    "garbled": PROTOCOL_ERRORS}
"""The counter of a request that failed, by how it failed."""


def _is_hole(outcome: Outcome) -> bool:
    """Whether a request was refused for an address the device does not serve."""
    return outcome.failure == "exception" and outcome.code in HOLE_CODES


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
        self._connection: Connection | None = None
        self._units = {plan.id: plan.unit for plan in self.devices}
        self._failing: dict[str, None] = {}
        """Devices now degraded or down, oldest first (kept as they change: a poll must not
        walk every device of the connection)."""

    def device_endpoints(self) -> dict[str, str]:
        """Each device as ``<endpoint>?unit=<id>``."""
        return {plan.id: f"{self.endpoint}?unit={plan.unit}" for plan in self.devices}

    async def run(self, context: SourceContext) -> None:
        """Connect, then poll every device until cancelled or the connection fails."""
        connection = Connection(self.endpoint, self.id, self.config.retries + 1)
        client = self._client_factory(self.config, connection.hooks())
        connection.client = client
        for device, endpoint in self.device_endpoints().items():
            context.status.child(device, endpoint)
        try:
            try:
                await open_client(client, self.config)
            except ConnectorError as exc:
                await self._all_bad(context, exc.reason, exc.category)
                raise
            context.status.up()
            self._connection = connection
            error = await self._serve(context, connection)
            await self._all_bad(context, error.reason, error.category)
            raise error
        finally:
            self._connection = None
            client.close()

    async def _serve(self, context: SourceContext, connection: Connection) -> ConnectorError:
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
        self, plan: DevicePlan, connection: Connection, context: SourceContext,
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
                    status.counters.add(OVERRUNS, missed)
                    context.status.counters.add(OVERRUNS, missed)
            await asyncio.sleep(deadline - now)

    async def _cycle(
        self,
        plan: DevicePlan,
        connection: Connection,
        source_status: EndpointStatus,
        status: EndpointStatus,
    ) -> tuple[list[Reading], Outcome | None]:
        """Read every block of a device once; the worst failure decides its state.

        A block refused for an address inside it is split until only the points the device
        refuses are left, and the device's plan learns the parts (``DevicePlan.learn``).
        """
        readings: list[Reading] = []
        worst: Outcome | None = None
        for block in plan.blocks:
            if worst is not None and worst.failure in SKIPS_CYCLE:
                readings.append(self._bad(plan, block, worst.reason))
                continue
            outcome = await self._request(connection, block, plan.unit, source_status, status)
            parts = [(block, outcome)]
            if _is_hole(outcome) and plan.split(block) is not None:
                parts = await self._narrow(plan, block, connection, source_status, status)
                if all(part.failure is None or _is_hole(part) for _, part in parts):
                    self._learn(plan, block, parts, status)
            for part, result in parts:
                if result.values is not None:
                    if plan.read(part):
                        status.details["plan"] = plan.details()
                    readings.append(Reading(self.id, BlockAddress(
                        plan.id, part.table, part.start, part.count), result.values,
                        time.time()))
                    continue
                readings.append(self._bad(plan, part, result.reason))
                if worst is None or (result.failure in SKIPS_CYCLE
                                     and worst.failure not in SKIPS_CYCLE):
                    worst = result
        for counters in (status.counters, source_status.counters):
            counters.add(CYCLES)
        return readings, worst

    async def _narrow(
        self,
        plan: DevicePlan,
        refused: Block,
        connection: Connection,
        source_status: EndpointStatus,
        status: EndpointStatus,
    ) -> list[tuple[Block, Outcome]]:
        """Split a refused block in halves, and a refused half again, until each part reads
        or holds a single point. A failure that is not about addresses stops the splitting:
        the parts not yet read carry it."""
        parts: list[tuple[Block, Outcome]] = []
        pending = list(plan.split(refused) or ())
        stopped: Outcome | None = None
        while pending:
            block = pending.pop(0)
            if stopped is not None:
                parts.append((block, stopped))
                continue
            outcome = await self._request(connection, block, plan.unit, source_status, status)
            halves = plan.split(block) if _is_hole(outcome) else None
            if halves is not None:
                pending[:0] = halves
                continue
            parts.append((block, outcome))
            if outcome.failure is not None and not _is_hole(outcome):
                stopped = outcome
        return parts

    def _learn(self, plan: DevicePlan, refused: Block, parts: list[tuple[Block, Outcome]],
               status: EndpointStatus) -> None:
        """Poll around the addresses the device refused from now on, and say so once."""
        plan.learn(refused, [(block, outcome.reason) for block, outcome in parts])
        status.details["plan"] = plan.details()
        refusing = [describe(block) for block, outcome in parts if outcome.failure is not None]
        logger.info("device %s refuses reads across %s; polling around it in %d requests%s",
                    plan.id, describe(refused), len(plan.blocks),
                    f" ({', '.join(refusing)} unreadable)" if refusing else "")

    def _bad(self, plan: DevicePlan, block: Block, reason: str | None) -> Reading:
        """A bad reading for a block that was not read."""
        return Reading(self.id, BlockAddress(plan.id, block.table, block.start, block.count),
                       None, time.time(), quality=Quality.BAD, reason=reason)

    @staticmethod
    async def _request(
        connection: Connection,
        block: Block,
        unit: int,
        source_status: EndpointStatus,
        status: EndpointStatus,
    ) -> Outcome:
        """One counted request."""
        counted = (status.counters, source_status.counters)
        for counters in counted:
            counters.add(REQUESTS)
        outcome = await connection.read(block, unit)
        counter = RESPONSES if outcome.failure is None else _FAILURE_COUNTERS[outcome.failure]
        for counters in counted:
            counters.add(counter)
        return outcome

    def _report(
        self,
        source_status: EndpointStatus,
        status: EndpointStatus,
        failure: Outcome | None,
    ) -> None:
        """Move the device's state, then the source's (degraded while a device fails)."""
        if failure is None:
            status.success()
        else:
            reason = failure.reason or "failed"
            category = FAILURE_CATEGORY[failure.failure or "exception"]
            if failure.failure in SKIPS_CYCLE:
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
            raise ReadError(point_id, f"no such point in source {self.id}",
                             ErrorCategory.CONFIG)
        connection = self._connection
        if connection is None:
            raise ReadError(point_id, f"source {self.id} is not connected",
                             ErrorCategory.TRANSIENT)
        span = location.span
        block = Block(span.table, span.start, span.count)
        address = BlockAddress(location.device, block.table, block.start, block.count)
        try:
            outcome = await connection.read(block, self._units[location.device])
        except ConnectorError as exc:
            raise ReadError(point_id, exc.reason, exc.category) from exc
        if outcome.values is None:
            return [Reading(self.id, address, None, time.time(), quality=Quality.BAD,
                            reason=outcome.reason)]
        return [Reading(self.id, address, outcome.values, time.time())]

    async def write(self, point_id: str, value: Value) -> None:
        """Write a value to a point: the inverse of its enum or scale is written.

        Whether the point may be written is the runtime's to check (``Runtime.write``).
        Raises ``WriteError``: ``config`` for an unknown point or a value it cannot hold,
        ``device`` when the device refuses, ``transient`` when it is unreachable.
        """
        location = self._locations.get(point_id)
        if location is None:
            raise WriteError(point_id, f"no such point in source {self.id}",
                             ErrorCategory.CONFIG)
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
                             FAILURE_CATEGORY[outcome.failure])
