"""What the S1 consumers keep of the events the daemon delivers: how many arrived, and each
one's latency from its ``ts`` (the payload timestamp) and from its ``received_at``."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

from bench.harness import percentile

_STAMPS = re.compile(rb'"ts": ?"([^"]+)".*?"received_at": ?"([^"]+)"')
"""The event's two times; a regular expression instead of a JSON parse keeps the consumer's
own cost per message low (it has to keep up with the daemon to count it)."""
_seconds: dict[bytes, float] = {}


def _epoch(stamp: bytes) -> float | None:
    """``2026-11-21T10:15:02.125Z`` as POSIX seconds; the whole second parsed once."""
    whole, fraction = stamp[:19], stamp[19:].rstrip(b"Z")
    base = _seconds.get(whole)
    if base is None:
        try:
            base = datetime.fromisoformat(whole.decode() + "+00:00").timestamp()
        except ValueError:
            return None
        _seconds[whole] = base
    try:
        return base + (float(fraction) if fraction else 0.0)
    except ValueError:
        return None


class EventCounts:
    """Events counted since the last reset, with their latencies."""

    def __init__(self) -> None:
        self.received = 0
        self.latencies: list[float] = []
        self.in_bridge: list[float] = []
        """From the daemon's receipt (``received_at``) to here: the bridge and the broker."""

    def add(self, body: bytes) -> None:
        """Count one event (its JSON body) as arrived now."""
        arrived = time.time()
        self.received += 1
        found = _STAMPS.search(body)
        if found is None:
            return
        sent, received = _epoch(found[1]), _epoch(found[2])
        if sent is None or received is None:
            return
        self.latencies.append((arrived - sent) * 1000)
        self.in_bridge.append((arrived - received) * 1000)

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset."""
        latencies, in_bridge = list(self.latencies), list(self.in_bridge)
        return {"received": self.received, "latency_ms": {
            "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
            "samples": len(latencies)}, "from_received_ms": {
            "p50": percentile(in_bridge, 0.5), "p99": percentile(in_bridge, 0.99)}}

    def reset(self) -> dict[str, Any]:
        """Zero the counters."""
        self.received = 0
        self.latencies = []
        self.in_bridge = []
        return {"reset": True}
