"""Shared builders for the test suite, one module per kind (brokers, daemons, servers, events,
configurations); this module holds the smallest: free ports, the leftover-task assertion, a
source run in a task."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from bridge.core.model import Event, Quality, Reading
from bridge.core.source import Source, SourceContext, SourceUnit
from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError
from bridge.pipeline.supervisor import Backoff, supervise

WAIT = 10.0
"""Seconds any awaited condition may take before a test fails."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (prefer binding to port 0 where a server allows it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def assert_no_other_tasks() -> None:
    """Every task a test started is finished: only the test's own task is left."""
    current = asyncio.current_task()
    others = [task.get_name() for task in asyncio.all_tasks() if task is not current]
    assert not others, f"tasks left running: {others}"


@dataclass
class SourceRunner:
    """Runs one source in a task (``supervised``: under ``supervise``), mapping what it
    publishes into events."""

    unit: SourceUnit
    supervised: bool = False
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.05, maximum=0.2))
    status: EndpointStatus = field(init=False)
    readings: list[Reading] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    batches: int = 0
    task: asyncio.Task[None] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        source = self.unit.source
        self.status = EndpointStatus(name=source.id, kind="source", protocol=source.protocol,
                                     endpoint=source.endpoint)

    @property
    def source(self) -> Source:
        """The source under test."""
        return self.unit.source

    async def _publish(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)
        for reading in readings:
            self.events.extend(self.unit.mapper.map(reading))
        self.batches += 1
        self._wake.set()

    def start(self) -> None:
        """Run the source in a named task."""
        context = SourceContext(status=self.status, publish=self._publish)
        work = (supervise(self.unit.source, context, self.backoff) if self.supervised
                else self.unit.source.run(context))
        self.task = asyncio.create_task(work, name=f"test-run[{self.unit.source.id}]")
        self.task.add_done_callback(lambda _: self._wake.set())

    async def __aenter__(self) -> SourceRunner:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait (at most ``WAIT``) until ``condition()`` holds, re-checked on every publish."""
        task = self.task
        assert task is not None
        async with asyncio.timeout(WAIT):
            while not condition():
                if task.done():
                    raise AssertionError(f"the source stopped first: {task.exception()!r}")
                self._wake.clear()
                await self._wake.wait()

    def point_events(self, point: str) -> list[Event]:
        """Every event of ``point``, oldest first."""
        return [event for event in self.events if event.point == point]

    def latest(self, point: str) -> Event:
        """The last event of ``point``."""
        events = self.point_events(point)
        if not events:
            known = sorted({event.point for event in self.events})
            raise AssertionError(f"no event for {point}; got {known}")
        return events[-1]

    def has(self, point: str, *, quality: Quality | None = None, value: Any = None) -> bool:
        """Whether the last event of ``point`` has this quality (and value, when given)."""
        events = self.point_events(point)
        if not events:
            return False
        last = events[-1]
        return (quality is None or last.quality is quality) and (
            value is None or last.value == value)

    async def failure(self) -> ConnectorError:
        """Wait (at most ``WAIT``) for ``run`` to end; return the ``ConnectorError`` it raised."""
        task = self.task
        assert task is not None
        await asyncio.wait([task], timeout=WAIT)
        assert task.done(), "run() is still going"
        assert not task.cancelled(), "run() was cancelled"
        error = task.exception()
        assert isinstance(error, ConnectorError), f"expected ConnectorError, got {error!r}"
        return error

    async def stop(self) -> None:
        """Cancel the run and check that the cancellation came through, not swallowed."""
        task = self.task
        assert task is not None
        if task.done():
            if not task.cancelled():
                error = task.exception()  # retrieved: an expected failure is not "never retrieved"
                assert error is None or isinstance(error, ConnectorError), repr(error)
            return
        task.cancel()
        await asyncio.wait([task], timeout=WAIT)
        assert task.cancelled(), f"run() swallowed its cancellation: {task!r}"
