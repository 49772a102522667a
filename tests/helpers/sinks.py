"""Builders for sink tests: events as a source hands them over, a one-sink configuration on a
fresh exchange, feeding the router, reading consumed bodies, counting acknowledgements.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge.core.model import Event, Quality, new_event_id
from helpers.brokers import (
    AMQP_HOST,
    AMQP_PORT,
    BridgeRun,
    RabbitAdmin,
    unique,
    write_sink_config,
)

SINK = "rabbit"


def make_event(source: str, point: str, value: float | None, **fields: Any) -> Event:
    """An event as a source would hand it to the router."""
    now = time.time()
    values: dict[str, Any] = {"id": new_event_id(), "source": source, "point": point,
                              "value": value, "unit": "degC", "quality": Quality.GOOD,
                              "ts": now - 1.5, "received_at": now, "protocol": "modbus",
                              "bridge": "edge", "tags": {"site": "north"}}
    values.update(fields)
    return Event(**values)


def write_bridge_config(tmp_path: Path, rabbit: RabbitAdmin, sink: dict[str, Any],
                        **top: Any) -> Path:
    """A configuration with no sources and one sink on a fresh exchange; what the sink
    declares is registered for deletion."""
    exchange = sink.setdefault("exchange", {"name": unique("fbtest.events.")})
    rabbit.exchanges.append(exchange["name"])
    topology = sink.get("topology", {})
    rabbit.queues.extend(queue["name"] for queue in topology.get("queues", []))
    rabbit.exchanges.extend(other["name"] for other in topology.get("exchanges", []))
    return write_sink_config(tmp_path, {"id": SINK, "protocol": "amqp", "host": AMQP_HOST,
                                        "port": AMQP_PORT, "timeout": 5, **sink}, **top)


async def feed(bridge: BridgeRun, events: Sequence[Event], batch: int = 100) -> None:
    """Hand events to the router in batches, as sources do."""
    for start in range(0, len(events), batch):
        await bridge.runtime.router.submit(events[start:start + batch])


def bodies(deliveries: Sequence[Any]) -> list[dict[str, Any]]:
    """The JSON bodies of consumed messages."""
    return [json.loads(delivery.body) for delivery in deliveries]


class CountingAck:
    """Counts acceptances."""

    def __init__(self) -> None:
        self.accepted = 0

    async def accept(self) -> None:
        self.accepted += 1

    async def reject(self, reason: str) -> None:
        raise AssertionError(f"unexpected reject: {reason}")
