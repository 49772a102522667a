"""The runtime: builds sources and sinks from the config and runs them with the router.

Servers beside the pipeline (the REST API) are handed in as ``services``: the runtime builds
each from its facade (``bridge.facade.ApiFacade``), starts it before the sources and stops it
after them. The facade is all such a service sees of the runtime; a sink that mirrors the
bridge sees it through ``bridge.facade.SinkFacade``. What it runs, and the inventory of it,
is in ``bridge.inventory``.

May import: ``bridge.errors``, ``bridge.config``, ``bridge.core``, ``bridge.registry``,
``bridge.pipeline``, ``bridge.inventory`` and ``bridge.facade``. Never the API: the API
imports the facade, not the reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from bridge.config.models import Config, ResolvedPoint, SourceBase
from bridge.core.model import Reading, Value
from bridge.core.source import BuildContext, SourceContext, map_readings
from bridge.core.status import EndpointStatus
from bridge.errors import (
    ConfigError,
    ErrorCategory,
    NotWritableError,
    StoreFullError,
    WriteError,
    excerpt,
    shorten,
)
from bridge.facade import ApiFacade, SinkFacade
from bridge.inventory import (
    RunningServer,
    RunningSink,
    RunningSource,
    build_servers,
    sink_entries,
    sink_entry,
    start_servers,
)
from bridge.pipeline.delivery import DeliveryContext, SinkDelivery, SinkOutbox
from bridge.pipeline.notify import notify, watchdog_interval
from bridge.pipeline.outbox import Outbox, OutboxLimits
from bridge.pipeline.router import Router
from bridge.pipeline.store import Replay, Retention, Store
from bridge.pipeline.supervisor import Backoff, source_status, supervise
from bridge.pipeline.worker import SinkWorker, SinkWorkerSpec, build_worker_unit
from bridge.registry import load_config, protocols

logger = logging.getLogger(__name__)
audit = logging.getLogger("bridge.audit")
"""Who changed what on a device: every write-back, at INFO, with who asked for it."""


class Service(Protocol):
    """A server run beside the pipeline (the REST API).

    Started before the sources, so that a busy port is a plain error before anything runs,
    and stopped after them. ``start`` and ``stop`` are called from the same task.
    """

    @property
    def name(self) -> str:
        """What the ready log line calls it, e.g. ``API``."""

    @property
    def port(self) -> int | None:
        """The port it listens on once started (the real one when configured as 0)."""

    async def start(self) -> None:
        """Start serving; return once it does, or raise why it cannot."""

    async def stop(self) -> None:
        """Stop serving and leave no task behind."""


ServiceFactory = Callable[[ApiFacade], Service]
"""Builds a service from the facade of the runtime it serves (``ApiServer`` is one)."""


class Runtime:
    """One Fieldbridge instance: sources, router, store and sinks, for one configuration."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.bridge_id = config.bridge.id
        registry = protocols()
        context = BuildContext(bridge_id=self.bridge_id, state_dir=config.state_dir,
                               config_dir=config.path.parent)
        self.sinks: dict[str, RunningSink] = {}
        for sink_config in config.sinks:
            sink = registry[sink_config.protocol].sink(sink_config, context)
            delivery = (SinkWorker(sink, SinkWorkerSpec(sink_config, self.bridge_id,
                                                        config.state_dir, config.path.parent))
                        if sink_config.workers else SinkDelivery(sink))
            status = EndpointStatus(name=sink.id, kind="sink", protocol=sink.protocol,
                                    endpoint=sink.endpoint)
            if not sink_config.enabled:
                status.disabled()
            self.sinks[sink.id] = RunningSink(sink, delivery, status, sink_config.enabled)
        outbox = config.outbox
        self.outbox = Outbox(
            OutboxLimits(outbox.max_events, outbox.max_bytes, outbox.policy == "drop_oldest"),
            [running.sink.route() for running in self.sinks.values() if running.enabled])
        self.store = Store(config.store_path, Retention(
            max_age=config.store.history_max_age, max_rows=config.store.history_max_rows,
            max_bytes=config.store.history_max_bytes),
            self.outbox, sync=config.store.sync,
            replay=Replay(config.store.replay_max_bytes, config.store.replay_max_age),
            min_free=config.store.min_free)
        self.router = Router(self.store, commit_interval=config.store.commit_interval)
        self.points: dict[str, ResolvedPoint] = config.point_index()
        self.sources: dict[str, RunningSource] = {}
        self.started_at = time.time()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self.ports: dict[str, int] = {}
        """The port of each running service that listens on one, by its name."""
        self._facade = ApiFacade(self)
        self._build_context = context
        self._group: asyncio.TaskGroup | None = None
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self._reload_requested = asyncio.Event()
        self.reloads = 0
        """Reloads applied since start."""
        self._state_watchers: list[Callable[[], None]] = []
        self.servers: dict[str, RunningServer] = build_servers(config.servers, context)
        for source_config in config.sources:
            self.sources[source_config.id] = self._build_source(config, source_config)

    def _build_source(self, config: Config, source_config: SourceBase) -> RunningSource:
        spec = protocols()[source_config.protocol]
        points = config.points[source_config.id]
        unit = spec.source_unit(source_config, points, self._build_context)
        if source_config.workers:
            unit = build_worker_unit(unit, source_config, points, self._build_context)
        status = source_status(unit)
        if not source_config.enabled:
            status.disabled()
        status.watch(self._state_changed)
        return RunningSource(unit, status, source_config.enabled)

    def _state_changed(self, status: EndpointStatus) -> None:
        for watcher in list(self._state_watchers):
            watcher()

    def watch_states(self, watcher: Callable[[], None]) -> Callable[[], None]:
        """Call ``watcher`` after any source or device changed state; returns the function
        that stops it."""
        self._state_watchers.append(watcher)

        def unwatch() -> None:
            with contextlib.suppress(ValueError):
                self._state_watchers.remove(watcher)

        return unwatch

    async def write(self, point_id: str, value: Value, *, who: str) -> None:
        """Write an engineering value to a configured point through its source's connection:
        the one write path, for ``PUT /v1/points/{id}`` and Sparkplug B commands alike.

        Every attempt is logged at INFO by the ``bridge.audit`` logger with ``who`` made it
        (``key operator``, say). Raises ``KeyError`` for a point that is not configured,
        ``NotWritableError`` for a point not configured ``writable: true``, and
        ``WriteError`` when its source is disabled or the device refuses or cannot be
        reached.
        """
        # A value is quoted as an excerpt with its length: a 20 MB string must not fill
        # the audit log.
        quoted = excerpt(value)
        try:
            await self._write(point_id, value)
        except NotWritableError as exc:
            audit.info("write refused: %s, point %s, value %s: %s", who, point_id, quoted,
                       exc.reason)
            raise
        except WriteError as exc:
            audit.info("write failed: %s, point %s, value %s: %s (%s)", who, point_id,
                       quoted, shorten(exc.reason), exc.category)
            raise
        audit.info("write: %s, point %s, value %s", who, point_id, quoted)

    async def write_command(self, writes: Sequence[tuple[str, Value]], *,
                            who: str) -> list[Exception | None]:
        """Write several points as one command (a Sparkplug B DCMD), in order, through the
        same path as ``write``, audited as one record however many points it writes.

        Returns each write's outcome, in order: ``None`` when written, else the error
        ``write`` would have raised (``KeyError``, ``NotWritableError``, ``WriteError``).
        """
        outcomes: list[Exception | None] = []
        for point_id, value in writes:
            try:
                await self._write(point_id, value)
            except (KeyError, NotWritableError, WriteError) as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
        audit.info("write command: %s, %s", who, _command_summary(writes, outcomes))
        return outcomes

    async def _write(self, point_id: str, value: Value) -> None:
        point = self.points[point_id]
        if not point.spec.writable:
            raise NotWritableError(point_id)
        running = self.sources[point.source]
        if not running.enabled:
            raise WriteError(point_id, f"source '{point.source}' is disabled",
                             ErrorCategory.CONFIG)
        await running.unit.source.write(point_id, value)

    def request_reload(self) -> None:
        """Ask for the configuration file to be read again (safe from a signal handler)."""
        self._reload_requested.set()

    async def reload(self) -> list[str]:
        """Read the configuration file again and restart only the sources that changed.

        Returns what changed, one line each. An invalid file changes nothing: its errors are
        logged and raised as ``ConfigError``. Changes outside ``sources`` and the profiles
        they use (API, store, outbox, sinks) need a restart and are reported, not applied.
        """
        # In a thread: a huge or hostile file (bounded as it is) must not stall the API,
        # which serves /health/live from this event loop.
        new = await asyncio.to_thread(load_config, self.config.path)
        old = self.config
        changes: list[str] = []
        for section in ("bridge", "api", "store", "outbox"):
            if getattr(new, section) != getattr(old, section):
                changes.append(f"{section}: changed, applied at the next restart")
        if new.sinks != old.sinks:
            changes.append("sinks: changed, applied at the next restart")
        if new.servers != old.servers:
            changes.append("servers: changed, applied at the next restart")
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
            except Exception:  # a reload must never end the daemon
                # The loader turns what a file can hold into a ConfigError; anything else is
                # a bug, reported with its traceback, while the running configuration stays.
                logger.exception("reload failed, configuration unchanged")
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

    @property
    def api_port(self) -> int | None:
        """The port of the service named ``API`` once it serves; ``None`` without one."""
        return self.ports.get("API")

    def facade(self) -> ApiFacade:
        """What a service (the API) sees of this runtime."""
        return self._facade

    async def run(self, *, services: Sequence[ServiceFactory] = ()) -> None:
        """Run until ``stop()``, with ``services`` (the API) built from the facade.

        Each service starts, in order, before the task group (a busy port is a plain error,
        raised as the service raises it) and stops, in reverse order, after every task has
        ended. Raises ``StoreError`` if the store cannot be opened; when its disk is full, the
        services start and the store is tried again until it opens.
        """
        try:
            self.store.open()
        except StoreFullError as exc:
            logger.error("%s; the API starts, the sources wait until the store opens", exc)
        try:
            if self.store.is_open:
                self.router.restore()
            async with contextlib.AsyncExitStack() as running:
                for build in services:
                    service = build(self._facade)
                    await service.start()
                    running.push_async_callback(self._stop_service, service)
                    if service.port is not None:
                        self.ports[service.name] = service.port
                await start_servers(self.servers, SinkFacade(self), running, self.ports)
                if not self.store.is_open:
                    if not await self._wait_for_store():
                        return
                    self.router.restore()
                async with asyncio.TaskGroup() as group:
                    await self._serve(group)
        finally:
            self.store.close()

    async def _wait_for_store(self) -> bool:
        """Try to open the store, with backoff, until it opens (``True``) or the runtime is
        asked to stop (``False``). Meanwhile systemd is told why start-up takes long."""
        delay = 0.25
        while True:
            notify(f"STATUS=store: {self.store.problem}; waiting for disk space",
                   f"EXTEND_TIMEOUT_USEC={int((delay + 30) * 1_000_000)}", "WATCHDOG=1")
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except TimeoutError:
                pass
            else:
                return False
            try:
                await asyncio.to_thread(self.store.open)
            except StoreFullError:
                delay = min(delay * 2, 5.0)
                continue
            logger.warning("the store opened: %s", self.store.path)
            return True

    async def _stop_service(self, service: Service) -> None:
        self.ports.pop(service.name, None)
        await service.stop()

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
            sink_context = DeliveryContext(status=running_sink.status,
                                           outbox=SinkOutbox(self.store, sink_id),
                                           bridge=SinkFacade(self))
            sink_tasks.append(group.create_task(
                supervise(running_sink.delivery, sink_context, Backoff()),
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
                    "".join(f", {name} on port {port}" for name, port in self.ports.items()))
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
        return sink_entries(self)

    def sink_entry(self, sink_id: str) -> dict[str, Any]:
        """One sink's inventory entry; ``KeyError`` for an unknown sink."""
        return sink_entry(self, sink_id)


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


COMMAND_AUDIT_ITEMS = 10
"""Writes of one command quoted in its audit record; the others are counted."""


def _command_summary(writes: Sequence[tuple[str, Value]],
                     outcomes: Sequence[Exception | None]) -> str:
    """One audit line for a command: the counts, then the first writes with their outcome."""
    written = sum(outcome is None for outcome in outcomes)
    items = []
    for (point_id, value), outcome in zip(writes[:COMMAND_AUDIT_ITEMS],
                                          outcomes[:COMMAND_AUDIT_ITEMS], strict=True):
        if outcome is None:
            result = "written"
        elif isinstance(outcome, KeyError):
            result = "refused: the point is not configured"
        elif isinstance(outcome, NotWritableError):
            result = f"refused: {outcome.reason}"
        elif isinstance(outcome, WriteError):
            result = f"failed: {shorten(outcome.reason)}"
        else:
            result = f"failed: {shorten(str(outcome))}"
        items.append(f"point {point_id}, value {excerpt(value)}: {result}")
    more = len(writes) - len(items)
    return (f"{len(writes)} points, {written} written, {len(writes) - written} not; "
            + "; ".join(items) + (f"; and {more} more" if more else ""))
