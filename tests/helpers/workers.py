"""Builders for worker-process tests: waiting for a sink worker to come up, and for
processes to be gone.
"""

from __future__ import annotations

import os

import pytest

from bridge.core.status import ConnectionState
from bridge.pipeline.worker import (
    SinkWorker,
)
from helpers.brokers import (
    BridgeRun,
    wait_until,
)

WITHIN = 20.0
"""Seconds: worker processes import the daemon's modules before they connect."""


async def sink_worker_up(bridge: BridgeRun, sink: str) -> int | None:
    """Wait until the sink, run by a worker process, is connected; the worker's pid."""
    running = bridge.sink(sink)
    assert isinstance(running.delivery, SinkWorker)
    await wait_until(lambda: running.status.state is ConnectionState.UP, WITHIN,
                     f"the sink worker up ({running.status.last_error})")
    return running.delivery.pid


def assert_gone(pids: list[int]) -> None:
    """Every process in ``pids`` has exited and was reaped."""
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
