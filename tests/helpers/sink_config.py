"""Builders for sink configuration tests: an event to select or route.
"""

from __future__ import annotations

from typing import Any

from bridge.core.model import Event, Quality


def event(point: str = "boiler.t", **fields: Any) -> Event:
    """An event to route."""
    values: dict[str, Any] = {"id": "i", "source": "plant", "point": point, "value": 1.0,
                              "unit": "degC", "quality": Quality.GOOD, "ts": 1.0,
                              "received_at": 1.0, "protocol": "mqtt", "bridge": "edge",
                              "tags": {}}
    values.update(fields)
    return Event(**values)
