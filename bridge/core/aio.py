"""Small asyncio helpers shared by the connectors."""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that a library swallowed.

    Some client libraries catch ``CancelledError`` inside their own awaits (pymodbus' connect,
    for one) and return normally; the task is then still marked as cancelling. Call this
    after awaiting such a library so shutdown is never lost.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
