"""The runtime's facades: what the API (``ApiFacade``) and a sink that mirrors the bridge
(``SinkFacade``) see of a running runtime, and the small types the API's reads return.

A facade reads the live objects of the runtime (``bridge.inventory.RuntimeParts``), never
copies, and offers the few things a caller may do (write a point, read one live, subscribe to
stored events). The runtime builds both; the API imports this module, the runtime never
imports the API.

May import: ``bridge.errors``, ``bridge.config``, ``bridge.core``, ``bridge.registry``,
``bridge.pipeline`` and ``bridge.inventory``. Never the runtime or the API.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.config.models import ApiSection, ResolvedPoint
from bridge.core.counters import Counts
from bridge.core.model import Event, Value
from bridge.core.sink import PointInfo
from bridge.core.source import BuildContext
from bridge.core.status import EndpointStatus
from bridge.errors import StoreError
from bridge.inventory import (
    RuntimeParts,
    point_counts,
    server_entries,
    sink_entries,
    sink_entry,
    source_entries,
    source_entry,
)
from bridge.pipeline.outbox import OutboxDepth, OutboxLimits
from bridge.pipeline.router import Listener
from bridge.registry import protocols

# --- what the API's reads return ----------------------------------------------------------


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
    counters: Counts
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


# --- the API's facade ---------------------------------------------------------------------


class ApiFacade:
    """What the API (a runtime service) sees of a runtime and may do with it.

    Reads come from the live objects, not copies: the mappings returned belong to the runtime
    and must not be changed. A reload replaces the configured points; every call sees the
    current ones.
    """

    def __init__(self, runtime: RuntimeParts) -> None:
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
        return source_entries(self._runtime)

    def source(self, source_id: str) -> dict[str, Any]:
        """One source's inventory entry; ``KeyError`` for an unknown source."""
        return source_entry(self._runtime.sources[source_id], point_counts(self._runtime),
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
        return sink_entries(self._runtime)

    def sink(self, sink_id: str) -> dict[str, Any]:
        """One sink's inventory entry; ``KeyError`` for an unknown sink."""
        return sink_entry(self._runtime, sink_id)

    def servers(self) -> list[dict[str, Any]]:
        """Every configured northbound server's inventory entry: state, port, clients and
        request counters."""
        return server_entries(self._runtime)

    def server_statuses(self) -> Mapping[str, EndpointStatus]:
        """The live status of every northbound server, by id."""
        return {server_id: running.status
                for server_id, running in self._runtime.servers.items()}

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
                running.delivery.in_flight, running.delivery.confirm_latency))
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
        Raises ``KeyError`` for a point that is not configured, ``ReadError`` when the
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
        audited as done by ``who`` (``bridge.runtime.Runtime.write``).

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


# --- the facade of a sink that mirrors the bridge ------------------------------------------


class SinkFacade:
    """What a sink that mirrors the bridge (Sparkplug B) or a northbound server sees of a
    runtime: the runtime's implementation of ``bridge.core.sink.BridgeView`` and
    ``bridge.core.server.ServerView``."""

    def __init__(self, runtime: RuntimeParts) -> None:
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

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every batch of events once it is stored (a northbound
        server pushes them to its subscribed clients)."""
        return self._runtime.router.add_listener(listener)

    async def write(self, point_id: str, value: Value, who: str) -> None:
        """The runtime's audited write path."""
        await self._runtime.write(point_id, value, who=who)

    async def write_command(self, writes: Sequence[tuple[str, Value]],
                            who: str) -> list[Exception | None]:
        """The runtime's audited write path for a command of several writes."""
        return await self._runtime.write_command(writes, who=who)


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """A failed read of the store raised as ``StoreError``, whatever SQLite raised."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(str(exc)) from exc

