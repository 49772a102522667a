"""Prometheus metrics: custom collectors that read the live state at scrape time.

There is no second set of counters to keep in step: ``RuntimeCollector`` reads the runtime's
facade (router, store, source, device and sink statuses, outboxes) and ``ApiCollector`` the
API's own figures (refused requests, event streams, live reads and writes) each time
``/metrics`` is scraped. Both are registered in a registry of the app's own, never in the
process-wide default one, and written with ``prometheus_client.generate_latest``. Labels carry
ids and protocols only: endpoints (which may hold credentials) and keys never appear.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import get_args

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from bridge import __version__
from bridge.api.auth import AuthFailure, KeyRing
from bridge.api.event_hub import ENDED, EndReason, EventHub
from bridge.core.counters import EVENTS, STREAMS, Owner, declarations
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.facade import ApiFacade

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The media type of the text exposition format (0.0.4) that ``generate_latest`` writes."""


def registry(
    runtime: ApiFacade,
    *,
    keys: KeyRing,
    hub: EventHub,
    device_requests: Counter[tuple[str, str]],
) -> CollectorRegistry:
    """A registry of one app's collectors (not the global one)."""
    collectors = CollectorRegistry()
    collectors.register(RuntimeCollector(runtime))
    collectors.register(ApiCollector(keys, hub, device_requests))
    return collectors


class _Families:
    """Metric families in the order they were first asked for; empty ones are left out."""

    def __init__(self) -> None:
        self._order: list[Metric] = []
        self._gauges: dict[str, GaugeMetricFamily] = {}
        self._counters: dict[str, CounterMetricFamily] = {}

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
        """The gauge family called ``name``, created on first use."""
        family = self._gauges.get(name)
        if family is None:
            family = self._gauges[name] = GaugeMetricFamily(name, help, labels=labels)
            self._order.append(family)
        return family

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
        """The counter family called ``name`` (ending in ``_total``), created on first use."""
        family = self._counters.get(name)
        if family is None:
            family = self._counters[name] = CounterMetricFamily(name, help, labels=labels)
            self._order.append(family)
        return family

    def __iter__(self) -> Iterator[Metric]:
        return (family for family in self._order if family.samples)


class RuntimeCollector(Collector):
    """The runtime's state, read through its facade at scrape time: the bridge, the router,
    the store, every source and device, every sink and its outbox."""

    def __init__(self, runtime: ApiFacade) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        """The families of the runtime's state, now."""
        runtime = self.runtime
        families = _Families()
        families.gauge("fieldbridge_info", "Version and instance id of this bridge; always 1.",
                       ["version", "bridge"]).add_metric([__version__, runtime.bridge_id], 1)
        families.gauge("process_start_time_seconds",
                       "Start time of the process since the Unix epoch in seconds.").add_metric(
            [], runtime.started_at)
        families.gauge("fieldbridge_ready",
                       "1 once every source is started and the API serves.").add_metric(
            [], 1 if runtime.started else 0)
        router = runtime.router_figures()
        families.gauge("fieldbridge_points", "Configured points.").add_metric(
            [], len(runtime.points()))
        families.gauge("fieldbridge_points_with_value",
                       "Points that have a last value.").add_metric([], router.points_with_value)
        families.gauge("fieldbridge_router_pending_events",
                       "Events accepted from sources but not yet stored.").add_metric(
            [], router.pending)
        families.gauge("fieldbridge_router_max_pending_events",
                       "Pending events beyond which sources wait (backpressure).").add_metric(
            [], router.max_pending)
        for counter in declarations(Owner.ROUTER):
            families.counter(counter.metric("fieldbridge_router"), counter.help).add_metric(
                [], router.counters[counter])
        families.counter("fieldbridge_store_written_events_total",
                         "Events written to the store since it was opened.").add_metric(
            [], router.stored)
        for source_id, status in runtime.source_statuses().items():
            labels = {"source": source_id, "protocol": status.protocol}
            _endpoint(families, "source", status, labels)
            for device_id, device in status.children.items():
                _endpoint(families, "device", device, {**labels, "device": device_id})
        self._sinks(families)
        for server_id, status in runtime.server_statuses().items():
            _endpoint(families, "server", status, {"server": server_id,
                                                   "protocol": status.protocol})
        yield from families

    def _sinks(self, families: _Families) -> None:
        names = ["sink", "protocol"]
        for sink in self.runtime.sink_figures():
            labels = {"sink": sink.id, "protocol": sink.status.protocol}
            values = list(labels.values())
            _endpoint(families, "sink", sink.status, labels)
            if sink.outbox is None:
                continue
            families.gauge("fieldbridge_outbox_events",
                           "Events waiting in the outbox for the broker's confirmation.",
                           names).add_metric(values, sink.outbox.events)
            families.gauge("fieldbridge_outbox_bytes", "Bytes of event JSON waiting in the "
                           "outbox.", names).add_metric(values, sink.outbox.bytes)
            families.counter("fieldbridge_outbox_dropped_total",
                             "Events dropped unconfirmed from a full outbox (policy "
                             "drop_oldest) since the start.", names).add_metric(
                values, sink.outbox.dropped)
            families.gauge("fieldbridge_outbox_oldest_age_seconds",
                           "Age of the oldest event waiting in the outbox (0 when empty).",
                           names).add_metric(values, sink.oldest_age or 0.0)
            families.gauge("fieldbridge_sink_in_flight",
                           "Messages published and not yet confirmed.", names).add_metric(
                values, sink.in_flight)
            if sink.confirm_latency is not None:
                families.gauge("fieldbridge_sink_confirm_latency_seconds",
                               "Moving average of the time from publish to the broker's "
                               "confirmation.", names).add_metric(values, sink.confirm_latency)
        limits = self.runtime.outbox_limits()
        families.gauge("fieldbridge_outbox_max_events",
                       "The outbox's bound in events, per sink.").add_metric(
            [], limits.max_events)
        families.gauge("fieldbridge_outbox_max_bytes",
                       "The outbox's bound in bytes, per sink.").add_metric([], limits.max_bytes)


def _endpoint(
    families: _Families, prefix: str, status: EndpointStatus, labels: Mapping[str, str]
) -> None:
    """The state, last success and counters of a source, a device or a sink."""
    kind = status.kind
    names, values = list(labels), list(labels.values())
    families.gauge(f"fieldbridge_{prefix}_up", f"1 when the {kind} is up, else 0.",
                   names).add_metric(values, 1 if status.state is ConnectionState.UP else 0)
    state = families.gauge(f"fieldbridge_{prefix}_state",
                           f"1 for the state the {kind} is in, 0 for the others.",
                           [*names, "state"])
    for candidate in ConnectionState:
        state.add_metric([*values, candidate.value], 1 if status.state is candidate else 0)
    if status.last_success is not None:
        families.gauge(f"fieldbridge_{prefix}_last_success_timestamp_seconds",
                       f"When the {kind} last answered as expected (POSIX seconds).",
                       names).add_metric(values, status.last_success)
    for counter, count in status.counters.items():
        families.counter(counter.metric(f"fieldbridge_{prefix}"), counter.help,
                         names).add_metric(values, count)


class ApiCollector(Collector):
    """The API's own figures at scrape time: requests refused (when keys are configured),
    event streams, and live reads and writes by result."""

    def __init__(
        self, keys: KeyRing, hub: EventHub, device_requests: Counter[tuple[str, str]]
    ) -> None:
        self.keys = keys
        self.hub = hub
        self.device_requests = device_requests

    def collect(self) -> Iterator[Metric]:
        """The families of the API's figures, now."""
        families = _Families()
        if self.keys.enabled:
            failures = families.counter("fieldbridge_api_auth_failures_total",
                                        "API requests refused, by reason.", ["reason"])
            for failure in AuthFailure:
                failures.add_metric([failure.value], self.keys.failures[failure])
        hub = self.hub
        families.gauge("fieldbridge_api_stream_clients",
                       "Event stream clients connected.").add_metric([], hub.clients)
        families.counter("fieldbridge_api_streams_total", STREAMS.help).add_metric(
            [], hub.counters[STREAMS])
        families.counter("fieldbridge_api_stream_events_total", EVENTS.help).add_metric(
            [], hub.counters[EVENTS])
        for reason in get_args(EndReason):
            counter = ENDED[reason]
            families.counter("fieldbridge_api_streams_ended_total", counter.help,
                             ["reason"]).add_metric([reason], hub.counters[counter])
        requests = families.counter(
            "fieldbridge_api_device_requests_total",
            "Live reads and writes through the API, by operation and result (ok or the error "
            "code).", ["operation", "result"])
        for (operation, result), count in sorted(self.device_requests.items()):
            requests.add_metric([operation, result], count)
        yield from families
