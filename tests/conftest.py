"""Fixtures shared by every test module, and the one check that no test leaves anything behind.

Every test fails if it leaves threads, child processes or (for a coroutine test) asyncio tasks
running once it is over, the way pymodbus' own suite checks: a leftover is a resource leak in
the code under test or in the test itself.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import inspect
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
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


def _checking_tasks(
    function: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., Coroutine[Any, Any, None]]:
    """Wrap a coroutine test so that it fails when tasks it started outlive it."""

    @functools.wraps(function)
    async def checked(*arguments: Any, **keywords: Any) -> None:
        before = set(asyncio.all_tasks())
        await function(*arguments, **keywords)
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

    return checked


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Run every coroutine test under the leftover-task check."""
    function = getattr(item, "obj", None)
    if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(function):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(item, "obj", _checking_tasks(function))
            return (yield)
    return (yield)


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
