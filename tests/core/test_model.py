"""The normalized event: its timestamps as text, its ids, its JSON object."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from bridge.core.model import (
    EVENT_ID_NAMESPACE,
    Event,
    Quality,
    Value,
    isoformat,
    message_event_id,
    new_event_id,
    parse_timestamp,
)


def reference(timestamp: float) -> str:
    """The plain datetime rendering that ``isoformat`` must equal."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@pytest.mark.parametrize("timestamp", [
    0.0, 1.0, 0.9999995, 0.9999994, 1.0000005, -0.5, -1.0, -0.0000004, 1718006400.0,
    253402300799.999, 1.9999999,
])
def test_isoformat_edges(timestamp: float) -> None:
    assert isoformat(timestamp) == reference(timestamp)


def test_isoformat_matches_datetime_for_many_times_and_round_trips() -> None:
    rng = random.Random(7)
    for _ in range(20_000):
        timestamp = rng.uniform(0, 2.5e11) if rng.random() < 0.5 else 1.7e9 + rng.random()
        text = isoformat(timestamp)
        assert text == reference(timestamp)
        assert isoformat(timestamp) == text  # again: from the last-value cache
        assert abs(parse_timestamp(text) - timestamp) < 0.002  # milliseconds, float precision


# --- ids -------------------------------------------------------------------------------------


def test_event_ids_made_in_a_tight_loop_strictly_increase_as_text() -> None:
    ids = [new_event_id() for _ in range(200_000)]
    assert all(earlier < later for earlier, later in itertools.pairwise(ids))
    milliseconds = Counter(identifier[:13] for identifier in ids)
    assert max(milliseconds.values()) > 1, "several ids within one millisecond were checked"


def test_event_ids_are_uuid7_and_increase_within_each_thread() -> None:
    made: list[list[str]] = []

    def make() -> None:
        made.append([new_event_id() for _ in range(20_000)])

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ids in made:
        assert ids == sorted(ids)
    every = [identifier for ids in made for identifier in ids]
    assert len(set(every)) == len(every)
    parsed = uuid.UUID(every[0])
    assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    assert abs(int(parsed.hex[:12], 16) / 1000 - time.time()) < 60


def test_message_event_ids_are_the_same_for_a_redelivered_message() -> None:
    first = message_event_id("queue", "message-1", "boiler.t")
    assert first == message_event_id("queue", "message-1", "boiler.t")
    assert first != message_event_id("queue", "message-2", "boiler.t")
    assert first != message_event_id("queue", "message-1", "boiler.p")
    assert uuid.UUID(first).version == 5
    assert first == str(uuid.uuid5(EVENT_ID_NAMESPACE, "queue\x00message-1\x00boiler.t"))


# --- the event -------------------------------------------------------------------------------


def make_event(**fields: Any) -> Event:
    """An event with every field set; ``fields`` override."""
    values: dict[str, Any] = {
        "id": new_event_id(), "source": "plant", "point": "boiler.t", "value": 64.8,
        "unit": "degC", "quality": Quality.GOOD, "ts": 1718006400.125,
        "received_at": 1718006400.5, "protocol": "modbus", "bridge": "edge-01",
        "tags": {"site": "demo", "area": "boiler-room"}}
    values.update(fields)
    return Event(**values)


def test_the_json_object_lists_every_field_in_the_documented_order() -> None:
    event = make_event(reason=None)
    body = event.to_json()
    assert list(json.loads(body)) == ["id", "source", "point", "value", "unit", "quality",
                                      "reason", "ts", "received_at", "protocol", "tags",
                                      "bridge"]
    assert json.loads(body) == {
        "id": event.id, "source": "plant", "point": "boiler.t", "value": 64.8,
        "unit": "degC", "quality": "good", "reason": None, "ts": "2024-06-10T08:00:00.125Z",
        "received_at": "2024-06-10T08:00:00.500Z", "protocol": "modbus",
        "tags": {"site": "demo", "area": "boiler-room"}, "bridge": "edge-01"}
    assert " " not in body.replace("boiler-room", "")
    assert event.to_dict() == json.loads(body)


@pytest.mark.parametrize("value", [0, -3, 2**53, 1.5, 1e16, -0.0, True, False, "ünïcode ✓", None,
                                   ""])
def test_values_of_every_kind_round_trip_through_the_json(value: Value) -> None:
    event = make_event(value=value, quality=Quality.BAD if value is None else Quality.GOOD,
                       reason="timeout" if value is None else None, tags={})
    body = event.to_json()
    assert json.loads(body)["value"] == value
    assert type(json.loads(body)["value"]) is type(value)
    back = Event.from_json(body)
    assert back == event
    assert back.to_json() == body


def test_a_serialized_body_is_used_as_is_and_not_compared() -> None:
    event = make_event()
    carried = msgspec.structs.replace(event, body=event.to_json())
    assert carried.to_json() is carried.body
    assert carried == event
    assert make_event(id=event.id, body="{}") == event
    assert make_event(id=event.id, value=1.0) != event


def test_reading_back_a_body_checks_it_and_fills_defaults() -> None:
    event = make_event()
    older = event.to_dict()
    del older["reason"], older["tags"]
    back = Event.from_json(json.dumps(older))
    assert (back.reason, back.tags) == (None, {})
    with pytest.raises(msgspec.ValidationError, match="quality"):
        Event.from_json(json.dumps({**event.to_dict(), "quality": "fine"}))
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        Event.from_json(json.dumps({**event.to_dict(), "extra": 1}))
