"""Fixtures shared by every test module, and the one check that no test leaves anything behind.

Every test fails if it leaves threads, child processes or (for a coroutine test) asyncio tasks
running once it is over, the way pymodbus' own suite checks: a leftover is a resource leak in
the code under test or in the test itself.
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from helpers.brokers import AMQP_HOST, AMQP_PORT, RabbitAdmin, require_broker

GRACE = 5.0
"""Seconds a thread, task or child process the test started may take to finish its last step
before it counts as left behind."""


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads behind."""
    before = set(threading.enumerate())
    yield
    extra = [thread for thread in threading.enumerate() if thread not in before]
    for thread in extra:
        thread.join(GRACE)
    leaked = [thread.name for thread in extra if thread.is_alive()]
    if leaked:
        pytest.fail(f"the test left threads running: {', '.join(leaked)}")


def _live_children() -> set[int]:
    """This process's child processes that have not exited (zombies count as exited)."""
    children: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            children.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            continue
    live = set()
    for pid in children:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in {"Z", "X"}:
            live.add(pid)
    return live


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves child processes running."""
    if not Path("/proc/self/task").is_dir():
        yield
        return
    before = _live_children()
    yield
    deadline = time.monotonic() + GRACE
    extra = _live_children() - before
    while extra and time.monotonic() < deadline:
        time.sleep(0.05)
        extra = _live_children() - before
    if extra:
        names = []
        for pid in sorted(extra):
            try:
                names.append(f"{pid} ({Path(f'/proc/{pid}/cmdline').read_bytes()[:80]!r})")
            except OSError:
                names.append(str(pid))
        pytest.fail(f"the test left child processes running: {', '.join(names)}")


async def _watch_tasks() -> AsyncIterator[None]:
    """Fail the test when tasks started during it are still running once its other fixtures
    are torn down (this check is set up before them, so it is torn down after them)."""
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()
    left = {task for task in asyncio.all_tasks() - before if task is not current}
    if left:
        await asyncio.wait(left, timeout=GRACE)
        left = {task for task in left if not task.done()}
    if left:
        names = sorted(task.get_name() for task in left)
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=GRACE)
        pytest.fail(f"the test left tasks running: {', '.join(names)}")


@pytest_asyncio.fixture(loop_scope="function")
async def _no_leftover_tasks_function() -> AsyncIterator[None]:
    """The leftover-task check of a test run in its own event loop."""
    async for _ in _watch_tasks():
        yield


@pytest_asyncio.fixture(loop_scope="module")
async def _no_leftover_tasks_module() -> AsyncIterator[None]:
    """The leftover-task check of a test run in its module's event loop."""
    async for _ in _watch_tasks():
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the leftover-task check first among every coroutine test's function-scoped fixtures
    (after the module's and session's own), in the event loop the test runs in."""
    for item in items:
        if not (isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj)):
            continue
        marker = item.get_closest_marker("asyncio")
        scope = (marker.kwargs.get("loop_scope") if marker is not None else None) or "function"
        definitions = item._fixtureinfo.name2fixturedefs
        wider = [name for name in item.fixturenames
                 if name in definitions and definitions[name][-1].scope != "function"]
        # After the thread and process checks too: the loop (and its executor's threads) this
        # check runs in must be closed before those look.
        first = [*wider, "no_leaked_threads", "no_leaked_processes"]
        position = max((item.fixturenames.index(name) + 1 for name in first
                        if name in item.fixturenames), default=0)
        item.fixturenames.insert(position, f"_no_leftover_tasks_{scope}")


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
