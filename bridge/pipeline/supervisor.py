"""The supervisor: runs every source and sink, reconnects with jittered exponential backoff."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from bridge.core.counters import RECONNECTS
from bridge.core.source import SourceUnit
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory

logger = logging.getLogger(__name__)


@dataclass
class Backoff:
    """Exponential backoff with full jitter between ``initial`` and ``maximum`` seconds."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        """The delay before the next attempt."""
        ceiling = min(self.maximum, self.initial * self.factor ** self.attempts)
        self.attempts += 1
        # Half fixed, half random: spreads reconnect storms while keeping a floor.
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        """The connection worked: start again from the shortest delay."""
        self.attempts = 0


class Supervised(Protocol):
    """What a connector's ``run`` is handed: at least its status."""

    @property
    def status(self) -> EndpointStatus:
        """The connection's state and counters."""
        ...


ContextT = TypeVar("ContextT", bound=Supervised, contravariant=True)


class Connector(Protocol[ContextT]):
    """A source or a sink: runs on its context until cancelled, raises when the link fails."""

    @property
    def id(self) -> str:
        """The configured id."""
        ...

    async def run(self, context: ContextT) -> None:
        """Connect and serve; raise ``ConnectorError`` when the connection fails."""


STABLE_AFTER = 10.0
"""Seconds a connection must stay up before its backoff starts again from the shortest delay."""


async def supervise(
    connector: Connector[ContextT],
    context: ContextT,
    backoff: Backoff | None = None,
) -> None:
    """Run one source or sink forever: connect, serve, and on failure back off and reconnect."""
    backoff = backoff or Backoff()
    status = context.status
    logged: str | None = None
    # The internal error last logged with its traceback: a repetition is not logged again.
    while True:
        status.connecting()
        started = time.monotonic()
        try:
            await connector.run(context)
            reason = f"connection closed by the {status.kind}"
            category = ErrorCategory.TRANSIENT
        except ConnectorError as exc:
            reason, category = exc.reason, exc.category
        except Exception as exc:
            # A bug in one connector must not take the others down: log it with its
            # traceback (once, not on every retry), show it in the inventory, and restart
            # that connector alone.
            reason = f"internal error: {type(exc).__name__}: {exc}"
            category = ErrorCategory.PROTOCOL
            if reason != logged:
                logger.exception("%s %s failed unexpectedly", status.kind, connector.id)
                logged = reason
        was_up = status.state in (ConnectionState.UP, ConnectionState.DEGRADED)
        status.down(reason, category)
        status.counters.add(RECONNECTS)
        if was_up and time.monotonic() - started >= STABLE_AFTER:
            backoff.reset()
        delay = backoff.next()
        status.details["retry_in"] = round(delay, 3)
        await asyncio.sleep(delay)


def source_status(unit: SourceUnit) -> EndpointStatus:
    """A fresh status for a source, with its devices listed and its mapping counting into it."""
    source = unit.source
    status = EndpointStatus(name=source.id, kind="source", protocol=source.protocol,
                            endpoint=source.endpoint)
    for device, endpoint in source.device_endpoints().items():
        status.child(device, endpoint)
    unit.attach(status)
    return status
