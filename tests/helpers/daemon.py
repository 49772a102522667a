"""The daemon run as a subprocess, as systemd runs it: its API's URL, its log and its memory.

Memory bounds in the hardening tests are read from ``/proc/<pid>/status`` (``VmRSS``, the
resident set now, and ``VmHWM``, its high-water mark), not from the test's own process.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from helpers import WAIT

_T = TypeVar("_T")

MIB = 1024 * 1024


def memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of process ``pid``, in bytes, from ``/proc``."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return values


@dataclass
class Daemon:
    """A running ``fieldbridge run``: its process, the API's base URL and its log lines."""

    process: asyncio.subprocess.Process
    url: str = ""
    log: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _draining: bool = False
    _eof: bool = False

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.process.pid

    def memory(self) -> dict[str, int]:
        """The daemon's ``VmRSS`` and ``VmHWM`` in bytes."""
        return memory(self.pid)

    async def until(self, text: str, within: float = 60.0) -> str:
        """Wait (at most ``within`` seconds) for a log line containing ``text``; return it."""
        async with asyncio.timeout(within):
            while True:
                self._changed.clear()
                for line in self.log:
                    if text in line:
                        return line
                if self._draining:
                    assert not self._eof, f"the daemon exited: {''.join(self.log)}"
                    await self._changed.wait()
                else:
                    await self._read_line()

    async def _read_line(self) -> bool:
        stderr = self.process.stderr
        assert stderr is not None
        line = (await stderr.readline()).decode(errors="replace")
        if not line:
            self._eof = True
            self._changed.set()
            assert self._draining, f"the daemon exited: {''.join(self.log)}"
            return False
        self.log.append(line)
        self._changed.set()
        return True

    async def poll(self, check: Callable[[], Awaitable[_T]], what: str,
                   within: float = 60.0) -> _T:
        """Call ``check()`` (which asks the daemon's API) until it returns something truthy,
        and return that; fail when the daemon exits or after ``within`` seconds. For states
        that only the API shows: there is nothing to await."""
        deadline = time.monotonic() + within
        while True:
            assert self.process.returncode is None, f"the daemon exited: {''.join(self.log)}"
            result = await check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: "
                                     f"{''.join(self.log[-20:])}")
            await asyncio.sleep(0.05)

    async def drain(self) -> None:
        """Read the log into ``log`` until the daemon closes it (run as a task)."""
        self._draining = True
        while await self._read_line():
            pass


@asynccontextmanager
async def running_daemon(config: Path, *, log_level: str = "info",
                         ready: bool = True) -> AsyncIterator[Daemon]:
    """Start ``fieldbridge run -c config`` (its API on port 0) and stop it with SIGTERM.

    The log is read by a task of this context: ``Daemon.until`` waits for a line. With
    ``ready=False`` it is handed over once the API listens, before the daemon is ready.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "--log-level", log_level, "run", "-c", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    daemon = Daemon(process)
    try:
        line = await daemon.until("API listening on ")
        match = re.search(r"API listening on (\S+)", line)
        assert match is not None
        daemon.url = match.group(1)
        if ready:
            await daemon.until("ready")
        reader = asyncio.create_task(daemon.drain(), name="daemon-log")
        try:
            yield daemon
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT):
                await process.wait()
            async with asyncio.timeout(WAIT):
                await reader
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
