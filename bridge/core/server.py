"""The northbound Server contract: what a connector that serves bridged points implements.

A server (a Modbus TCP slave, an OPC-UA server) listens for clients that pull the latest
value of configured points. It reads them through the runtime's ``BridgeView`` (points,
latest events, source states) and writes through its one audited write path. The runtime
starts every enabled server at start-up, before the sources and whatever their state, and
stops it after them; a server counts what it serves in its ``EndpointStatus``.

This module may import the config models, the rest of the core and the errors.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from bridge.config.models import ResolvedPoint, ServerBase
from bridge.config.yamlsource import KeyPath
from bridge.core.model import Event, Quality
from bridge.core.sink import BridgeView
from bridge.core.source import BuildContext
from bridge.core.status import EndpointStatus


class ServerView(BridgeView, Protocol):
    """What a northbound server sees of the bridge: the mirror's view, and every stored
    batch of events as it is stored (to push data changes to subscribed clients)."""

    def subscribe(self, listener: Callable[[Sequence[Event]], None]) -> Callable[[], None]:
        """Call ``listener`` on the event loop with every stored batch of events; returns
        the function that unsubscribes it."""
        ...


ServerFactory = Callable[[ServerBase, BuildContext], "Server"]
"""Builds the server of one configured ``servers:`` entry (its state in the context's
``state_dir``: an OPC-UA server's certificate and trust list)."""


class Server(abc.ABC):
    """The contract of a northbound server: listen, serve, stop.

    ``start`` binds the port and returns once clients can connect, or raises
    ``bridge.errors.ServerError`` (a port already taken); ``stop`` closes every client
    connection and the listener and leaves no task behind.
    """

    def __init__(self, config: ServerBase) -> None:
        self.id = config.id
        self.protocol = config.protocol
        self.endpoint = config.endpoint()
        """Where it listens: shown in the inventory and logs."""

    @property
    @abc.abstractmethod
    def port(self) -> int | None:
        """The port it listens on while it serves; ``None`` before ``start``."""

    @abc.abstractmethod
    async def start(self, bridge: ServerView, status: EndpointStatus) -> None:
        """Bind and start serving the points ``bridge`` shows; count in ``status``."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Close every connection and the listener."""

    def details(self) -> dict[str, Any]:
        """What the inventory shows of this server beyond its counters; nothing unless
        overridden."""
        return {}


ServerCheck = tuple[KeyPath, str]
"""An issue a server's check finds: the key path inside the server's entry, and why."""


def no_server_issues(config: ServerBase,
                     points: Mapping[str, ResolvedPoint]) -> list[ServerCheck]:
    """The default check of a server: nothing beyond its model."""
    return []


def servable(event: Event | None, stale_after: float | None, now: float | None = None) -> bool:
    """Whether an event carries a value a server may serve as current: not ``bad``, and
    received no longer than ``stale_after`` seconds ago (``None``: any age)."""
    if event is None or event.quality is Quality.BAD or event.value is None:
        return False
    if stale_after is None:
        return True
    return (time.time() if now is None else now) - event.received_at <= stale_after
