"""Builders for store and router tests: a good event for a point, an acknowledgement that
records what the store had written when it was accepted.
"""

from __future__ import annotations

import time

from bridge.core.model import Event, Quality, new_event_id
from bridge.pipeline.store import Store


def make_event(
    point: str, value: float, ts: float | None = None, received_at: float | None = None
) -> Event:
    """A good event for ``point``."""
    now = time.time()
    return Event(id=new_event_id(), source="src", point=point, value=value, unit="u",
                 quality=Quality.GOOD, ts=now if ts is None else ts,
                 received_at=now if received_at is None else received_at, protocol="modbus",
                 bridge="edge", tags={"k": "v"})


class CountingAck:
    """Records how it was settled."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.accepted = 0
        self.written_when_accepted = -1

    async def accept(self) -> None:
        self.accepted += 1
        self.written_when_accepted = self.store.written

    async def reject(self, reason: str) -> None:
        raise AssertionError(f"unexpected reject: {reason}")
