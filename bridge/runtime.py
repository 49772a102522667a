"""The runtime: builds sources and sinks from the config and runs them, the router and the
API."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.config.loader import load_config
from bridge.config.models import Config, ResolvedPoint, SourceBase
from bridge.core.model import Reading
from bridge.core.status import EndpointStatus
from bridge.errors import ConfigError
from bridge.pipeline.notify import notify, watchdog_interval
from bridge.pipeline.outbox import Outbox, OutboxLimits
from bridge.pipeline.router import Router
from bridge.pipeline.sink import Sink, SinkContext, SinkOutbox
from bridge.pipeline.source import BuildContext, SourceContext, SourceUnit, map_readings
from bridge.pipeline.store import Retention, Store
from bridge.pipeline.supervisor import Backoff, source_status, supervise
from bridge.registry import protocols

logger = logging.getLogger(__name__)


@dataclass
class RunningSource:
    """A configured source with its compiled mapping and live status."""

    unit: SourceUnit
    status: EndpointStatus
    enabled: bool


@dataclass
class RunningSink:
    """A configured sink and its live status."""

    sink: Sink
    status: EndpointStatus
    enabled: bool


class Runtime:
    """One Fieldbridge instance: sources, router, store, sinks and API, for one configuration."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.bridge_id = config.bridge.id
        registry = protocols()
        context = BuildContext(bridge_id=self.bridge_id, state_dir=config.state_dir,
                               config_dir=config.path.parent)
        self.sinks: dict[str, RunningSink] = {}
        for sink_config in config.sinks:
            build_sink = registry[sink_config.protocol].build_sink
            assert build_sink is not None  # the config model exists only with a builder
            sink = build_sink(sink_config, context)
            if sink_config.workers:
                from bridge.pipeline.worker import SinkWorker, SinkWorkerSpec

                sink = SinkWorker(sink, SinkWorkerSpec(sink_config, self.bridge_id,
                                                       config.state_dir, config.path.parent))
            status = EndpointStatus(name=sink.id, kind="sink", protocol=sink.protocol,
                                    endpoint=sink.endpoint)
            if not sink_config.enabled:
                status.disabled()
            self.sinks[sink.id] = RunningSink(sink, status, sink_config.enabled)
        outbox = config.outbox
        self.outbox = Outbox(
            OutboxLimits(outbox.max_events, outbox.max_bytes, outbox.policy == "drop_oldest"),
            [running.sink.route() for running in self.sinks.values() if running.enabled])
        self.store = Store(config.store_path, Retention(
            max_age=config.store.history_max_age, max_rows=config.store.history_max_rows),
            self.outbox)
        self.router = Router(self.store, commit_interval=config.store.commit_interval)
        self.points: dict[str, ResolvedPoint] = config.point_index()
        self.sources: dict[str, RunningSource] = {}
        self.started_at = time.time()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self.api_port: int | None = None
        """The port the API listens on, once it does."""
        self._build_context = context
        self._group: asyncio.TaskGroup | None = None
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self._reload_requested = asyncio.Event()
        self.reloads = 0
        """Reloads applied since start."""
        for source_config in config.sources:
            self.sources[source_config.id] = self._build_source(config, source_config)

    def _build_source(self, config: Config, source_config: SourceBase) -> RunningSource:
        spec = protocols()[source_config.protocol]
        points = config.points[source_config.id]
        unit = spec.build(source_config, points, self._build_context)
        if source_config.workers:
            from bridge.pipeline.worker import build_worker_unit

            unit = build_worker_unit(unit, source_config, points, self._build_context)
        status = source_status(unit)
        if not source_config.enabled:
            status.disabled()
        return RunningSource(unit, status, source_config.enabled)

    def request_reload(self) -> None:
        """Ask for the configuration file to be read again (safe from a signal handler)."""
        self._reload_requested.set()

    async def reload(self) -> list[str]:
        """Read the configuration file again and restart only the sources that changed.

        Returns what changed, one line each. An invalid file changes nothing: its errors are
        logged and raised as ``ConfigError``. Changes outside ``sources`` and the profiles
        they use (API, store, outbox, sinks) need a restart and are reported, not applied.
        """
        new = load_config(self.config.path)
        old = self.config
        changes: list[str] = []
        for section in ("bridge", "api", "store", "outbox"):
            if getattr(new, section) != getattr(old, section):
                changes.append(f"{section}: changed, applied at the next restart")
        if new.sinks != old.sinks:
            changes.append("sinks: changed, applied at the next restart")
        old_sources = {source.id: source for source in old.sources}
        new_sources = {source.id: source for source in new.sources}
        for source_id in sorted(old_sources.keys() - new_sources.keys()):
            await self._stop_source(source_id)
            del self.sources[source_id]
            changes.append(f"source {source_id}: removed")
        for source_id, source_config in new_sources.items():
            previous = old_sources.get(source_id)
            if previous == source_config and _same_points(old.points.get(source_id, []),
                                                          new.points.get(source_id, [])):
                continue
            await self._stop_source(source_id)
            running = self._build_source(new, source_config)
            self.sources[source_id] = running
            self._start_source(source_id, running)
            changes.append(f"source {source_id}: {'added' if previous is None else 'restarted'}")
        # Sources, points and profiles now follow the new file; the other sections keep
        # what the daemon started with until it restarts.
        self.config = dataclasses.replace(
            old, sources=new.sources, points=new.points, profiles=new.profiles,
            document=new.document)
        self.points = self.config.point_index()
        self.reloads += 1
        return changes

    def _start_source(self, source_id: str, running: RunningSource) -> None:
        if not running.enabled or self._group is None:
            return
        context = self.source_context(running)
        self._source_tasks[source_id] = self._group.create_task(
            supervise(running.unit.source, context, Backoff()),
            name=f"{running.unit.source.protocol}[{source_id}]")

    async def _stop_source(self, source_id: str) -> None:
        task = self._source_tasks.pop(source_id, None)
        if task is not None:
            await _cancel_all([task])

    async def _reloader(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                changes = await self.reload()
            except ConfigError as exc:
                for issue in exc.issues:
                    logger.error("reload refused, configuration unchanged: %s", issue)
            else:
                logger.info("configuration reloaded: %s", "; ".join(changes) or "no changes")
            notify("READY=1")

    def stop(self) -> None:
        """Ask the runtime to shut down (safe to call from a signal handler)."""
        self._stop.set()

    def publisher(self, running: RunningSource) -> Callable[[Sequence[Reading]], Awaitable[None]]:
        """The ``publish`` callback for one source: map, count, route."""
        mapper = running.unit.mapper
        status = running.status
        router = self.router

        async def publish(readings: Sequence[Reading]) -> None:
            await router.submit(*map_readings(mapper, status, readings))

        return publish

    def source_context(self, running: RunningSource) -> SourceContext:
        """What a running source is handed: its status, and the way into the router."""
        return SourceContext(status=running.status, publish=self.publisher(running),
                             submit=self.router.submit)

    async def run(self, *, serve_api: bool = True) -> None:
        """Run until ``stop()``; raises ``StoreError`` if the store cannot be opened."""
        self.store.open()
        try:
            self.router.restore()
            await self._run(serve_api)
        finally:
            self.store.close()

    async def _run(self, serve_api: bool) -> None:
        server = None
        if serve_api and self.config.api.enabled:
            from bridge.api.app import ApiServer

            server = ApiServer(self)
            await server.start()  # before the task group: a busy port is a plain error
            self.api_port = server.port
        try:
            async with asyncio.TaskGroup() as group:
                await self._serve(group)
                if server is not None:
                    await server.stop()
        finally:
            if server is not None:
                await server.stop()

    async def _serve(self, group: asyncio.TaskGroup) -> None:
        self._group = group
        router_task = group.create_task(self.router.run(), name="router")
        tasks: list[asyncio.Task[None]] = [group.create_task(self._reloader(), name="reloader")]
        for source_id, running in self.sources.items():
            self._start_source(source_id, running)
        sink_tasks: list[asyncio.Task[None]] = []
        for sink_id, running_sink in self.sinks.items():
            if not running_sink.enabled:
                continue
            sink_context = SinkContext(status=running_sink.status,
                                       outbox=SinkOutbox(self.store, sink_id))
            sink_tasks.append(group.create_task(
                supervise(running_sink.sink, sink_context, Backoff()),
                name=f"{running_sink.sink.protocol}[{sink_id}].sink"))
        interval = watchdog_interval()
        if interval is not None:
            tasks.append(group.create_task(self._watchdog(interval), name="watchdog"))
        # Everything built so far lives as long as the daemon: move it out of the garbage
        # collector's reach so full collections do not walk it and stall the loop.
        gc.freeze()
        self.ready.set()
        notify("READY=1", f"STATUS=serving {len(self.points)} points from "
               f"{len(self.sources)} sources")
        logger.info("fieldbridge %s ready: %d sources, %d points%s", self.bridge_id,
                    len(self.sources), len(self.points),
                    f", API on port {self.api_port}" if self.api_port else "")
        await self._stop.wait()
        notify("STOPPING=1")
        logger.info("stopping")
        # Sources first, then the router, so it stores what they handed in. What the sinks
        # have not delivered stays in the outbox for the next start.
        await _cancel_all([*tasks, *self._source_tasks.values()])
        self._source_tasks.clear()
        self._group = None
        router_task.cancel()
        await _cancel_all(sink_tasks)

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def inventory(self) -> list[dict[str, object]]:
        """Every source with its state, devices and counters."""
        return [running.status.to_dict() for running in self.sources.values()]

    def sink_inventory(self) -> list[dict[str, Any]]:
        """Every sink with its state, counters, outbox depth and delivery figures."""
        return [self.sink_entry(sink_id) for sink_id in self.sinks]

    def sink_entry(self, sink_id: str) -> dict[str, Any]:
        """One sink's inventory entry; ``KeyError`` for an unknown sink."""
        running = self.sinks[sink_id]
        entry = running.status.to_dict()
        entry["enabled"] = running.enabled
        depth = self.outbox.depths.get(sink_id)
        if depth is not None:
            limits = self.outbox.limits
            oldest = self.store.outbox_oldest(sink_id) if self.store.is_open else None
            entry["outbox"] = {
                "events": depth.events, "bytes": depth.bytes, "dropped": depth.dropped,
                "oldest_age_seconds": (round(max(0.0, time.time() - oldest), 3)
                                       if oldest is not None else None),
                "max_events": limits.max_events, "max_bytes": limits.max_bytes,
                "policy": "drop_oldest" if limits.drop_oldest else "block"}
        entry.setdefault("details", {}).update(running.sink.details())
        return entry


def _same_points(old: Sequence[ResolvedPoint], new: Sequence[ResolvedPoint]) -> bool:
    """Whether two resolved point lists mean the same (where they were written aside)."""
    def meaning(points: Sequence[ResolvedPoint]) -> list[tuple[object, ...]]:
        return [(point.id, point.device, point.spec, point.tags, point.report)
                for point in points]

    return meaning(old) == meaning(new)


STOP_GRACE = 3.0
"""Seconds a cancelled task may take to finish before it is cancelled again."""


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait for them; cancel again any that swallowed the cancellation.

    Some client libraries catch ``CancelledError`` in their own awaits; a task that kept
    running after that would hold shutdown forever.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=STOP_GRACE)
        for task in pending:
            logger.warning("task %s did not stop when cancelled; cancelling it again",
                           task.get_name())
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed while stopping", task.get_name(),
                         exc_info=task.exception())
