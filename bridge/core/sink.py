"""The Sink contract: what every delivery connector implements.

A sink reads the events waiting for it in the outbox, in order, publishes them and deletes them
once the broker confirmed them. Like a source it connects, serves until cancelled and raises
``ConnectorError`` when the connection fails; the supervisor owns reconnecting and backoff.
Events stay in the outbox while the sink is down, and a new connection starts again from the
oldest unconfirmed one.
"""

from __future__ import annotations

import abc
import asyncio
import fnmatch
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.config.models import SinkBase, ValueType
from bridge.core.model import Event, Value
from bridge.core.payload import Template
from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory


class EventSelector:
    """Which events a sink takes: by source id and by point-id pattern."""

    def __init__(self, sources: Sequence[str] = (), points: Sequence[str] = ()) -> None:
        self.sources = frozenset(sources)
        self.pattern = (re.compile("|".join(fnmatch.translate(pattern) for pattern in points))
                        if points else None)

    @classmethod
    def of(cls, config: SinkBase) -> EventSelector:
        """The selector a sink's configuration describes."""
        return cls(config.sources, config.points)

    def __call__(self, event: Event) -> bool:
        """Whether the sink takes ``event``."""
        return self.takes(event.source, event.point)

    def takes(self, source: str, point: str) -> bool:
        """Whether the sink takes the events of ``point`` from ``source``."""
        if self.sources and source not in self.sources:
            return False
        return self.pattern is None or self.pattern.match(point) is not None


ADDRESS_FIELDS: dict[str, Callable[[Event], str]] = {
    "source": lambda event: event.source,
    "point": lambda event: event.point,
    "protocol": lambda event: event.protocol,
    "quality": lambda event: event.quality.value,
    "bridge": lambda event: event.bridge,
    "unit": lambda event: event.unit or "",
}
"""The event fields an address template (a routing key, a topic) may name, besides
``{tags.NAME}`` (empty when the event has no such tag, as ``{unit}`` without a unit)."""


def check_address_template(text: str) -> str:
    """``text`` when it is a valid address template; ``ValueError`` for an unbalanced brace or
    a placeholder that is not an event field."""
    for name in Template.parse(text).names:
        if name not in ADDRESS_FIELDS and not name.startswith("tags."):
            known = ", ".join(f"{{{known}}}" for known in ADDRESS_FIELDS)
            raise ValueError(f"placeholder {{{name}}} is not known; use {known} or {{tags.NAME}}")
    return text


def compile_address(text: str, escape: Callable[[str], str]) -> Callable[[Event], str]:
    """The address of an event from a template such as ``{source}.{point}``: each placeholder
    is the event's field passed through ``escape`` (which keeps it one level of the address);
    the text around the placeholders is kept as written."""
    template = Template.parse(text)
    getters = [(name, _tag(name.removeprefix("tags.")) if name.startswith("tags.")
                else ADDRESS_FIELDS[name]) for name in template.names]

    def address(event: Event) -> str:
        return template.expand({name: escape(get(event)) for name, get in getters})

    return address


def _tag(name: str) -> Callable[[Event], str]:
    def value(event: Event) -> str:
        return event.tags.get(name, "")

    return value


class OutboxView(Protocol):
    """What a sink needs of the outbox: ``SinkOutbox`` in the daemon's process, a view whose
    reads and deletions the daemon carries out in a sink's worker process."""

    @property
    def signal(self) -> asyncio.Event:
        """Set when rows were stored for the sink (the sink may set it to wake itself)."""
        ...

    @property
    def arrivals(self) -> int:
        """Batches stored with rows for the sink so far."""
        ...

    def read(self, after: int, limit: int) -> asyncio.Future[list[OutboxRow]]:
        """The oldest ``limit`` rows after ``seq`` ``after``, in order."""
        ...

    def take(self, after: int, limit: int) -> list[OutboxRow] | None:
        """Like ``read``, from memory, or ``None``: then ``read``."""
        ...

    def confirm(self, seqs: Sequence[int]) -> asyncio.Future[int]:
        """Delete rows the broker confirmed."""
        ...


@dataclass
class RateMeter:
    """Events per second over the last ``window`` seconds, from a running total."""

    window: float = 10.0
    total: int = 0
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, count: int, now: float | None = None) -> None:
        """Count ``count`` more events."""
        now = time.monotonic() if now is None else now
        self.total += count
        samples = self._samples
        if not samples or now - samples[-1][0] >= 1.0:
            samples.append((now, self.total))
        else:
            samples[-1] = (samples[-1][0], self.total)
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()

    def rate(self, now: float | None = None) -> float:
        """Events per second over the window (0 when idle)."""
        now = time.monotonic() if now is None else now
        samples = self._samples
        if not samples or now - samples[-1][0] >= self.window:
            return 0.0
        start_time, start_total = samples[0]
        span = max(now - start_time, 1.0)
        return (self.total - start_total) / span


@dataclass(frozen=True, slots=True)
class OutboxRoute:
    """Which events one sink takes, and the address (routing key) each is published to."""

    sink: str
    accepts: Callable[[Event], bool]
    address: Callable[[Event], str]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One event waiting for one sink."""

    seq: int
    id: str
    source: str
    point: str
    quality: str
    ts: float
    created: float
    """When the row was stored (POSIX seconds)."""
    address: str
    size: int
    """Bytes of ``body`` (UTF-8)."""
    body: str
    """The event's documented JSON."""


class SinkLink(Protocol):
    """What a connected sink reports to the delivery engine, from its broker's callbacks."""

    @property
    def status(self) -> EndpointStatus:
        """The sink's state and counters (a sink may count what only it knows, such as
        unroutable messages, and mark itself degraded while its broker holds it back)."""
        ...

    def confirmed(self, seqs: Sequence[int]) -> None:
        """The broker took these rows for good: they leave the outbox."""
        ...

    def refused(self, seqs: Sequence[int]) -> None:
        """The broker refused these rows: they are published again, in order, later."""
        ...

    def failed(self, error: ConnectorError) -> None:
        """The connection is lost: the engine ends this connection with ``error``."""
        ...


@dataclass(frozen=True, slots=True)
class PointInfo:
    """A configured point as a sink that mirrors the bridge's points sees it."""

    id: str
    source: str
    device: str | None
    """The device behind the source, for sources with devices."""
    unit: str | None
    writable: bool
    value_type: ValueType | None
    """What its values are when the configuration fixes it; ``None``: only values tell."""


class BridgeView(Protocol):
    """What a sink that mirrors the bridge, rather than only forwarding its events (a
    Sparkplug B edge node), sees of it beyond its outbox; the runtime provides it."""

    def points(self) -> Mapping[str, PointInfo]:
        """The configured points, by id (names with placeholders are not point ids yet:
        such points appear in events only)."""
        ...

    def latest(self) -> Mapping[str, Event]:
        """The latest stored event of every point that has one, by point id."""
        ...

    def sources(self) -> Mapping[str, EndpointStatus]:
        """The live status of every enabled source, by id; devices are its children."""
        ...

    def watch(self, watcher: Callable[[], None]) -> Callable[[], None]:
        """Call ``watcher`` (on the event loop) after any source or device changed state;
        returns the function that stops it."""
        ...

    async def write(self, point_id: str, value: Value, who: str) -> None:
        """Write ``value`` to a point through its source, as ``PUT /v1/points/{id}`` does,
        and audit it as done by ``who``. Raises ``KeyError`` for a point that is not
        configured, ``NotWritableError`` for one that is not writable and ``WriteError``
        when the device refuses or cannot be reached."""
        ...

    async def write_command(self, writes: Sequence[tuple[str, Value]],
                            who: str) -> list[Exception | None]:
        """Write several points as one command, in order, as ``write`` does each, audited
        as one record; each write's outcome in order (``None``: written, else the error
        ``write`` would raise)."""
        ...


Deliver = Callable[["BrokerSink", "SinkContext"], Awaitable[None]]
"""The delivery engine: drives one connection of a ``BrokerSink`` over its outbox."""


@dataclass(frozen=True)
class SinkContext:
    """What a running sink is handed by the supervisor."""

    status: EndpointStatus
    outbox: OutboxView
    deliver: Deliver | None = None
    """The delivery engine (``bridge.pipeline.delivery.deliver``)."""
    bridge: BridgeView | None = None
    """The bridge's points, latest values, source states and write path, for the sinks that
    mirror it; ``None`` in a sink's worker process."""


class Sink(abc.ABC):
    """One supervised connection that delivers the outbox to a broker."""

    def __init__(self, *, sink_id: str, protocol: str, endpoint: str,
                 selector: EventSelector) -> None:
        self.id = sink_id
        self.protocol = protocol
        self.endpoint = endpoint
        """Where it connects, secrets redacted: shown in the inventory and logs."""
        self.selector = selector
        self.meter = RateMeter()
        """Deliveries the broker confirmed: the publish rate."""
        self.confirm_latency: float | None = None
        """Seconds from publish to confirmation, as a moving average."""
        self.in_flight = 0
        """Published, not yet confirmed."""

    def route(self) -> OutboxRoute:
        """How the store fills this sink's outbox."""
        return OutboxRoute(self.id, self.selector, self.address)

    @abc.abstractmethod
    def address(self, event: Event) -> str:
        """Where ``event`` is published (a routing key, a topic)."""

    @abc.abstractmethod
    async def run(self, context: SinkContext) -> None:
        """Connect, then deliver the outbox until cancelled; raise ``ConnectorError`` when the
        connection fails or is lost."""

    def details(self) -> dict[str, Any]:
        """Live figures for the inventory: publish rate, confirm latency, in flight."""
        latency = self.confirm_latency
        return {
            "publish_rate": round(self.meter.rate(), 1),
            "confirm_latency_ms": round(latency * 1000, 2) if latency is not None else None,
            "in_flight": self.in_flight,
        }


class BrokerSink(Sink):
    """A sink the delivery engine drives: it only talks to its broker.

    The engine owns the rest: the cursor, reading stored rows (from memory when they are
    fresh, from the store when catching up), the in-flight window, turning confirmations
    into outbox updates, publishing refused rows again in order, and the counters. A
    connection is ``connect``, any number of ``publish`` calls whose outcomes the sink
    reports through the ``SinkLink``, then ``close``.
    """

    window: int = 1000
    """Rows published and not yet confirmed, at most."""
    retry: float = 1.0
    """Seconds before refused rows are published again (doubling while refusals go on)."""
    refusal: str = "refused by the broker"
    """What a refusal most likely means, for the status message."""

    async def run(self, context: SinkContext) -> None:
        """Hand the connection to the delivery engine."""
        if context.deliver is None:
            raise ConnectorError(self.endpoint, "no delivery engine to run the sink",
                                 ErrorCategory.CONFIG)
        await context.deliver(self, context)

    @abc.abstractmethod
    async def connect(self, link: SinkLink) -> None:
        """Open the connection and prepare publishing (declare, enable confirms); raise
        ``ConnectorError`` when it cannot. Report outcomes and failures through ``link``
        from now until ``close``."""

    @abc.abstractmethod
    def publish(self, rows: Sequence[OutboxRow]) -> None:
        """Send ``rows`` to the broker, in order, without waiting for its answer; raise
        ``ConnectorError`` when the connection cannot take them."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection (whatever state it is in)."""

    def ready(self) -> bool:
        """False while the broker holds publishing back (the sink said why in the status):
        the engine then leaves the status alone when refusals end."""
        return True
