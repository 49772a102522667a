"""Fixtures shared by every test module."""

from __future__ import annotations

import fcntl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import AMQP_HOST, AMQP_PORT, RabbitAdmin, require_broker

THREAD_GRACE = 5.0
"""Seconds a thread the test started may take to finish its last step before it counts."""


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads behind (as pymodbus' own test suite does)."""
    before = set(threading.enumerate())
    yield
    extra = [thread for thread in threading.enumerate() if thread not in before]
    for thread in extra:
        thread.join(THREAD_GRACE)
    leaked = [thread.name for thread in extra if thread.is_alive()]
    if leaked:
        pytest.fail(f"the test left threads running: {', '.join(leaked)}")


BROKER_LOCK = Path(tempfile.gettempdir()) / "fieldbridge-tests-broker.lock"
"""Test runs on one machine share the local brokers: a test that stops RabbitMQ (marked
``stops_broker``) holds this file's lock exclusively, every other broker test holds it shared,
so a second run waits out an outage instead of failing in it."""


@pytest.fixture(autouse=True)
def broker_lock(request: pytest.FixtureRequest) -> Iterator[None]:
    """Hold the broker lock, shared or exclusive, for the test's duration."""
    if request.node.get_closest_marker("stops_broker") is not None:
        mode = fcntl.LOCK_EX
    elif request.node.get_closest_marker("broker") is not None:
        mode = fcntl.LOCK_SH
    else:
        yield
        return
    with BROKER_LOCK.open("a") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
def rabbit() -> Iterator[RabbitAdmin]:
    """The RabbitMQ admin connection; queues and exchanges it tracks are deleted afterwards."""
    require_broker("RabbitMQ", AMQP_HOST, AMQP_PORT)
    admin = RabbitAdmin()
    try:
        yield admin
    finally:
        admin.close()
