"""What a Sparkplug B edge node's session keeps besides its messages: the ``bdSeq`` across
restarts, the primary host application's ``STATE``, and the pacing of rebirths.

- ``BdSeqFile``: the ``bdSeq`` of the last connection, in a small JSON file in the state
  directory, replaced atomically and fsynced before the connection whose will carries it is
  opened, so a restart (or ``kill -9``) goes on with the next one, as Sparkplug 3.0 requires;
- ``PrimaryHost``: the Sparkplug 3.0 ``STATE`` messages of the primary host application
  (``spBv1.0/STATE/<host id>``, JSON ``{"online": bool, "timestamp": ms}``), older ones
  ignored;
- ``RebirthPacer``: at most one rebirth per interval; requests that come sooner are folded into
  one rebirth at the end of the interval;
- ``alive_devices``: the Sparkplug devices whose source (and device) is up;
- ``WatchedLink``: the delivery engine's link, which also tells the sink that its connection
  is lost (its births may be waiting for the primary host).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bridge.core.sink import BridgeView, PointInfo, SinkContext
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ConnectorError

logger = logging.getLogger(__name__)

_ALIVE = frozenset({ConnectionState.UP, ConnectionState.DEGRADED})
"""States in which a source or device serves values: its Sparkplug device is born."""
STATE_NAMESPACE = "spBv1.0/STATE"
"""The topic level before the host id in a Sparkplug 3.0 ``STATE`` topic."""


class BdSeqFile:
    """The ``bdSeq`` of an edge node's last connection, kept in ``path``."""

    def __init__(self, path: Path, group_id: str, edge_node_id: str) -> None:
        self.path = path
        self.identity = {"group_id": group_id, "edge_node_id": edge_node_id}

    def load(self) -> int | None:
        """The ``bdSeq`` saved for this edge node; ``None`` when there is none (or only one
        for another group or edge node id, or a file that cannot be read: logged)."""
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("cannot read the Sparkplug bdSeq from %s (%s): starting at 0",
                           self.path, exc)
            return None
        if not isinstance(document, dict) or any(document.get(key) != value
                                                 for key, value in self.identity.items()):
            return None
        bd_seq = document.get("bd_seq")
        if isinstance(bd_seq, int) and not isinstance(bd_seq, bool) and 0 <= bd_seq <= 255:
            return bd_seq
        return None

    def save(self, bd_seq: int) -> None:
        """Keep ``bd_seq`` for good: written to a temporary file, fsynced, renamed over the
        old one, and the directory fsynced. Raises ``OSError``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({**self.identity, "bd_seq": bd_seq}).encode()
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


@dataclass(frozen=True, slots=True)
class HostState:
    """One ``STATE`` message of a host application."""

    online: bool
    timestamp: int
    """Milliseconds since 1970, as the host stamped it."""


def parse_state(payload: bytes) -> HostState:
    """A Sparkplug 3.0 ``STATE`` payload; ``ValueError`` saying why it is not one."""
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"a STATE payload is JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError("a STATE payload is a JSON object")
    online, timestamp = document.get("online"), document.get("timestamp")
    if not isinstance(online, bool):
        raise ValueError("a STATE payload's `online` is true or false")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise ValueError("a STATE payload's `timestamp` is milliseconds since 1970")
    return HostState(online, timestamp)


class PrimaryHost:
    """What the edge node knows of its primary host application: online or not, from its
    newest ``STATE`` message. Kept across connections: a retained ``STATE`` seen again is not
    newer than the one already taken."""

    def __init__(self, host_id: str) -> None:
        self.host_id = host_id
        self.topic = f"{STATE_NAMESPACE}/{host_id}"
        self.online = asyncio.Event()
        self.timestamp = -1
        """The newest ``STATE`` timestamp taken; -1 before the first."""
        self.since: float | None = None
        """When (POSIX seconds) the last change was taken."""

    def take(self, state: HostState) -> bool:
        """Take ``state`` unless an equal or newer one was taken; whether it was taken."""
        if state.timestamp < self.timestamp:
            return False
        self.timestamp = state.timestamp
        if state.online != self.online.is_set():
            self.since = time.time()
        if state.online:
            self.online.set()
        else:
            self.online.clear()
        return True

    def details(self) -> dict[str, object]:
        """For the inventory: the host id, whether it is online and since when."""
        return {"id": self.host_id, "online": self.online.is_set(),
                "timestamp": self.timestamp if self.timestamp >= 0 else None,
                "since": self.since}


class RebirthPacer:
    """Carries out rebirth requests at most once per ``interval`` seconds: the first at once,
    those that come sooner folded into one rebirth when the interval has passed."""

    def __init__(self, interval: float, rebirth: Callable[[], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._rebirth = rebirth
        self._clock = clock
        self._last: float | None = None
        self._pending: asyncio.TimerHandle | None = None
        self.folded = 0
        """Requests folded into a rebirth already done or due."""

    def request(self) -> bool:
        """A rebirth is asked for: carried out now (``True``), or folded into the one due."""
        now = self._clock()
        if self._pending is not None:
            self.folded += 1
            return False
        if self._last is None or now - self._last >= self.interval:
            self._run()
            return True
        self.folded += 1
        self._pending = asyncio.get_running_loop().call_later(
            self._last + self.interval - now, self._due)
        return False

    def cancel(self) -> None:
        """Forget a rebirth that is due (the connection is closing)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _due(self) -> None:
        self._pending = None
        self._run()

    def _run(self) -> None:
        self._last = self._clock()
        self._rebirth()


class WatchedLink:
    """The engine's context for one connection, telling the sink too when the connection is
    lost (the births may be waiting for the primary host then)."""

    def __init__(self, link: SinkContext) -> None:
        self.link = link
        self.lost = asyncio.Event()

    @property
    def status(self) -> EndpointStatus:
        """The sink's state and counters."""
        return self.link.status

    @property
    def bridge(self) -> BridgeView | None:
        """The bridge the sink mirrors."""
        return self.link.bridge

    def confirmed(self, seqs: Sequence[int]) -> None:
        """The broker took these rows."""
        self.link.confirmed(seqs)

    def refused(self, seqs: Sequence[int]) -> None:
        """The broker refused these rows."""
        self.link.refused(seqs)

    def failed(self, error: ConnectorError) -> None:
        """The connection is lost."""
        self.lost.set()
        self.link.failed(error)


def alive_devices(points: Mapping[str, PointInfo],
                  sources: Mapping[str, EndpointStatus]) -> set[str]:
    """The Sparkplug devices whose values are live: those of a source that is up (or
    degraded), and of a Fieldbridge device under it that is up (or degraded)."""
    alive = {source_id for source_id, status in sources.items() if status.state in _ALIVE}
    for point in points.values():
        if point.device is None or point.source not in alive:
            continue
        device = sources[point.source].children.get(point.device)
        if device is None or device.state in _ALIVE:
            alive.add(point.device)
    return alive
