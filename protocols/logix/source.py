"""The Logix source: one EtherNet/IP connection, polled on a fixed grid.

pycomm3 is synchronous: every call to the client runs in the source's own thread, one at a
time, so a poll, a live read and a write never interleave on the connection.

What can go wrong and what follows:

- the controller refuses a tag (unknown name, wrong type, out of range): that item's points
  turn ``bad`` with a reason that names the tag, the source is ``degraded``;
- the connection cannot be opened, or stops answering: every point turns ``bad`` and ``run``
  raises ``ConnectorError`` so that the supervisor reconnects with backoff (``down``, then
  ``up`` again once it answers).

Imports ``bridge.core``, ``bridge.errors`` and the Logix config, points, mapping and client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from bridge.core.counters import CYCLES, OVERRUNS, REQUESTS
from bridge.core.model import Quality, Reading, Value
from bridge.core.source import Source, SourceContext
from bridge.errors import ConnectorError, ErrorCategory, ReadError, WriteError
from protocols.logix.client import (
    ClientError,
    ClientFactory,
    Declared,
    LogixClient,
    TagResult,
    create_client,
)
from protocols.logix.config import LogixPoint, LogixSourceConfig, split_element
from protocols.logix.mapping import PROTOCOL, LogixMapper, TagAddress
from protocols.logix.points import ReadItem, pack

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result")


def base_tag(tag: str) -> str:
    """The tag a path starts from: ``Program:Main.Motor`` for ``Program:Main.Motor.Speed``."""
    scope = ""
    if tag.startswith("Program:"):
        scope, _, tag = tag.partition(".")
        scope += "."
    return scope + tag.split(".")[0].split("[")[0]


def declared_types(points: Sequence[LogixPoint]) -> dict[str, Declared]:
    """Definitions of the atomic tags and arrays the points read, from their configured
    types (members and bits need the controller's own definitions)."""
    declared: dict[str, Declared] = {}
    for point in points:
        tag = point.tag
        if tag is None or point.type == "STRUCT":
            continue
        name = base_tag(tag)
        rest = tag[len(name):]
        located = split_element(tag)
        if located is not None and located[0] == name:
            previous = declared.get(name)
            elements = max(located[1] + 1, previous.elements if previous else 0)
            declared[name] = Declared(point.type, elements)
        elif not rest:
            declared.setdefault(name, Declared(point.type))
    return declared


class LogixSource(Source):
    """Polls the tags and CIP attributes of one EtherNet/IP target."""

    def __init__(
        self,
        config: LogixSourceConfig,
        items: Sequence[ReadItem],
        mapper: LogixMapper,
        points: dict[str, LogixPoint],
        *,
        client_factory: ClientFactory = create_client,
    ) -> None:
        super().__init__(source_id=config.id, protocol=PROTOCOL, endpoint=config.endpoint())
        self.config = config
        self.items = tuple(items)
        self._mapper = mapper
        self._points = points
        self._client_factory = client_factory
        self._client: LogixClient | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def _call(self, function: Callable[..., _Result], *arguments: Any) -> _Result:
        """Run one client call in the source's thread."""
        executor = self._executor
        if executor is None:
            raise ClientError("not connected")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, functools.partial(function, *arguments))

    async def run(self, context: SourceContext) -> None:
        """Connect, then poll until cancelled or the connection fails."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"logix[{self.id}]")
        client = self._client_factory(self.config)
        try:
            try:
                await self._call(client.open)
                if self.config.controller and client.tag_database() is None:
                    await self._call(client.declare, declared_types(
                        list(self._points.values())))
            except ClientError as exc:
                await self._all_bad(context, exc.reason)
                raise ConnectorError(self.endpoint, exc.reason,
                                     ErrorCategory.TRANSIENT) from exc
            packets = pack(self.items, client.connection_size)
            context.status.details["connection_size"] = client.connection_size
            context.status.details["requests_per_cycle"] = len(packets)
            context.status.details["tag_database"] = (
                "uploaded" if client.tag_database() is not None else "configured types")
            context.status.up()
            self._client = client
            await self._serve(context, client, packets)
        finally:
            self._client = None
            executor, self._executor = self._executor, None
            if executor is not None:
                executor.submit(client.close)
                executor.shutdown(wait=False)

    async def _serve(self, context: SourceContext, client: LogixClient,
                     packets: list[list[ReadItem]]) -> None:
        """Poll on a grid that never drifts; raise ``ConnectorError`` when the link fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        interval = self.config.interval
        while True:
            try:
                readings = await self.cycle(client, packets, context)
            except ClientError as exc:
                await self._all_bad(context, exc.reason)
                raise ConnectorError(self.endpoint, exc.reason,
                                     ErrorCategory.TRANSIENT) from exc
            await context.publish(readings)
            refused = next((reading for reading in readings
                            if reading.quality is Quality.BAD), None)
            if refused is None:
                context.status.success()
            else:
                context.status.degraded(refused.reason or "a tag was refused",
                                        ErrorCategory.DEVICE)
            now = loop.time()
            deadline += interval
            if deadline < now:
                missed = int((now - deadline) // interval) + 1
                context.status.counters.add(OVERRUNS, missed)
                deadline += missed * interval
            await asyncio.sleep(deadline - now)

    async def cycle(self, client: LogixClient, packets: Sequence[Sequence[ReadItem]],
                    context: SourceContext) -> list[Reading]:
        """Read every packet once: one reading per item."""
        readings: list[Reading] = []
        counters = context.status.counters
        for packet in packets:
            counters.add(REQUESTS)
            results = await self._read(client, packet)
            now = time.time()
            for item, result in zip(packet, results, strict=True):
                readings.append(self._reading(item, result, now))
        counters.add(CYCLES)
        return readings

    async def _read(self, client: LogixClient, packet: Sequence[ReadItem]) -> list[TagResult]:
        if len(packet) == 1 and packet[0].attribute:
            item = packet[0]
            point = next(point for point in self._points.values()
                         if point.cip is not None and str(point.cip) == item.request)
            if point.cip is None:  # excluded by the search above
                raise ClientError(f"no attribute {item.request}")
            return [await self._call(client.read_attribute, point.cip, item.type)]
        return await self._call(client.read_tags, [item.request for item in packet])

    def _reading(self, item: ReadItem, result: TagResult, now: float) -> Reading:
        address = TagAddress(item.request)
        if result.error is not None or result.value is None:
            what = "attribute" if item.attribute else "tag"
            reason = f"{what} {item.request}: {result.error or 'no value'}"
            return Reading(self.id, address, None, now, quality=Quality.BAD, reason=reason)
        return Reading(self.id, address, result.value, now)

    async def _all_bad(self, context: SourceContext, reason: str) -> None:
        """Every point turns bad: the connection is gone."""
        now = time.time()
        readings = [Reading(self.id, TagAddress(item.request), None, now, quality=Quality.BAD,
                            reason=reason) for item in self.items]
        if readings:
            await context.publish(readings)

    def _item_of(self, point_id: str, error: type[ReadError] | type[WriteError]) -> LogixPoint:
        point = self._points.get(point_id)
        if point is None:
            raise error(point_id, f"no such point in source {self.id}", ErrorCategory.CONFIG)
        return point

    async def read(self, point_id: str) -> list[Reading]:
        """Read one point now, between polls."""
        point = self._item_of(point_id, ReadError)
        client = self._client
        if client is None:
            raise ReadError(point_id, f"source {self.id} is not connected",
                            ErrorCategory.TRANSIENT)
        request = str(point.cip) if point.cip is not None else point.tag or ""
        item = ReadItem(request, point.type, attribute=point.cip is not None)
        try:
            results = await self._read(client, [item])
        except ClientError as exc:
            raise ReadError(point_id, exc.reason, ErrorCategory.TRANSIENT) from exc
        reading = self._reading(item, results[0], time.time())
        if reading.quality is Quality.BAD:
            raise ReadError(point_id, reading.reason or "not read", ErrorCategory.DEVICE)
        return [reading]

    async def write(self, point_id: str, value: Value) -> None:
        """Write a value to a point's tag: the inverse of its enum or scale is written.

        Whether the point may be written is the runtime's to check (``Runtime.write``).
        Raises ``WriteError``: ``config`` for an unknown point or a value it cannot hold,
        ``device`` when the controller refuses, ``transient`` when it is unreachable.
        """
        point = self._item_of(point_id, WriteError)
        encode = self._mapper.encoder(point_id)
        if encode is None or point.tag is None:
            raise WriteError(point_id, "only tags can be written", ErrorCategory.CONFIG)
        raw = encode(value)
        client = self._client
        if client is None:
            raise WriteError(point_id, f"source {self.id} is not connected",
                             ErrorCategory.TRANSIENT)
        try:
            refused = await self._call(client.write_tag, point.tag, raw)
        except ClientError as exc:
            raise WriteError(point_id, exc.reason, ErrorCategory.TRANSIENT) from exc
        if refused is not None:
            raise WriteError(point_id, f"tag {point.tag}: {refused}", ErrorCategory.DEVICE)
