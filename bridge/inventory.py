"""What a runtime runs, and its inventory: the running sources, sinks and northbound servers
and their entries.

``RunningSource`` and ``RunningSink`` pair a configured endpoint with its live status.
``RuntimeParts`` is what the facades (``bridge.facade``) and the inventory read of a runtime;
``bridge.runtime.Runtime`` is one. The inventory entries (``source_entries``,
``sink_entry``) are the JSON the API and the tests show for each source and sink: state,
counters, devices and points of a source; outbox and delivery figures of a sink.

May import: ``bridge.errors``, ``bridge.config``, ``bridge.core``, ``bridge.registry`` and
``bridge.pipeline``. Never the runtime (which imports this module) or the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bridge.config.models import Config, ResolvedPoint, ServerBase
from bridge.core.model import Value
from bridge.core.server import Server, ServerView
from bridge.core.sink import Sink
from bridge.core.source import BuildContext, SourceUnit
from bridge.core.status import EndpointStatus
from bridge.pipeline.delivery import SinkDelivery
from bridge.pipeline.outbox import Outbox
from bridge.pipeline.router import Router
from bridge.pipeline.store import Store
from bridge.registry import protocols


@dataclass
class RunningSource:
    """A configured source with its compiled mapping and live status."""

    unit: SourceUnit
    status: EndpointStatus
    enabled: bool


@dataclass
class RunningSink:
    """A configured sink, the delivery engine's state for it, and its live status."""

    sink: Sink
    delivery: SinkDelivery
    status: EndpointStatus
    enabled: bool


@dataclass
class RunningServer:
    """A configured northbound server and its live status (state, clients, counters)."""

    server: Server
    status: EndpointStatus
    enabled: bool


def build_servers(configs: Sequence[ServerBase],
                  context: BuildContext) -> dict[str, RunningServer]:
    """The northbound servers of a configuration, built by their protocols, not started."""
    servers: dict[str, RunningServer] = {}
    for config in configs:
        server = protocols()[config.protocol].server(config, context)
        status = EndpointStatus(name=server.id, kind="server", protocol=server.protocol,
                                endpoint=server.endpoint)
        if not config.enabled:
            status.disabled()
        servers[server.id] = RunningServer(server, status, config.enabled)
    return servers


async def start_servers(servers: dict[str, RunningServer], view: ServerView,
                        stack: contextlib.AsyncExitStack, ports: dict[str, int]) -> None:
    """Start every enabled server, whatever the state of sources, sinks and store, each
    stopped by ``stack``; a port that cannot be bound raises ``ServerError``. ``ports``
    gets the port of each, as ``server ID``."""
    for server_id, running in servers.items():
        if not running.enabled:
            continue
        await running.server.start(view, running.status)
        stack.push_async_callback(_stop_server, running, ports)
        running.status.up()
        if running.server.port is not None:
            ports[f"server {server_id}"] = running.server.port


async def _stop_server(running: RunningServer, ports: dict[str, int]) -> None:
    ports.pop(f"server {running.server.id}", None)
    await running.server.stop()


class RuntimeParts(Protocol):
    """The parts of a running runtime that its facades and inventory read.

    Attributes, not copies: a reload replaces ``config``, ``points`` and entries of
    ``sources``, and every read sees the current ones.
    """

    bridge_id: str
    config: Config
    started_at: float
    """When the runtime was built (POSIX seconds)."""
    ready: asyncio.Event
    """Set once every source is started."""
    points: dict[str, ResolvedPoint]
    router: Router
    store: Store
    outbox: Outbox
    sources: dict[str, RunningSource]
    sinks: dict[str, RunningSink]
    servers: dict[str, RunningServer]

    async def write(self, point_id: str, value: Value, *, who: str) -> None:
        """The audited write path (``Runtime.write``)."""

    async def write_command(self, writes: Sequence[tuple[str, Value]], *,
                            who: str) -> list[Exception | None]:
        """The audited write path for a command of several writes (``Runtime.write_command``)."""

    def watch_states(self, watcher: Callable[[], None]) -> Callable[[], None]:
        """Call ``watcher`` after any source or device changed state; returns the function
        that stops it."""


def point_counts(runtime: RuntimeParts) -> Counter[tuple[str, str | None]]:
    """How many configured points each source and device serves."""
    return Counter((point.source, point.device) for point in runtime.points.values())


def source_entries(runtime: RuntimeParts) -> list[dict[str, Any]]:
    """Every configured source's inventory entry (``source_entry``)."""
    counts = point_counts(runtime)
    paused = runtime.store.problem
    return [source_entry(running, counts, paused) for running in runtime.sources.values()]


def source_entry(
    running: RunningSource, counts: Counter[tuple[str, str | None]], paused: str | None
) -> dict[str, Any]:
    """One source's inventory entry: state, last error, counters, devices, whether it is
    enabled and how many configured points it (and each device) serves; ``paused`` is why
    the store makes the sources wait, if it does."""
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


def sink_entry(runtime: RuntimeParts, sink_id: str) -> dict[str, Any]:
    """One sink's inventory entry: state, counters, outbox depth and delivery figures;
    ``KeyError`` for an unknown sink."""
    running = runtime.sinks[sink_id]
    entry = running.status.to_dict()
    entry["enabled"] = running.enabled
    depth = runtime.outbox.depths.get(sink_id)
    if depth is not None:
        limits = runtime.outbox.limits
        store = runtime.store
        oldest = store.outbox_oldest(sink_id) if store.is_open else None
        entry["outbox"] = {
            "events": depth.events, "bytes": depth.bytes, "dropped": depth.dropped,
            "oldest_age_seconds": (round(max(0.0, time.time() - oldest), 3)
                                   if oldest is not None else None),
            "max_events": limits.max_events, "max_bytes": limits.max_bytes,
            "policy": "drop_oldest" if limits.drop_oldest else "block"}
    entry.setdefault("details", {}).update(running.delivery.details())
    return entry


def sink_entries(runtime: RuntimeParts) -> list[dict[str, Any]]:
    """Every configured sink's inventory entry (``sink_entry``)."""
    return [sink_entry(runtime, sink_id) for sink_id in runtime.sinks]


def server_entry(running: RunningServer) -> dict[str, Any]:
    """One northbound server's inventory entry: state, where it listens, its counters
    (requests, exceptions, clients) and whether it is enabled."""
    entry = running.status.to_dict()
    entry["enabled"] = running.enabled
    entry["port"] = running.server.port
    entry.setdefault("details", {}).update(running.server.details())
    return entry


def server_entries(runtime: RuntimeParts) -> list[dict[str, Any]]:
    """Every configured northbound server's inventory entry (``server_entry``)."""
    return [server_entry(running) for running in runtime.servers.values()]
