"""Fixtures shared by every test module."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

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
