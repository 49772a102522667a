"""The event's timestamps as text."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from bridge.core.model import isoformat, parse_timestamp


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
        assert abs(parse_timestamp(text) - timestamp) < 0.002  # milliseconds, float precision
