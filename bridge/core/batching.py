"""Batching for message sources: readings that arrive one by one are handed on together.

A message source (MQTT, AMQP) receives messages one at a time. Handing each on alone would
cost a router round trip per message; waiting for a full batch would delay a lone message.
``ReadingBatcher`` does neither: a batch is handed on as soon as no further message is
already waiting, or when it holds ``MAX_BATCH`` readings.

May import: ``bridge.core.model`` and ``bridge.core.source``.
"""

from __future__ import annotations

from bridge.core.model import Reading
from bridge.core.source import SourceContext

MAX_BATCH = 500
"""At most this many readings are handed on together."""


class ReadingBatcher:
    """Collects a message source's readings and publishes them through its context in batches."""

    def __init__(self, context: SourceContext, *, limit: int = MAX_BATCH) -> None:
        if limit < 1:
            raise ValueError(f"a batch holds at least one reading, not {limit}")
        self._context = context
        self._limit = limit
        self._batch: list[Reading] = []

    async def add(self, reading: Reading, *, more_waiting: bool) -> None:
        """Take one reading; publish the batch when ``more_waiting`` is false (no further
        message has arrived yet) or when the batch is full.

        Publishing waits while the router applies backpressure; a published batch marks the
        source's status successful.
        """
        batch = self._batch
        batch.append(reading)
        if more_waiting and len(batch) < self._limit:
            return
        self._batch = []
        await self._context.publish(batch)
        self._context.status.success()
