"""A connector distribution: a counter source (``tick``) and a JSON Lines sink (``jsonl``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TextIO

from pydantic import Field

from bridge.config.models import (
    Duration,
    PointBase,
    ReportSpec,
    ResolvedPoint,
    SinkBase,
    SourceBase,
)
from bridge.config.yamlsource import KeyPath
from bridge.core.mapping import PointProgram
from bridge.core.model import Event, Reading
from bridge.core.sink import BrokerSink, EventSelector, OutboxRow, Sink, SinkLink
from bridge.core.source import BuildContext, Source, SourceContext, SourceUnit
from bridge.registry import ProtocolSpec

# --- the source ---------------------------------------------------------------------------


class TickPoint(PointBase):
    """A counter: ``start``, then ``step`` more every interval."""

    start: float = Field(default=0.0, description="The first value.")
    step: float = Field(default=1.0, description="Added every interval.")


class TickSourceConfig(SourceBase):
    """A source of counters."""

    protocol: Literal["tick"]
    interval: Duration = Field(default=0.1, description="Seconds between two readings.")
    points: list[TickPoint] = Field(default_factory=list, description="The counters.")


def tick_points(source: SourceBase, path: KeyPath) -> list[ResolvedPoint]:
    """The source's own points, with ids ``<source id>.<name>``."""
    assert isinstance(source, TickSourceConfig)
    return [ResolvedPoint(id=f"{source.id}.{point.name}", source=source.id, device=None,
                          spec=point, tags={**source.tags, **point.tags},
                          report=ReportSpec().merged(point.report),
                          path=(*path, "points", index))
            for index, point in enumerate(source.points)]


class TickMapper:
    """Each reading's address is a point id; its value the counter."""

    def __init__(self, points: Sequence[ResolvedPoint], bridge_id: str) -> None:
        self.programs = {point.id: PointProgram(point, protocol="tick", bridge_id=bridge_id)
                         for point in points}

    def map(self, reading: Reading) -> list[Event]:
        """The counter's event, unless report-by-exception holds it back."""
        event = self.programs[str(reading.address)].produce(
            reading.value, received_at=reading.received_at)
        return [] if event is None else [event]


class TickSource(Source):
    """Hands on one reading per counter every interval."""

    def __init__(self, config: TickSourceConfig, points: Sequence[ResolvedPoint]) -> None:
        super().__init__(source_id=config.id, protocol="tick", endpoint=f"tick://{config.id}")
        self.interval = config.interval
        self.counters = {point.id: point.spec for point in points}

    async def run(self, context: SourceContext) -> None:
        """Count until cancelled."""
        context.status.up()
        count = 0
        while True:
            now = time.time()
            readings = []
            for point_id, spec in self.counters.items():
                assert isinstance(spec, TickPoint)
                readings.append(Reading(source=self.id, address=point_id,
                                        value=spec.start + count * spec.step, received_at=now))
            await context.publish(readings)
            count += 1
            await asyncio.sleep(self.interval)


def build_tick(source: SourceBase, points: Sequence[ResolvedPoint],
               context: BuildContext) -> SourceUnit:
    """The source and its compiled mapping."""
    assert isinstance(source, TickSourceConfig)
    return SourceUnit(source=TickSource(source, points),
                      mapper=TickMapper(points, context.bridge_id))


TICK = ProtocolSpec(name="tick", source_model=TickSourceConfig, build=build_tick,
                    source_points=tick_points)
"""The ``tick`` protocol: a source only."""

# --- the sink -----------------------------------------------------------------------------


class JsonLinesSinkConfig(SinkBase):
    """Append every event to a file, one JSON object a line."""

    protocol: Literal["jsonl"]
    path: Path = Field(description="The file; relative to the configuration file.")


class JsonLinesSink(BrokerSink):
    """Appends the rows the delivery engine hands it to a file, and confirms what it wrote."""

    def __init__(self, config: JsonLinesSinkConfig, context: BuildContext) -> None:
        self.path = context.resolve(config.path)
        super().__init__(sink_id=config.id, protocol="jsonl", endpoint=str(self.path),
                         selector=EventSelector.of(config))
        self.window = 500
        self._file: TextIO | None = None
        self._link: SinkLink | None = None

    def address(self, event: Event) -> str:
        """Every event goes to the one file."""
        return ""

    async def connect(self, link: SinkLink) -> None:
        """Open the file for appending."""
        self._link = link
        self._file = await asyncio.to_thread(self.path.open, "a", encoding="utf-8")

    def publish(self, rows: Sequence[OutboxRow]) -> None:
        """Write the rows, flush, and confirm them."""
        assert self._file is not None
        assert self._link is not None
        self._file.writelines(f"{row.body}\n" for row in rows)
        self._file.flush()
        self._link.confirmed([row.seq for row in rows])

    async def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


def build_jsonl(config: SinkBase, context: BuildContext) -> Sink:
    """The sink for one configured ``jsonl`` sink."""
    assert isinstance(config, JsonLinesSinkConfig)
    return JsonLinesSink(config, context)


JSONL = ProtocolSpec(name="jsonl", sink_model=JsonLinesSinkConfig, build_sink=build_jsonl)
"""The ``jsonl`` protocol: a sink only."""
