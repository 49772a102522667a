"""The Source contract: what every protocol connector implements.

A source knows transport and addressing only. It is built with the addresses it must serve
(derived from the compiled mapping), connects, yields ``Reading``s through its context, and
raises ``ConnectorError`` when the connection fails. It never retries the connection itself:
the supervisor owns reconnecting and backoff.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bridge.core.counters import EVENTS, READINGS, REJECTED
from bridge.core.message_mapper import MessageMapper
from bridge.core.model import Event, Reading, Settlement, Value
from bridge.core.status import EndpointStatus
from bridge.errors import DecodeError, ErrorCategory, ReadError, WriteError

Publish = Callable[[Sequence[Reading]], Awaitable[None]]
Submit = Callable[[Sequence[Event], Sequence[Settlement]], Awaitable[None]]


@dataclass(frozen=True)
class SourceContext:
    """What a running source is handed by the supervisor."""

    status: EndpointStatus
    """The source's status; devices are ``status.child(device_id)``."""
    publish: Publish
    """Hand readings on to mapping and routing; waits when the router applies backpressure."""
    submit: Submit | None = None
    """Hand on events mapped elsewhere (in a worker process) with the upstream messages to
    settle once they are stored; waits like ``publish``."""


class Source(abc.ABC):
    """One supervised connection to an endpoint."""

    def __init__(self, *, source_id: str, protocol: str, endpoint: str) -> None:
        self.id = source_id
        self.protocol = protocol
        self.endpoint = endpoint
        """Where it connects, secrets redacted: shown in the inventory and logs."""

    @abc.abstractmethod
    async def run(self, context: SourceContext) -> None:
        """Connect, then serve until cancelled.

        Call ``context.status.up()`` once connected. Raise ``ConnectorError`` when the
        connection fails or is lost; the supervisor logs it once, backs off and calls ``run``
        again. Per-device trouble that leaves the connection usable is reported on the
        device's status and as ``bad`` readings, not raised.
        """

    def device_endpoints(self) -> dict[str, str]:
        """Devices behind this source and where each is reached, for the inventory."""
        return {}

    async def read(self, point_id: str) -> list[Reading]:
        """Read one point from the device now (live read-through), bypassing the poll cycle.

        Raises ``ReadError`` when the device cannot be read (or the protocol has no live
        reads)."""
        raise ReadError(point_id, f"{self.protocol} sources do not support live reads",
                        ErrorCategory.CONFIG)

    async def write(self, point_id: str, value: Value) -> None:
        """Write a value to a writable point."""
        raise WriteError(point_id, f"{self.protocol} sources do not support write-back",
                         ErrorCategory.CONFIG)


class Mapper(Protocol):
    """A compiled mapping: raw readings in, normalized events out."""

    def map(self, reading: Reading) -> list[Event]:
        """Events for one reading; may be empty (report-by-exception).

        A reading that cannot be mapped as a whole (malformed payload) raises ``DecodeError``;
        a point that cannot be decoded yields a ``bad`` event instead.
        """
        ...


def map_readings(mapper: Mapper, status: EndpointStatus,
                 readings: Sequence[Reading]) -> tuple[list[Event], list[Settlement]]:
    """Map a batch of readings: their events, and how to settle their upstream messages.

    A reading that cannot be mapped is counted as rejected, with its reason on the status;
    its message is settled with that reason (dead-lettered), the others are accepted.
    """
    counters = status.counters
    events: list[Event] = []
    settlements: list[Settlement] = []
    for reading in readings:
        counters.add(READINGS)
        try:
            mapped = mapper.map(reading)
        except DecodeError as exc:
            counters.add(REJECTED)
            status.details["last_rejection"] = {
                "address": str(reading.address), "reason": exc.reason, "at": time.time()}
            if reading.ack is not None:
                settlements.append((reading.ack, exc.reason))
            continue
        events.extend(mapped)
        if reading.ack is not None:
            settlements.append((reading.ack, None))
    counters.add(EVENTS, len(events))
    return events, settlements


@dataclass(frozen=True)
class BuildContext:
    """What a protocol needs to build its source and mapping."""

    bridge_id: str
    state_dir: Path
    config_dir: Path | None = None
    """Where the configuration file is: relative file names in a source's config (TLS
    certificates, say) are relative to it."""
    worker: int | None = None
    """In a worker process: which of the source's ``workers`` this is (from 0)."""

    def resolve(self, path: Path) -> Path:
        """``path`` made absolute against the configuration's directory."""
        if path.is_absolute() or self.config_dir is None:
            return path.expanduser()
        return self.config_dir / path


@dataclass
class SourceUnit:
    """A configured source: its connection and its compiled mapping."""

    source: Source
    mapper: Mapper

    def attach(self, status: EndpointStatus) -> None:
        """Have the mapping count into ``status``, the source's own.

        A message mapping counts bad values and dropped points and keeps the last of each in
        the details. The framework calls this once, when it makes the source's status
        (``bridge.pipeline.supervisor.source_status``), so no source has to remember it.
        """
        if isinstance(self.mapper, MessageMapper):
            self.mapper.attach(status)
