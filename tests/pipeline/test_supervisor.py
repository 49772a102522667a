"""The supervisor's reconnect loop, with a small counting fake source."""

from __future__ import annotations

import asyncio
import random

from bridge.core.source import Source, SourceContext
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory
from bridge.pipeline.supervisor import Backoff, supervise


class FlakySource(Source):
    """Fails ``failures`` times, then stays up until cancelled."""

    def __init__(self, failures: int, error: Exception) -> None:
        super().__init__(source_id="flaky", protocol="test", endpoint="test://flaky")
        self.failures = failures
        self.error = error
        self.attempts = 0
        self.serving = asyncio.Event()

    async def run(self, context: SourceContext) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error
        context.status.up()
        self.serving.set()
        await asyncio.Event().wait()


async def _publish(readings: object) -> None:
    return None


def _context() -> SourceContext:
    return SourceContext(
        status=EndpointStatus(name="flaky", kind="source", protocol="test", endpoint="x"),
        publish=_publish)


def test_backoff_grows_with_jitter_and_resets() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, rng=random.Random(1))
    delays = [backoff.next() for _ in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next() <= 1.0


async def test_reconnects_until_up_and_records_the_error() -> None:
    source = FlakySource(2, ConnectorError("test://flaky", "refused", ErrorCategory.TRANSIENT))
    context = _context()
    task = asyncio.create_task(
        supervise(source, context, Backoff(initial=0.001, maximum=0.01)))
    await asyncio.wait_for(source.serving.wait(), 5)
    assert source.attempts == 3
    assert context.status.state is ConnectionState.UP
    assert context.status.last_error == "refused"
    assert context.status.error_category is ErrorCategory.TRANSIENT
    assert context.status.counters["reconnects"] == 2
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_bug_in_a_source_is_contained_and_reported() -> None:
    source = FlakySource(1, ZeroDivisionError("oops"))
    context = _context()
    task = asyncio.create_task(
        supervise(source, context, Backoff(initial=0.001, maximum=0.01)))
    await asyncio.wait_for(source.serving.wait(), 5)
    assert context.status.last_error == "internal error: ZeroDivisionError: oops"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_cancellation_is_not_swallowed() -> None:
    source = FlakySource(0, RuntimeError())
    task = asyncio.create_task(supervise(source, _context()))
    await asyncio.wait_for(source.serving.wait(), 5)
    task.cancel()
    results = await asyncio.gather(task, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
