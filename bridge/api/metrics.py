"""Prometheus text exposition (format 0.0.4), written by hand: no client library needed.

Everything is read from the live objects at scrape time (router, store, source statuses), so
there is no second set of counters to keep in step.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from bridge import __version__
from bridge.api.auth import AuthFailure, KeyRing
from bridge.core.status import ConnectionState, EndpointStatus

if TYPE_CHECKING:
    from bridge.runtime import Runtime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The media type of the text exposition format."""

MetricType = Literal["counter", "gauge", "untyped"]

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]")

_SOURCE_COUNTERS = {
    "readings": "Raw readings received from the source.",
    "events": "Normalized events the source's readings were mapped to.",
    "rejected": "Readings that could not be mapped at all (counted, logged, never dropped "
    "silently).",
    "errors": "Connection or device errors recorded.",
}
_ROUTER_COUNTERS = {
    "events": "Events stored by the router.",
    "backpressure_waits": "Times a source waited because too many events were pending.",
    "outbox_full_waits": "Times the router waited for a sink to make room in a full outbox "
    "(policy block).",
}
_SINK_COUNTERS = {
    "published": "Messages published to the broker.",
    "confirmed": "Messages the broker confirmed (and deleted from the outbox).",
    "nacked": "Messages the broker refused (nack); they are published again.",
    "republished": "Messages published again after a nack or a lost connection: consumers may "
    "see these twice.",
    "unroutable": "Messages the broker returned because no queue was bound for them.",
    "errors": "Connection errors recorded.",
}


def metric_name(text: str) -> str:
    """``text`` made into a valid metric name (invalid characters become ``_``)."""
    name = _INVALID_NAME.sub("_", text)
    return f"_{name}" if not name or name[0].isdigit() else name


def escape_label(value: str) -> str:
    """A label value escaped for the text format: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """A HELP text escaped for the text format: backslash and newline."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as the text format writes it."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int) or (value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    return repr(value)


@dataclass
class Family:
    """One metric family: its HELP, its TYPE and its samples, written together."""

    name: str
    type: MetricType
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        """Add one sample."""
        self.samples.append((labels, value))

    def render(self) -> Iterable[str]:
        """The family's lines."""
        yield f"# HELP {self.name} {escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.type}"
        for labels, value in self.samples:
            if labels:
                text = ",".join(f'{metric_name(key)}="{escape_label(label)}"'
                                for key, label in labels.items())
                yield f"{self.name}{{{text}}} {format_value(value)}"
            else:
                yield f"{self.name} {format_value(value)}"


class Exposition:
    """Families in the order they were first asked for."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}

    def family(self, name: str, type: MetricType, help: str) -> Family:
        """The family called ``name``, created on first use."""
        name = metric_name(name)
        existing = self._families.get(name)
        if existing is None:
            existing = self._families[name] = Family(name, type, help)
        return existing

    def render(self) -> str:
        """The whole exposition, ending with a newline."""
        lines = [line for family in self._families.values() if family.samples
                 for line in family.render()]
        return "\n".join(lines) + "\n"


def _counter_help(key: str, known: Mapping[str, str], what: str) -> str:
    return known.get(key, f"{what} counter '{key}'.")


def _endpoint_metrics(
    exposition: Exposition, prefix: str, status: EndpointStatus, labels: dict[str, str]
) -> None:
    kind = status.kind
    known = _SINK_COUNTERS if kind == "sink" else _SOURCE_COUNTERS
    exposition.family(f"fieldbridge_{prefix}_up", "gauge",
                      f"1 when the {kind} is up, else 0.").add(
        1 if status.state is ConnectionState.UP else 0, **labels)
    state = exposition.family(f"fieldbridge_{prefix}_state", "gauge",
                              f"1 for the state the {kind} is in, 0 for the others.")
    for candidate in ConnectionState:
        state.add(1 if status.state is candidate else 0, **labels, state=candidate.value)
    if status.last_success is not None:
        exposition.family(f"fieldbridge_{prefix}_last_success_timestamp_seconds", "gauge",
                          f"When the {kind} last answered as expected (POSIX seconds).").add(
            status.last_success, **labels)
    for key, count in sorted(status.counters.items()):
        exposition.family(f"fieldbridge_{prefix}_{key}_total", "counter",
                          _counter_help(key, known, kind.capitalize())).add(
            count, **labels)


def _sink_metrics(exposition: Exposition, runtime: Runtime) -> None:
    outbox = runtime.outbox
    now = time.time()
    for sink_id, running in runtime.sinks.items():
        labels = {"sink": sink_id, "protocol": running.status.protocol}
        _endpoint_metrics(exposition, "sink", running.status, labels)
        depth = outbox.depths.get(sink_id)
        if depth is None:
            continue
        exposition.family("fieldbridge_outbox_events", "gauge",
                          "Events waiting in the outbox for the broker's confirmation.").add(
            depth.events, **labels)
        exposition.family("fieldbridge_outbox_bytes", "gauge",
                          "Bytes of event JSON waiting in the outbox.").add(depth.bytes, **labels)
        exposition.family("fieldbridge_outbox_dropped_total", "counter",
                          "Events dropped unconfirmed from a full outbox (policy drop_oldest) "
                          "since the start.").add(depth.dropped, **labels)
        oldest = runtime.store.outbox_oldest(sink_id) if runtime.store.is_open else None
        exposition.family("fieldbridge_outbox_oldest_age_seconds", "gauge",
                          "Age of the oldest event waiting in the outbox (0 when empty).").add(
            max(0.0, now - oldest) if oldest is not None else 0.0, **labels)
        sink = running.sink
        exposition.family("fieldbridge_sink_in_flight", "gauge",
                          "Messages published and not yet confirmed.").add(
            sink.in_flight, **labels)
        if sink.confirm_latency is not None:
            exposition.family("fieldbridge_sink_confirm_latency_seconds", "gauge",
                              "Moving average of the time from publish to the broker's "
                              "confirmation.").add(sink.confirm_latency, **labels)
    exposition.family("fieldbridge_outbox_max_events", "gauge",
                      "The outbox's bound in events, per sink.").add(outbox.limits.max_events)
    exposition.family("fieldbridge_outbox_max_bytes", "gauge",
                      "The outbox's bound in bytes, per sink.").add(outbox.limits.max_bytes)


def render(runtime: Runtime, keys: KeyRing | None = None) -> str:
    """The exposition of one runtime's state, now."""
    exposition = Exposition()
    exposition.family("fieldbridge_info", "gauge",
                      "Version and instance id of this bridge; always 1.").add(
        1, version=__version__, bridge=runtime.bridge_id)
    exposition.family("process_start_time_seconds", "gauge",
                      "Start time of the process since the Unix epoch in seconds.").add(
        runtime.started_at)
    exposition.family("fieldbridge_ready", "gauge",
                      "1 once every source is started and the API serves.").add(
        1 if runtime.ready.is_set() else 0)
    exposition.family("fieldbridge_points", "gauge", "Configured points.").add(
        len(runtime.points))
    exposition.family("fieldbridge_points_with_value", "gauge",
                      "Points that have a last value.").add(len(runtime.router.latest))

    router = runtime.router
    exposition.family("fieldbridge_router_pending_events", "gauge",
                      "Events accepted from sources but not yet stored.").add(router.pending)
    exposition.family("fieldbridge_router_max_pending_events", "gauge",
                      "Pending events beyond which sources wait (backpressure).").add(
        router.max_pending)
    for key in sorted(set(_ROUTER_COUNTERS) | set(router.counters)):
        exposition.family(f"fieldbridge_router_{key}_total", "counter",
                          _counter_help(key, _ROUTER_COUNTERS, "Router")).add(
            router.counters[key])
    exposition.family("fieldbridge_store_written_events_total", "counter",
                      "Events written to the store since it was opened.").add(
        runtime.store.written)

    for source_id, running in runtime.sources.items():
        status = running.status
        labels = {"source": source_id, "protocol": status.protocol}
        _endpoint_metrics(exposition, "source", status, labels)
        for device_id, device in status.children.items():
            _endpoint_metrics(exposition, "device", device,
                              {**labels, "device": device_id})

    _sink_metrics(exposition, runtime)

    if keys is not None and keys.enabled:
        failures = exposition.family("fieldbridge_api_auth_failures_total", "counter",
                                     "API requests refused, by reason.")
        for failure in AuthFailure:
            failures.add(keys.failures[failure], reason=failure.value)
    return exposition.render()
