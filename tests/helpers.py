"""Small helpers for tests: free ports, leftover tasks."""

from __future__ import annotations

import asyncio
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (prefer binding to port 0 where a server allows it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def assert_no_other_tasks() -> None:
    """Every task a test started is finished: only the test's own task is left."""
    current = asyncio.current_task()
    others = [task.get_name() for task in asyncio.all_tasks() if task is not current]
    assert not others, f"tasks left running: {others}"
