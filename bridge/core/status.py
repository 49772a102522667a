"""Connection state and counters of every source and device, as the inventory shows them."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bridge.core.counters import CONNECTS, ERRORS, Counts
from bridge.core.model import isoformat
from bridge.errors import ErrorCategory

logger = logging.getLogger(__name__)


class ConnectionState(enum.StrEnum):
    """Where a connection stands."""

    CONNECTING = "connecting"
    UP = "up"
    DEGRADED = "degraded"
    """Connected, but some points or devices fail."""
    DOWN = "down"
    DISABLED = "disabled"


@dataclass
class EndpointStatus:
    """State, last error and counters of one source or device.

    State changes are logged once each way, not on every failed poll.
    """

    name: str
    kind: str
    """``source`` or ``device``."""
    protocol: str
    endpoint: str
    state: ConnectionState = ConnectionState.CONNECTING
    since: float = field(default_factory=time.time)
    last_success: float | None = None
    last_error: str | None = None
    error_category: ErrorCategory | None = None
    last_error_at: float | None = None
    counters: Counts = field(default_factory=Counts)
    children: dict[str, EndpointStatus] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    watcher: Callable[[EndpointStatus], None] | None = field(
        default=None, repr=False, compare=False)
    """Called with this status (or a device's under it) after every change of state."""

    def child(self, name: str, endpoint: str | None = None) -> EndpointStatus:
        """The status of a device under this source, created on first use."""
        status = self.children.get(name)
        if status is None:
            status = EndpointStatus(name=name, kind="device", protocol=self.protocol,
                                    endpoint=endpoint or self.endpoint, watcher=self.watcher)
            self.children[name] = status
        return status

    def watch(self, watcher: Callable[[EndpointStatus], None]) -> None:
        """Call ``watcher`` after every change of state of this status and its devices'."""
        self.watcher = watcher
        for child in self.children.values():
            child.watch(watcher)

    def _move(self, state: ConnectionState) -> bool:
        if state is self.state:
            return False
        self.state = state
        self.since = time.time()
        if self.watcher is not None:
            self.watcher(self)
        return True

    def connecting(self) -> None:
        """A connection attempt starts; a connection that is down stays down until it is up."""
        self.counters.add(CONNECTS)
        if self.state is not ConnectionState.DOWN:
            self._move(ConnectionState.CONNECTING)

    def up(self) -> None:
        """The endpoint answered as expected."""
        self.last_success = time.time()
        previous = self.state
        if self._move(ConnectionState.UP) and previous in (
            ConnectionState.DOWN, ConnectionState.DEGRADED
        ):
            logger.info("%s %s recovered", self.kind, self.name)

    def degraded(self, reason: str, category: ErrorCategory) -> None:
        """Connected, but something under it fails."""
        self._record(reason, category)
        if self._move(ConnectionState.DEGRADED):
            logger.warning("%s %s degraded: %s", self.kind, self.name, reason)

    def down(self, reason: str, category: ErrorCategory) -> None:
        """The endpoint is unreachable or refused us."""
        self._record(reason, category)
        if self._move(ConnectionState.DOWN):
            logger.warning("%s %s down: %s (%s)", self.kind, self.name, reason, category)

    def note(self, reason: str, category: ErrorCategory) -> None:
        """An error that does not change the state (a cluster node skipped for another one):
        shown as the last error and counted, not logged."""
        self._record(reason, category)

    def disabled(self) -> None:
        """Configured but not run."""
        self._move(ConnectionState.DISABLED)

    def success(self) -> None:
        """One exchange went well: remember when, and recover from down or degraded."""
        self.last_success = time.time()
        if self.state is not ConnectionState.UP:
            self.up()

    def _record(self, reason: str, category: ErrorCategory) -> None:
        self.last_error = reason
        self.error_category = category
        self.last_error_at = time.time()
        self.counters.add(ERRORS)

    def snapshot(self) -> StatusSnapshot:
        """State, errors, counters, details and devices as plain data (sent by a worker
        process to the daemon, which ``mirror``s it)."""
        return StatusSnapshot(
            state=self.state, since=self.since, last_success=self.last_success,
            last_error=self.last_error, error_category=self.error_category,
            last_error_at=self.last_error_at, counters=self.counters.to_dict(),
            details=dict(self.details),
            children={name: child.snapshot() for name, child in self.children.items()})

    def mirror(self, snapshot: StatusSnapshot, *, counters: bool = True) -> None:
        """Take state, errors, details and devices (and counters, unless told not to) from a
        ``snapshot``, without logging: the process that made it logged its changes. A counter
        name that is not declared raises ``UndeclaredCounterError``."""
        moved = snapshot.state is not self.state
        self.state = snapshot.state
        self.since = snapshot.since
        self.last_success = snapshot.last_success
        self.last_error = snapshot.last_error
        self.error_category = snapshot.error_category
        self.last_error_at = snapshot.last_error_at
        if counters:
            self.counters = Counts(snapshot.counters)
        self.details.update(snapshot.details)
        for name, child in snapshot.children.items():
            self.child(name).mirror(child)
        if moved and self.watcher is not None:
            self.watcher(self)

    def to_dict(self) -> dict[str, Any]:
        """The inventory entry."""

        def stamp(value: float | None) -> str | None:
            return isoformat(value) if value is not None else None

        entry: dict[str, Any] = {
            "id": self.name,
            "kind": self.kind,
            "protocol": self.protocol,
            "endpoint": self.endpoint,
            "state": self.state.value,
            "since": stamp(self.since),
            "last_success": stamp(self.last_success),
            "last_error": self.last_error,
            "error_category": self.error_category.value if self.error_category else None,
            "last_error_at": stamp(self.last_error_at),
            "counters": self.counters.to_dict(),
        }
        if self.details:
            entry["details"] = dict(self.details)
        if self.children:
            entry["devices"] = [child.to_dict() for child in self.children.values()]
        return entry


class StatusSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """An ``EndpointStatus`` as plain data: what a worker process reports of its source or
    sink, and its devices under it."""

    state: ConnectionState
    since: float
    last_success: float | None = None
    last_error: str | None = None
    error_category: ErrorCategory | None = None
    last_error_at: float | None = None
    counters: dict[str, int] = msgspec.field(default_factory=dict)
    """Declared counter name → count (``Counts.to_dict``)."""
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    children: dict[str, StatusSnapshot] = msgspec.field(default_factory=dict)
