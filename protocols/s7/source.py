"""The S7 source: one connection to a PLC, its points polled in planned block reads.

The plan is made when the connection is up, for the PDU size the PLC granted: each block
fits one read response. What can go wrong and what follows:

- the PLC refuses a block (a DB that does not exist, an address past an area's end, no
  access): that block's points turn ``bad`` with a reason naming each point's address, the
  source is ``degraded``; a refused block of several points is replaced by one read per
  point from then on, so only the points the PLC refuses stay ``bad``;
- the connection fails (no answer, closed, refused): every point turns ``bad`` and ``run``
  raises ``ConnectorError``; the supervisor turns the source ``down`` and reconnects with
  backoff.

A written BOOL changes its one bit: the byte is read, the bit set or cleared, and the byte
written back, with no other request of this source in between.

Imports ``bridge.core``, ``bridge.errors`` and the S7 client, config, mapping and planner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from bridge.core.counters import CYCLES, EXCEPTIONS, OVERRUNS, REQUESTS, RESPONSES
from bridge.core.model import Quality, Reading, Value
from bridge.core.source import Source, SourceContext
from bridge.errors import ConnectorError, ErrorCategory, ReadError, WriteError
from protocols.s7.client import ClientFactory, RefusedError, S7Client, create_client
from protocols.s7.config import PROTOCOL, READ_OVERHEAD, S7SourceConfig
from protocols.s7.mapping import PointLocation
from protocols.s7.planner import Block, plan

logger = logging.getLogger(__name__)


class S7Source(Source):
    """Polls one PLC and publishes one reading per block read."""

    def __init__(
        self,
        config: S7SourceConfig,
        spans: Sequence[Block],
        *,
        locations: Mapping[str, PointLocation] | None = None,
        client_factory: ClientFactory = create_client,
    ) -> None:
        super().__init__(source_id=config.id, protocol=PROTOCOL, endpoint=config.endpoint())
        self.config = config
        self.spans = tuple(spans)
        self.blocks: list[Block] = []
        """The current plan (made on connecting)."""
        self.pdu_size: int | None = None
        """The PDU size the PLC granted on the last connection."""
        self._locations = dict(locations or {})
        self._client_factory = client_factory
        self._client: S7Client | None = None
        self._lock = asyncio.Lock()
        self._split: set[Block] = set()
        """Blocks the PLC refused, read point by point from then on."""

    def make_plan(self, pdu_size: int) -> list[Block]:
        """The blocks for a PDU of ``pdu_size`` bytes, refused blocks read point by point."""
        blocks = plan(self.spans, max_gap=self.config.max_gap,
                      max_bytes=pdu_size - READ_OVERHEAD)
        planned: list[Block] = []
        for block in blocks:
            if block in self._split:
                planned.extend(sorted({span for span in self.spans if block.covers(span)}))
            else:
                planned.append(block)
        return planned

    async def run(self, context: SourceContext) -> None:
        """Connect, plan, then poll until cancelled or the connection fails."""
        client = self._client_factory(self.config)
        status = context.status
        try:
            try:
                pdu_size = await client.connect()
            except ConnectorError as exc:
                await self._all_bad(context, exc.reason)
                raise
            self.pdu_size = pdu_size
            self.blocks = self.make_plan(pdu_size)
            status.details["pdu_size"] = pdu_size
            status.details["requests_per_cycle"] = len(self.blocks)
            status.up()
            self._client = client
            try:
                await self._poll(client, context)
            except ConnectorError as exc:
                await self._all_bad(context, exc.reason)
                raise
        finally:
            self._client = None
            await client.close()

    async def _poll(self, client: S7Client, context: SourceContext) -> None:
        """Poll on a fixed grid: deadlines advance by the interval, never drift."""
        loop = asyncio.get_running_loop()
        interval = self.config.interval
        deadline = loop.time()
        while True:
            readings, refused = await self.cycle(client, context)
            await context.publish(readings)
            if refused is None:
                context.status.up()
            else:
                context.status.degraded(refused, ErrorCategory.DEVICE)
            now = loop.time()
            deadline += interval
            if deadline < now:
                missed = int((now - deadline) // interval) + 1
                context.status.counters.add(OVERRUNS, missed)
                deadline += missed * interval
            await asyncio.sleep(deadline - now)

    async def cycle(self, client: S7Client,
                    context: SourceContext) -> tuple[list[Reading], str | None]:
        """Read every block once: the readings, and the first refusal's reason if any."""
        readings: list[Reading] = []
        first_refusal: str | None = None
        counters = context.status.counters
        pending = list(self.blocks)
        while pending:
            block = pending.pop(0)
            counters.add(REQUESTS)
            try:
                async with self._lock:
                    data = await client.read(block.area, block.db, block.start, block.count)
            except RefusedError as exc:
                counters.add(EXCEPTIONS)
                parts = sorted({span for span in self.spans if block.covers(span)})
                if len(parts) > 1 and block not in self._split:
                    self._split.add(block)
                    self.blocks = self.make_plan(self.pdu_size or self.config.pdu_size)
                    context.status.details["requests_per_cycle"] = len(self.blocks)
                    logger.info("source %s: the PLC refuses %s (%s); reading its %d points "
                                "one by one", self.id, block, exc.reason, len(parts))
                    pending[:0] = parts
                    continue
                if first_refusal is None:
                    first_refusal = f"{block}: {exc.reason}"
                readings.append(Reading(self.id, block, None, time.time(),
                                        quality=Quality.BAD, reason=exc.reason))
                continue
            counters.add(RESPONSES)
            readings.append(Reading(self.id, block, data, time.time()))
        counters.add(CYCLES)
        return readings, first_refusal

    async def _all_bad(self, context: SourceContext, reason: str) -> None:
        """Every point turns bad: the connection is gone."""
        now = time.time()
        blocks = self.blocks or self.make_plan(self.config.pdu_size)
        readings = [Reading(self.id, block, None, now, quality=Quality.BAD, reason=reason)
                    for block in blocks]
        if readings:
            await context.publish(readings)

    def _connected(self, point_id: str, error: type[ReadError] | type[WriteError]
                   ) -> tuple[PointLocation, S7Client]:
        location = self._locations.get(point_id)
        if location is None:
            raise error(point_id, f"no such point in source {self.id}", ErrorCategory.CONFIG)
        client = self._client
        if client is None:
            raise error(point_id, f"source {self.id} is not connected", ErrorCategory.TRANSIENT)
        return location, client

    async def read(self, point_id: str) -> list[Reading]:
        """Read one point now, between poll requests."""
        location, client = self._connected(point_id, ReadError)
        span = location.span
        try:
            async with self._lock:
                data = await client.read(span.area, span.db, span.start, span.count)
        except RefusedError as exc:
            return [Reading(self.id, span, None, time.time(), quality=Quality.BAD,
                            reason=exc.reason)]
        except ConnectorError as exc:
            raise ReadError(point_id, exc.reason, exc.category) from exc
        return [Reading(self.id, span, data, time.time())]

    async def write(self, point_id: str, value: Value) -> None:
        """Write a value: the inverse of its enum or scale, encoded; a BOOL changes its bit.

        Whether the point may be written is the runtime's to check (``Runtime.write``).
        Raises ``WriteError``: ``config`` for a value the point cannot hold, ``device`` when
        the PLC refuses, ``transient`` when it is unreachable.
        """
        location, client = self._connected(point_id, WriteError)
        span = location.span
        try:
            async with self._lock:
                current = b""
                if location.location.data_type == "BOOL":
                    current = await client.read(span.area, span.db, span.start, 1)
                try:
                    payload = location.encode(value, current)
                except ValueError as exc:
                    raise WriteError(point_id, str(exc), ErrorCategory.CONFIG) from None
                await client.write(span.area, span.db, span.start, payload)
        except RefusedError as exc:
            raise WriteError(point_id, f"{location.location.classic()}: {exc.reason}",
                             exc.category) from exc
        except ConnectorError as exc:
            raise WriteError(point_id, exc.reason, exc.category) from exc
