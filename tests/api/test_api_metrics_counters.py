"""``/metrics`` names and explains every counter as it is declared."""

from __future__ import annotations

from typing import get_args

import httpx
from helpers.api import parse_exposition, sample

from bridge.api.event_hub import ENDED, EndReason
from bridge.core.counters import EVENTS, STREAMS, Owner, declarations
from bridge.runtime import Runtime


async def test_metrics_help_is_the_declared_help(
    plant: Runtime, client: httpx.AsyncClient
) -> None:
    source = plant.sources["plc1"].status
    device = source.children["boiler"]
    for counter in declarations(Owner.SOURCE):
        source.counters.add(counter, 2)
    for counter in declarations(Owner.DEVICE):
        device.counters.add(counter, 3)
    families = parse_exposition((await client.get("/metrics")).text)
    expected = {
        **{counter.metric("fieldbridge_source"): counter for counter in declarations(Owner.SOURCE)},
        **{counter.metric("fieldbridge_device"): counter for counter in declarations(Owner.DEVICE)},
        **{counter.metric("fieldbridge_router"): counter for counter in declarations(Owner.ROUTER)},
        "fieldbridge_api_streams_total": STREAMS,
        "fieldbridge_api_stream_events_total": EVENTS,
    }
    for name, counter in expected.items():
        assert families[name]["help"] == counter.help, name
        assert families[name]["type"] == "counter", name
    for counter in declarations(Owner.SOURCE):
        assert sample(families, counter.metric("fieldbridge_source"), source="plc1") >= 2
    for counter in declarations(Owner.DEVICE):
        assert sample(families, counter.metric("fieldbridge_device"), source="plc1",
                      device="boiler") == 3
    (ended_help,) = {counter.help for counter in ENDED.values()}
    assert families["fieldbridge_api_streams_ended_total"]["help"] == ended_help


def test_every_end_reason_has_its_declared_counter() -> None:
    assert set(ENDED) == set(get_args(EndReason))
    assert {counter.name for counter in ENDED.values()} == {
        f"ended_{reason}" for reason in get_args(EndReason)}
    assert all(Owner.STREAM in counter.owners for counter in ENDED.values())
