"""The batching helper of the message sources: when a batch is handed on, and how large."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from bridge.core.batching import MAX_BATCH, ReadingBatcher
from bridge.core.model import Reading
from bridge.core.source import SourceContext
from bridge.core.status import EndpointStatus


class Recorder:
    """A publish callback that records every batch, and a status to report into."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.status = EndpointStatus(name="s", kind="source", protocol="mqtt", endpoint="x")
        self.context = SourceContext(status=self.status, publish=self.publish)

    async def publish(self, readings: Sequence[Reading]) -> None:
        self.batches.append([str(reading.address) for reading in readings])


def reading(address: str) -> Reading:
    """A message reading for ``address``."""
    return Reading(source="s", address=address, value=b"1", received_at=1.0)


async def test_a_lone_message_is_handed_on_at_once() -> None:
    recorder = Recorder()
    batcher = ReadingBatcher(recorder.context)
    await batcher.add(reading("a"), more_waiting=False)
    assert recorder.batches == [["a"]]
    assert recorder.status.last_success is not None


async def test_messages_already_waiting_join_the_batch() -> None:
    recorder = Recorder()
    batcher = ReadingBatcher(recorder.context)
    await batcher.add(reading("a"), more_waiting=True)
    await batcher.add(reading("b"), more_waiting=True)
    assert recorder.batches == []
    assert recorder.status.last_success is None
    await batcher.add(reading("c"), more_waiting=False)
    await batcher.add(reading("d"), more_waiting=False)
    assert recorder.batches == [["a", "b", "c"], ["d"]]


async def test_a_batch_holds_at_most_the_limit() -> None:
    recorder = Recorder()
    batcher = ReadingBatcher(recorder.context)
    for index in range(2 * MAX_BATCH + 3):
        await batcher.add(reading(str(index)), more_waiting=True)
    assert [len(batch) for batch in recorder.batches] == [MAX_BATCH, MAX_BATCH]
    await batcher.add(reading("last"), more_waiting=False)
    assert [len(batch) for batch in recorder.batches] == [MAX_BATCH, MAX_BATCH, 4]
    assert recorder.batches[2][-1] == "last"


async def test_publishing_waits_for_the_router() -> None:
    """Backpressure reaches the source: ``add`` returns only once the batch is taken."""
    started = asyncio.Event()
    release = asyncio.Event()
    taken: list[int] = []

    async def slow_publish(readings: Sequence[Reading]) -> None:
        started.set()
        await release.wait()
        taken.append(len(readings))

    status = EndpointStatus(name="s", kind="source", protocol="amqp", endpoint="x")
    batcher = ReadingBatcher(SourceContext(status=status, publish=slow_publish), limit=2)
    adding = asyncio.create_task(batcher.add(reading("a"), more_waiting=False),
                                 name="test.add")
    await started.wait()
    assert not adding.done()
    assert status.last_success is None
    release.set()
    await adding
    assert taken == [1]


def test_a_batch_limit_below_one_is_refused() -> None:
    recorder = Recorder()
    with pytest.raises(ValueError, match="at least one"):
        ReadingBatcher(recorder.context, limit=0)
