"""Small asyncio helpers shared by the connectors."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from bridge.errors import ConnectorError

Result = TypeVar("Result")


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that a library swallowed.

    Some client libraries catch ``CancelledError`` inside their own awaits (pymodbus' connect,
    for one) and return normally; the task is then still marked as cancelling. Call this
    after awaiting such a library so shutdown is never lost.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def primary_failure(failures: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception a task group failed with: a cancellation when its task is being
    cancelled (stopping wins over reconnecting), else a connector error if any, else the
    first error (the group itself when there are several)."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        return asyncio.CancelledError()
    leaves: list[BaseException] = []

    def flatten(group: BaseExceptionGroup[BaseException]) -> None:
        for exc in group.exceptions:
            if isinstance(exc, BaseExceptionGroup):
                flatten(exc)
            else:
                leaves.append(exc)

    flatten(failures)
    for exc in leaves:
        if isinstance(exc, ConnectorError):
            return exc
    return leaves[0] if len(leaves) == 1 else failures


LOOP_VARIABLE = "FIELDBRIDGE_LOOP"
"""``asyncio`` picks asyncio's own event loop over uvloop."""


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where uvloop is installed (Linux, macOS) and not turned off with
    ``FIELDBRIDGE_LOOP=asyncio``; ``None``: asyncio's own."""
    if os.environ.get(LOOP_VARIABLE, "").lower() == "asyncio":
        return None
    try:
        import uvloop  # optional: there is no uvloop on Windows
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, Result]) -> Result:
    """Run ``main`` to completion on a new event loop (``event_loop_factory``)."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(main)
