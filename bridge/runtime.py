"""The runtime: builds sources and sinks from the config and runs them with the router.

Servers beside the pipeline (the REST API) are handed in as ``services``: the runtime builds
each from its facade (``RuntimeFacade``), starts it before the sources and stops it after
them. The facade is all such a service sees of the runtime.

May import: ``bridge.errors``, ``bridge.config``, ``bridge.core``, ``bridge.registry`` and
``bridge.pipeline``. Never the API: the API imports this module, not the reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bridge.config.models import ApiSection, Config, ResolvedPoint, SourceBase
from bridge.core.model import Event, Reading, Value
from bridge.core.sink import PointInfo, Sink, SinkContext
from bridge.core.source import BuildContext, SourceContext, SourceUnit, map_readings
from bridge.core.status import EndpointStatus
from bridge.errors import (
    ConfigError,
    ErrorCategory,
    NotWritableError,
    StoreError,
    StoreFullError,
    WriteError,
    excerpt,
    shorten,
)
from bridge.pipeline.delivery import SinkOutbox, deliver
from bridge.pipeline.notify import notify, watchdog_interval
from bridge.pipeline.outbox import Outbox, OutboxDepth, OutboxLimits
from bridge.pipeline.router import Listener, Router
from bridge.pipeline.store import Replay, Retention, Store
from bridge.pipeline.supervisor import Backoff, source_status, supervise
from bridge.pipeline.worker import SinkWorker, SinkWorkerSpec, build_worker_unit
from bridge.registry import load_config, protocols

logger = logging.getLogger(__name__)
audit = logging.getLogger("bridge.audit")
"""Who changed what on a device: every write-back, at INFO, with who asked for it."""


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


ServiceFactory = Callable[["RuntimeFacade"], Service]
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
            if sink_config.workers:
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
        self._facade = RuntimeFacade(self)
        self._build_context = context
        self._group: asyncio.TaskGroup | None = None
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self._reload_requested = asyncio.Event()
        self.reloads = 0
        """Reloads applied since start."""
        self._state_watchers: list[Callable[[], None]] = []
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
        point = self.points[point_id]
        # A value is quoted as an excerpt with its length: a 20 MB string must not fill
        # the audit log.
        quoted = excerpt(value)
        try:
            if not point.spec.writable:
                raise NotWritableError(point_id)
            running = self.sources[point.source]
            if not running.enabled:
                raise WriteError(point_id, f"source '{point.source}' is disabled",
                                 ErrorCategory.CONFIG)
            await running.unit.source.write(point_id, value)
        except NotWritableError as exc:
            audit.info("write refused: %s, point %s, value %s: %s", who, point_id, quoted,
                       exc.reason)
            raise
        except WriteError as exc:
            audit.info("write failed: %s, point %s, value %s: %s (%s)", who, point_id,
                       quoted, shorten(exc.reason), exc.category)
            raise
        audit.info("write: %s, point %s, value %s", who, point_id, quoted)

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

    def facade(self) -> RuntimeFacade:
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
            sink_context = SinkContext(status=running_sink.status,
                                       outbox=SinkOutbox(self.store, sink_id), deliver=deliver,
                                       bridge=SinkBridge(self))
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


# --- the facade: what the API sees ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TagFilter:
    """``key=value``, or ``key`` alone for any value."""

    key: str
    value: str | None

    def matches(self, tags: Mapping[str, str]) -> bool:
        """Whether ``tags`` carry this tag (with this value, when one is given)."""
        return self.key in tags and (self.value is None or tags[self.key] == self.value)


@dataclass(frozen=True, slots=True)
class PointQuery:
    """Which points a listing wants; every condition given must hold."""

    source: str | None = None
    device: str | None = None
    prefix: str | None = None
    """Point ids starting with this."""
    tags: tuple[TagFilter, ...] = ()
    qualities: frozenset[str] = frozenset()
    """Qualities of the latest value (``good``, ``uncertain``, ``bad``, or ``none`` for a point
    without data yet); empty: any."""


@dataclass(frozen=True, slots=True)
class PointState:
    """One point: its configuration and its latest event."""

    id: str
    config: ResolvedPoint | None
    """``None`` for a point that has a stored value but is no longer configured."""
    latest: Event | None
    """``None`` until the point has a value."""


@dataclass(frozen=True, slots=True)
class PointSlice:
    """One page of the points a query matched, sorted by id."""

    total: int
    """Points the query matched, on all pages."""
    items: list[PointState]


@dataclass(frozen=True, slots=True)
class ReadinessFacts:
    """What readiness is judged by."""

    started: bool
    """Every source is started."""
    store_problem: str | None
    """Why the store cannot be read; ``None`` when it can."""
    store_paused: str | None
    """Why the store cannot write now (``disk full: ...``): the sources wait."""
    source_states: dict[str, str]
    """The connection state of every source, by id."""


@dataclass(frozen=True, slots=True)
class RouterFigures:
    """The router's and the store's live figures."""

    pending: int
    """Events accepted from sources but not yet stored."""
    max_pending: int
    """Pending events beyond which sources wait (backpressure)."""
    counters: Mapping[str, int]
    """``events`` stored, ``backpressure_waits``, ``outbox_full_waits`` and others."""
    stored: int
    """Events written to the store since it was opened."""
    points_with_value: int
    """Points that have a latest value."""


@dataclass(frozen=True, slots=True)
class SinkFigures:
    """One sink's status and delivery figures."""

    id: str
    status: EndpointStatus
    outbox: OutboxDepth | None
    """What waits in its outbox; ``None`` for a disabled sink."""
    oldest_age: float | None
    """Seconds the oldest waiting event has waited; ``None`` when none waits."""
    in_flight: int
    """Published, not yet confirmed."""
    confirm_latency: float | None
    """Moving average of the seconds from publish to the broker's confirmation."""


class RuntimeFacade:
    """What the API sees of a runtime and may do with it.

    Reads come from the live objects, not copies: the mappings returned belong to the runtime
    and must not be changed. A reload replaces the configured points; every call sees the
    current ones.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._point_ids: tuple[tuple[int, int, int], list[str]] = ((0, -1, -1), [])

    # --- identity and settings ---

    @property
    def bridge_id(self) -> str:
        """The bridge instance id."""
        return self._runtime.bridge_id

    @property
    def api(self) -> ApiSection:
        """The ``api`` section of the configuration."""
        return self._runtime.config.api

    @property
    def state_dir(self) -> Path:
        """The state directory (where an OPC-UA discovery keeps its client certificate)."""
        return self._runtime.config.state_dir

    @property
    def started_at(self) -> float:
        """When the runtime was built (POSIX seconds)."""
        return self._runtime.started_at

    @property
    def started(self) -> bool:
        """Whether every source is started."""
        return self._runtime.ready.is_set()

    # --- points ---

    def points(self) -> Mapping[str, ResolvedPoint]:
        """The configured points, by id."""
        return self._runtime.points

    def point_ids(self) -> list[str]:
        """Every configured or stored point id, sorted; recomputed only when the set changes.

        Points are only ever added to the latest values, and a reload replaces the
        configured points' dict, so the dict's identity and both sizes tell a change.
        """
        points, latest = self._runtime.points, self._runtime.router.latest
        key = (id(points), len(points), len(latest))
        if self._point_ids[0] != key:
            self._point_ids = (key, sorted(points.keys() | latest.keys()))
        return self._point_ids[1]

    def point(self, point_id: str) -> PointState | None:
        """One point; ``None`` when it is neither configured nor stored."""
        config = self._runtime.points.get(point_id)
        latest = self._runtime.router.latest.get(point_id)
        if config is None and latest is None:
            return None
        return PointState(point_id, config, latest)

    def query_points(self, query: PointQuery, *, offset: int, limit: int) -> PointSlice:
        """The points ``query`` matches, sorted by id: ``limit`` of them from ``offset``, and
        how many match in all."""
        points, latest = self._runtime.points, self._runtime.router.latest
        source, device, prefix = query.source, query.device, query.prefix
        tags, qualities = query.tags, query.qualities
        items: list[PointState] = []
        total = 0
        for point_id in self.point_ids():
            if prefix is not None and not point_id.startswith(prefix):
                continue
            point = points.get(point_id)
            event = latest.get(point_id)
            point_source = point.source if point is not None else event.source if event else None
            if source is not None and point_source != source:
                continue
            if device is not None and (point is None or point.device != device):
                continue
            if tags:
                point_tags = point.tags if point is not None else event.tags if event else {}
                if not all(wanted.matches(point_tags) for wanted in tags):
                    continue
            if qualities and (event.quality.value if event is not None else "none"
                              ) not in qualities:
                continue
            if offset <= total < offset + limit:
                items.append(PointState(point_id, point, event))
            total += 1
        return PointSlice(total, items)

    # --- history ---

    def history(
        self,
        point_id: str,
        *,
        since: float | None,
        until: float | None,
        limit: int,
        newest_first: bool,
    ) -> list[str]:
        """A point's stored events between two times as their JSON bodies, at most ``limit``
        from the end ``newest_first`` says. Raises ``StoreError`` when the store cannot be
        read."""
        with _reading():
            return self._runtime.store.history_json(
                point_id, since=since, until=until, limit=limit, newest_first=newest_first)

    def history_position(self, event_id: str) -> int | None:
        """Where a stored event sits in the history; ``None`` when it is not there (pruned,
        or never stored here). Raises ``StoreError`` when the store cannot be read."""
        with _reading():
            return self._runtime.store.history_seq(event_id)

    def history_after(self, position: int, *, limit: int) -> list[tuple[int, str, str, str]]:
        """At most ``limit`` events stored after ``position``, in store order, as
        ``(position, id, point, JSON body)``. Raises ``StoreError`` when the store cannot be
        read."""
        with _reading():
            return self._runtime.store.history_after(position, limit=limit)

    # --- health and inventory ---

    def readiness(self) -> ReadinessFacts:
        """Whether the sources are started, whether the store can be read, and the state of
        every source."""
        problem = None
        try:
            # One indexed lookup: proves the store is open and readable.
            self._runtime.store.history_count("")
        except (StoreError, sqlite3.Error) as exc:
            problem = str(exc)
        states = {source_id: running.status.state.value
                  for source_id, running in self._runtime.sources.items()}
        store = self._runtime.store
        paused = store.problem
        if paused is None and store.is_open:
            # Idle, the store may not have noticed yet that its disk filled up.
            paused = store.space_problem()
        if paused is not None and not store.is_open:
            problem = None  # it cannot be opened for that same reason
        return ReadinessFacts(self.started, problem, paused, states)

    def sources(self) -> list[dict[str, Any]]:
        """Every configured source's inventory entry: state, last error, counters, devices,
        whether it is enabled and how many configured points it serves."""
        counts = self._point_counts()
        paused = self._runtime.store.problem
        return [self._source_entry(running, counts, paused)
                for running in self._runtime.sources.values()]

    def source(self, source_id: str) -> dict[str, Any]:
        """One source's inventory entry; ``KeyError`` for an unknown source."""
        return self._source_entry(self._runtime.sources[source_id], self._point_counts(),
                                  self._runtime.store.problem)

    def source_enabled(self, source_id: str) -> bool:
        """Whether ``source_id`` is a configured, enabled source."""
        running = self._runtime.sources.get(source_id)
        return running is not None and running.enabled

    def source_statuses(self) -> Mapping[str, EndpointStatus]:
        """The live status of every source (with its devices), by id."""
        return {source_id: running.status
                for source_id, running in self._runtime.sources.items()}

    def sinks(self) -> list[dict[str, Any]]:
        """Every configured sink's inventory entry: state, counters, outbox and delivery
        figures."""
        return self._runtime.sink_inventory()

    def sink(self, sink_id: str) -> dict[str, Any]:
        """One sink's inventory entry; ``KeyError`` for an unknown sink."""
        return self._runtime.sink_entry(sink_id)

    def _point_counts(self) -> Counter[tuple[str, str | None]]:
        return Counter((point.source, point.device) for point in self._runtime.points.values())

    @staticmethod
    def _source_entry(
        running: RunningSource, counts: Counter[tuple[str, str | None]], paused: str | None
    ) -> dict[str, Any]:
        entry = running.status.to_dict()
        source_id = entry["id"]
        entry["enabled"] = running.enabled
        if paused is not None:
            entry["paused"] = f"store: {paused}"
        entry["points"] = sum(count for (source, _), count in counts.items()
                              if source == source_id)
        if "devices" in entry:
            entry["devices"] = [{**device, "points": counts[source_id, device["id"]]}
                                for device in entry["devices"]]
        return entry

    # --- metrics ---

    def router_figures(self) -> RouterFigures:
        """The router's and the store's live figures."""
        router = self._runtime.router
        return RouterFigures(router.pending, router.max_pending, router.counters,
                             self._runtime.store.written, len(router.latest))

    def sink_figures(self) -> list[SinkFigures]:
        """The status and delivery figures of every configured sink."""
        runtime = self._runtime
        now = time.time()
        figures = []
        for sink_id, running in runtime.sinks.items():
            depth = runtime.outbox.depths.get(sink_id)
            oldest = (runtime.store.outbox_oldest(sink_id)
                      if depth is not None and runtime.store.is_open else None)
            figures.append(SinkFigures(
                sink_id, running.status, depth,
                max(0.0, now - oldest) if oldest is not None else None,
                running.sink.in_flight, running.sink.confirm_latency))
        return figures

    def outbox_limits(self) -> OutboxLimits:
        """The bound of each sink's outbox."""
        return self._runtime.outbox.limits

    # --- devices ---

    async def read_live(self, point_id: str) -> list[Event]:
        """Read a configured point from its device now and return its events.

        The point is compiled afresh, with its protocol's own builder, and the reading mapped
        by that: the same decoding as the running mapping, without its report-by-exception
        state, so a live read always yields the value and never moves the deadband or
        heartbeat of what the bridge reports. Nothing is stored, streamed or published.
        Raises ``KeyError`` for a point that is not configured, ``WriteError`` when the
        device cannot be read, ``DecodeError`` when the reading cannot be mapped.
        """
        runtime = self._runtime
        point = runtime.points[point_id]
        readings = await runtime.sources[point.source].unit.source.read(point_id)
        configured = {source.id: source for source in runtime.config.sources}[point.source]
        build = BuildContext(bridge_id=runtime.bridge_id, state_dir=runtime.config.state_dir,
                             config_dir=runtime.config.path.parent)
        mapper = protocols()[configured.protocol].source_unit(configured, [point], build).mapper
        events: list[Event] = []
        for reading in readings:
            events.extend(event for event in mapper.map(reading) if event.point == point_id)
        return events

    async def write(self, point_id: str, value: Value, *, who: str) -> None:
        """Write an engineering value to a configured point through its source's connection,
        audited as done by ``who`` (``Runtime.write``).

        Raises ``KeyError`` for a point that is not configured, ``NotWritableError`` for a
        point that is not writable and ``WriteError`` when the device refuses or cannot be
        reached.
        """
        await self._runtime.write(point_id, value, who=who)

    # --- the event stream ---

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` on the event loop with every batch of events once it is stored,
        in store order; returns the function that unsubscribes it."""
        return self._runtime.router.add_listener(listener)


class SinkBridge:
    """What a sink that mirrors the bridge sees of this runtime (``BridgeView``)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._points: tuple[Mapping[str, ResolvedPoint], Mapping[str, PointInfo]] = ({}, {})

    def points(self) -> Mapping[str, PointInfo]:
        """The configured points, by id: the same mapping until a reload changes them."""
        # A reload replaces the runtime's points dict: its identity tells a change.
        configured = self._runtime.points
        if self._points[0] is not configured:
            self._points = (configured, {
                point_id: PointInfo(point_id, point.source, point.device, point.spec.unit,
                                    point.spec.writable, point.spec.value_type())
                for point_id, point in configured.items()})
        return self._points[1]

    def latest(self) -> Mapping[str, Event]:
        """The latest stored event of every point that has one, by point id."""
        return self._runtime.router.latest

    def sources(self) -> Mapping[str, EndpointStatus]:
        """The live status of every enabled source, by id."""
        return {source_id: running.status
                for source_id, running in self._runtime.sources.items() if running.enabled}

    def watch(self, watcher: Callable[[], None]) -> Callable[[], None]:
        """Call ``watcher`` after any source or device changed state."""
        return self._runtime.watch_states(watcher)

    async def write(self, point_id: str, value: Value, who: str) -> None:
        """The runtime's audited write path."""
        await self._runtime.write(point_id, value, who=who)


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """A failed read of the store raised as ``StoreError``, whatever SQLite raised."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(str(exc)) from exc
