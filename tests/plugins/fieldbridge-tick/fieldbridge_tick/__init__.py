"""A connector distribution: a counter source (``tick``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from bridge.config.models import (
    Duration,
    PointBase,
    ReportSpec,
    ResolvedPoint,
    SourceBase,
)
from bridge.config.yamlsource import KeyPath
from bridge.core.mapping import PointProgram
from bridge.core.model import Event, Reading
from bridge.core.source import BuildContext, Source, SourceContext, SourceUnit
from bridge.registry import ProtocolSpec


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
