"""The Sink contract: what every delivery connector implements, and what it is handed.

A sink author meets three names: ``Sink`` (the contract), ``SinkContext`` (what one connection
is handed: where to report what the broker did) and ``OutboxRow`` (one event waiting for the
sink, handed over in batches). The delivery engine (``bridge.pipeline.delivery``) reads the
rows waiting in the outbox, in order, hands them to the sink and deletes them once the broker
confirmed them; the supervisor owns reconnecting and backoff. Events stay in the outbox while
the sink is down, and a new connection starts again from the oldest unconfirmed one.

Beside the contract: which events a sink takes (``EventSelector``), address templates
(``compile_address``), and what a sink that mirrors the bridge sees of it (``BridgeView``).
This module may import the config models, the rest of the core and the errors.
"""
from __future__ import annotations

import abc
import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bridge.config.models import SinkBase, ValueType
from bridge.core.model import Event, Value
from bridge.core.status import EndpointStatus
from bridge.core.templates import Template
from bridge.errors import ConnectorError


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


class SinkContext(Protocol):
    """What a sink is handed for one connection: where it reports what its broker did with
    the rows it published, its status, and the bridge (for a sink that mirrors it)."""

    @property
    def status(self) -> EndpointStatus:
        """The sink's state and counters (a sink may count what only it knows, such as
        unroutable messages, with a counter declared in ``bridge.core.counters``, and mark
        itself degraded while its broker holds it back)."""
        ...

    @property
    def bridge(self) -> BridgeView | None:
        """The bridge's points, latest values, source states and write path, for the sinks
        that mirror it; ``None`` in a sink's worker process."""
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


class Sink(abc.ABC):
    """The contract of a delivery connector: talk to one broker (or file, or service).

    A connection is ``connect``, any number of ``publish`` calls whose outcomes the sink
    reports through the context (``confirmed``, ``refused``, ``failed``), then ``close``.
    The delivery engine (``bridge.pipeline.delivery``) owns the rest, for every sink alike:
    the cursor, reading the rows waiting in the outbox, the in-flight ``window``, recording
    confirmations, publishing refused rows again in order after ``retry``, and the figures
    (publish rate, confirm latency, in flight); the supervisor reconnects with backoff.
    """

    window: int = 1000
    """Rows published and not yet confirmed, at most."""
    retry: float = 1.0
    """Seconds before refused rows are published again (doubling while refusals go on)."""
    refusal: str = "refused by the broker"
    """What a refusal most likely means, for the status message."""

    def __init__(self, config: SinkBase, *, endpoint: str) -> None:
        self.id = config.id
        self.protocol = config.protocol
        self.endpoint = endpoint
        """Where it connects, secrets redacted: shown in the inventory and logs."""
        self.selector = EventSelector.of(config)

    def address(self, event: Event) -> str:
        """Where ``event`` is published (a routing key, a topic); computed once, when the
        event is stored, and handed back as ``OutboxRow.address``. Empty unless overridden:
        a sink with one destination needs none."""
        return ""

    def route(self) -> OutboxRoute:
        """How the store fills this sink's outbox."""
        return OutboxRoute(self.id, self.selector, self.address)

    @abc.abstractmethod
    async def connect(self, context: SinkContext) -> None:
        """Open the connection and prepare publishing (declare, enable confirms); raise
        ``ConnectorError`` when it cannot. Report outcomes and failures through ``context``
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

    def details(self) -> dict[str, Any]:
        """What the inventory shows of this sink beyond the engine's figures (its window, its
        client id); nothing unless overridden."""
        return {}
